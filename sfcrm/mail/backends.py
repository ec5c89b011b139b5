"""Backends deliver message bytes: the interface, and the console and file backends (SMTP is in
:mod:`sfcrm.mail.smtp`)."""

from __future__ import annotations

import os
import re
import secrets
from abc import ABC, abstractmethod
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self, TextIO

from sfcrm.mail.errors import SendError


class Backend(ABC):
    """Delivers message bytes. ``open`` and ``close`` bracket a batch; usable with ``with``.

    ``send`` raises :class:`SendError` for anything that went wrong with one email.
    ``outcome`` is what a delivered email became, said to the office: ``sent``, ``written``
    (to ``outbox``, a folder) or ``printed``.
    """

    outcome = "sent"
    outbox: Path | None = None

    def check(self) -> None:  # noqa: B027  (nothing to check by default)
        """Raise ConfigError for settings this backend cannot work with, before anything is
        written; touches nothing."""

    def open(self) -> None:  # noqa: B027  (a batch needs no preparation by default)
        """Get ready for a batch (the SMTP backend connects lazily on the first send)."""

    @abstractmethod
    def send(
        self, message: bytes, sender: str, recipients: list[str], *, label: str | None = None
    ) -> None:
        """Deliver one message; ``label`` (the log id) may name what is written."""

    def may_have_delivered(self) -> bool:
        """Whether the last ``send``, which raised something other than SendError (Ctrl-C, a
        bug), had already handed its message over. A backend that cannot tell says yes, which
        keeps the email from being sent again without being named."""
        return True

    def close(self) -> None:  # noqa: B027  (nothing to release by default)
        """End the batch; never raises."""

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ConsoleBackend(Backend):
    """Writes each message to a stream (the CLI passes stderr, so ``--json`` stays clean)."""

    outcome = "printed"

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._writing = False

    def __repr__(self) -> str:
        return f"ConsoleBackend({getattr(self.stream, 'name', self.stream)!r})"

    def may_have_delivered(self) -> bool:
        return self._writing

    def send(
        self, message: bytes, sender: str, recipients: list[str], *, label: str | None = None
    ) -> None:
        self._writing = False
        text = message.decode("utf-8", "replace").replace("\r\n", "\n")
        self._writing = True
        try:
            self.stream.write(text if text.endswith("\n") else text + "\n")
            self.stream.write("-" * 79 + "\n")
            self.stream.flush()
        except (OSError, ValueError) as exc:
            raise SendError("cannot write the email to the console", value=str(exc)) from None


class FileBackend(Backend):
    """One ``.eml`` file per message in a folder, created on first use, written atomically."""

    outcome = "written"

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.outbox = self.folder
        self.written: list[Path] = []
        self._placing = False  # the current send got as far as moving its file into place

    def __repr__(self) -> str:
        return f"FileBackend({str(self.folder)!r})"

    def check(self) -> None:
        """The folder is one, or can be made where it is meant to be, and can be written."""
        from sfcrm.errors import ConfigError

        place = self.folder
        while not place.exists() and place.parent != place:
            place = place.parent
        problem = None
        if not place.is_dir():
            problem = f"{place} is not a folder"
        elif not os.access(place, os.W_OK | os.X_OK):
            problem = f"{place} cannot be written"
        if problem is not None:
            raise ConfigError(
                "the mail folder cannot be used",
                value=problem,
                hint="set EMAIL_FILE_PATH to a folder sfcrm can write, or EMAIL_BACKEND=smtp",
            )

    def open(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SendError(
                "cannot create the mail folder",
                value=f"{self.folder}: {exc.strerror or exc}",
                stops_batch=True,
            ) from None

    def may_have_delivered(self) -> bool:
        return self._placing

    def send(
        self, message: bytes, sender: str, recipients: list[str], *, label: str | None = None
    ) -> None:
        import tempfile

        self._placing = False
        self.open()
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", label) if label else None
        stem = stem or datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
        path = self.folder / f"{stem}-{secrets.token_hex(4)}.eml"
        tmp: str | None = None
        try:
            handle, tmp = tempfile.mkstemp(dir=self.folder, prefix=".", suffix=".tmp")
            with os.fdopen(handle, "wb") as out:
                out.write(message)
                out.flush()
                os.fsync(out.fileno())
            self._placing = True
            os.replace(tmp, path)
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise SendError(
                "cannot write the email file", value=f"{path}: {exc.strerror or exc}"
            ) from None
        self.written.append(path)
