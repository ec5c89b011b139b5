"""The monitoring log: one timestamped line per payment operation, callback and email.

Every line passes through a filter that blanks the secrets in force, so neither a consumer key
nor the callback path's secret can reach the file even inside an exception's text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

LOGGER = "sfcrm"
_HANDLER_NAME = "sfcrm-file"


class Redactor:
    """Replaces known secret strings (and their obvious encodings) in text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        import base64

        values = {s for s in secrets if s and len(s) >= 4}
        for value in list(values):
            values.add(base64.b64encode(value.encode()).decode())
        self._secrets = sorted(values, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "********")
        return text


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


def configure_logging(log_file: Path | None, redact: Redactor) -> None:
    """Send sfcrm's log lines to log_file (when set); idempotent."""
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
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S%z")
    )
    handler.addFilter(RedactingFilter(redact))
    logger.addHandler(handler)


def mask_phone(phone: str | None) -> str:
    if not phone or len(phone) < 8:
        return phone or "-"
    return phone[:4] + "*" * (len(phone) - 7) + phone[-3:]
