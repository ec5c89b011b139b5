"""The monitoring log: one timestamped line per payment operation, callback and email.

Every line passes through a filter that blanks the secrets in force, so neither a consumer key
nor the callback path's secret can reach the file even inside an exception's text.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

LOGGER = "sfcrm"
_HANDLER_NAME = "sfcrm-file"


MASK = "********"
PIECE = 12  # this many characters of a secret, in a row, count as showing it
GRAM = PIECE // 2  # any PIECE characters in a row hold GRAM of them starting at a multiple of GRAM
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")


class Redactor:
    """Replaces known secret strings, their encodings and pieces of them in text, in any case.

    Caught: each secret as is, URL-quoted and JSON-escaped; any run of ``PIECE`` characters of
    one (an echo cut short, as error snippets are); and any base64 token whose decoding holds a
    secret or such a piece. The last matters because the Basic header is base64 of
    ``key:secret`` and the STK Password base64 of ``shortcode + passkey + timestamp``: neither
    contains base64 of the secret alone, and the timestamp changes every second.

    Matching ignores case (a gateway or server may echo a key upper- or lower-cased): secrets
    and text are compared case-folded, and what matched is masked in the original text.
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        import base64
        import json
        from urllib.parse import quote, quote_plus

        values = {s for s in secrets if s and len(s) >= 4}
        forms = set(values)
        for value in values:
            forms.add(base64.b64encode(value.encode()).decode())
            forms.add(quote(value, safe=""))
            forms.add(quote_plus(value))
            forms.add(json.dumps(value)[1:-1])
        self._forms = sorted({f for form in forms for f in _foldings(form)}, key=len, reverse=True)
        # Pieces come from the smallest secrets only: the callback URL's host is not secret,
        # its path is (and is a secret of its own).
        values = {f for value in values for f in _foldings(value)}
        atoms = [v for v in values if not any(o != v and o in v for o in values)]
        self._short = [a for a in atoms if len(a) < PIECE]
        self._pieces = frozenset(
            a[i : i + PIECE] for a in atoms if len(a) >= PIECE for i in range(len(a) - PIECE + 1)
        )
        # Every GRAM characters of the pieces: a window holding a piece holds one of these at a
        # position that is a multiple of GRAM, so text without any is passed in a fraction of
        # the steps (every log line pays this).
        self._grams = frozenset(
            p[i : i + GRAM] for p in self._pieces for i in range(PIECE - GRAM + 1)
        )

    def __call__(self, text: str) -> str:
        if not self._forms:
            return text
        text = _BASE64_RUN.sub(self._base64_token, text)
        folded = _fold(text)  # once: every search below runs on it
        for form in self._forms:
            if form in folded:
                text, folded = _mask_each(text, folded, form)
        return self._mask_pieces(text, folded)

    def _may_hold_piece(self, folded: str) -> bool:
        grams = self._grams
        return any(folded[i : i + GRAM] in grams for i in range(0, len(folded) - GRAM + 1, GRAM))

    def _holds_secret(self, text: str) -> bool:
        folded = text.casefold()  # no span to mask here, so no need to keep places
        if any(short in folded for short in self._short):
            return True
        if not self._may_hold_piece(folded):
            return False
        pieces = self._pieces
        return any(folded[i : i + PIECE] in pieces for i in range(len(folded) - PIECE + 1))

    def _base64_token(self, match: re.Match[str]) -> str:
        token = match.group()
        return MASK if any(self._holds_secret(d) for d in _base64_readings(token)) else token

    def _mask_pieces(self, text: str, folded: str) -> str:
        if not self._pieces or not self._may_hold_piece(folded):
            return text
        spans: list[list[int]] = []
        for i in range(len(folded) - PIECE + 1):
            if folded[i : i + PIECE] in self._pieces:
                if spans and i <= spans[-1][1]:
                    spans[-1][1] = i + PIECE
                else:
                    spans.append([i, i + PIECE])
        for start, end in reversed(spans):
            text = text[:start] + MASK + text[end:]
        return text


def _fold(text: str) -> str:
    """``text`` case-folded with every character kept at its place, so that a span found in
    the folded text is the same span of the original. Only when some character folds to more
    than one (``ß`` to ``ss``) is it done character by character, those kept as they are."""
    folded = text.casefold()
    if len(folded) == len(text):  # no character grew, so none moved
        return folded
    return "".join(f if len(f := c.casefold()) == 1 else c for c in text)


def _foldings(secret: str) -> set[str]:
    """Both ways a secret can look in folded text: as ``_fold`` leaves it (in text holding a
    character that grows when folded, like ``ß``, which stays) and fully case-folded (in other
    text, and in base64 readings)."""
    return {_fold(secret), secret.casefold()}


def _mask_each(text: str, folded: str, form: str) -> tuple[str, str]:
    """``text`` and its folding with each occurrence of ``form`` (found in the folding) masked,
    left to right, as ``str.replace`` would."""
    out: list[str] = []
    out_folded: list[str] = []
    start = 0
    found = folded.find(form)
    while found != -1:
        out += (text[start:found], MASK)
        out_folded += (folded[start:found], MASK)
        start = found + len(form)
        found = folded.find(form, start)
    out.append(text[start:])
    out_folded.append(folded[start:])
    return "".join(out), "".join(out_folded)


def _base64_readings(token: str) -> Iterator[str]:
    """A token decoded as base64 (either alphabet) from each of its first four characters,
    since a token cut from a longer one may not start on a 4-character boundary."""
    import base64
    import binascii

    standard = token.rstrip("=").replace("-", "+").replace("_", "/")
    for start in range(4):
        body = standard[start:]
        body = body[: len(body) - len(body) % 4]
        if len(body) < 8:
            break
        try:
            yield base64.b64decode(body, validate=True).decode("latin-1")
        except (binascii.Error, ValueError):
            continue


class RedactingFilter(logging.Filter):
    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info:
            message += " | " + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        record.msg = self.redact(message).replace("\n", " | ")
        record.args = None
        return True


class LocalTimeFormatter(logging.Formatter):
    """Log lines stamped in the office's time zone (SFCRM_TIMEZONE), with its offset:
    ``2026-12-01T09:00:00+03:00 INFO sfcrm.payments ...``, whatever the machine's own zone."""

    def __init__(
        self, tz: str = "UTC", fmt: str = "%(asctime)s %(levelname)s %(name)s %(message)s"
    ) -> None:
        from zoneinfo import ZoneInfo

        super().__init__(fmt)
        self.tz = ZoneInfo(tz)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        from datetime import datetime

        return datetime.fromtimestamp(record.created, self.tz).isoformat(timespec="seconds")


def configure_logging(log_file: Path | None, redact: Redactor, *, tz: str = "UTC") -> None:
    """Send sfcrm's log lines to log_file (when set), stamped in ``tz``; idempotent."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        if handler.get_name() == _HANDLER_NAME:
            logger.removeHandler(handler)
            handler.close()
    # Without a handler of its own, Python would print warnings on stderr unfiltered.
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    if log_file is None:
        return
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(LocalTimeFormatter(tz))
    handler.addFilter(RedactingFilter(redact))
    logger.addHandler(handler)


def mask_phone(phone: str | None) -> str:
    if not phone or len(phone) < 8:
        return phone or "-"
    return phone[:4] + "*" * (len(phone) - 7) + phone[-3:]
