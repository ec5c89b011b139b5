"""The backend the settings name (EMAIL_BACKEND, Django's names included)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from sfcrm.errors import ConfigError
from sfcrm.mail.backends import Backend, ConsoleBackend, FileBackend
from sfcrm.mail.smtp import SmtpBackend

if TYPE_CHECKING:
    from sfcrm.config import Settings


_BACKENDS = {
    "smtp": "smtp",
    "console": "console",
    "file": "file",
    "filebased": "file",
    "django.core.mail.backends.smtp.emailbackend": "smtp",
    "django.core.mail.backends.console.emailbackend": "console",
    "django.core.mail.backends.filebased.emailbackend": "file",
}


def outbox_folder(settings: Settings) -> Path:
    """Where the file backend writes: EMAIL_FILE_PATH, else ``outbox/`` beside the database."""
    folder: Path | None = settings.email_file_path
    return folder if folder is not None else settings.database_path.parent / "outbox"


def backend_from_settings(settings: Settings, *, stream: TextIO | None = None) -> Backend:
    """The backend EMAIL_BACKEND names; with none set, ``.eml`` files in ``outbox/``."""
    kind = backend_kind(settings)
    if kind == "console":
        return ConsoleBackend(stream if stream is not None else sys.stderr)
    if kind == "file":
        return FileBackend(outbox_folder(settings))
    if not settings.email_host:
        raise ConfigError("EMAIL_HOST is not set", hint="set EMAIL_HOST to your SMTP server")
    return SmtpBackend(
        settings.email_host,
        settings.email_port,
        use_tls=bool(settings.email_use_tls),
        use_ssl=bool(settings.email_use_ssl),
        username=settings.email_host_user,
        password=settings.email_host_password,
    )


def backend_kind(settings: Settings) -> str:
    """The kind of backend EMAIL_BACKEND names: smtp, console or file (none: file)."""
    raw = settings.email_backend
    kind = "file" if raw is None else _BACKENDS.get(str(raw).strip().lower())
    if kind is None:
        raise ConfigError(
            "EMAIL_BACKEND is not one sfcrm knows",
            value=str(raw),
            hint="use smtp, console or file (Django's smtp, console and filebased names work)",
        )
    return kind
