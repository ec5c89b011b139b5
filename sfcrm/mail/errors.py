"""What can go wrong delivering one email, as one exception, and error text fit for the log."""

from __future__ import annotations

from sfcrm.errors import MailError

MAX_ERROR = 1000


class SendError(MailError):
    """One email could not be delivered.

    ``permanent``: the server refused it for good (5xx); retried only when named.
    ``stops_batch``: the server cannot be used at all (unreachable, login refused); the rest of
    the batch fails with the same error instead of trying again for each email.
    ``maybe_delivered``: the message went to the server but no answer came back (a hang-up or
    a timeout after DATA); retried only when named, so that nobody gets it twice.
    """

    def __init__(
        self,
        message: str,
        *,
        value: str | None = None,
        hint: str | None = None,
        permanent: bool = False,
        stops_batch: bool = False,
        maybe_delivered: bool = False,
    ) -> None:
        super().__init__(message, value=value, hint=hint)
        self.permanent = permanent
        self.stops_batch = stops_batch
        self.maybe_delivered = maybe_delivered


def one_line(text: str, limit: int = MAX_ERROR) -> str:
    """Error text fit for a log line and the ``last_error`` column."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def not_sent(exc: BaseException) -> str:
    """The logged error of a send that raised before handing its message over. Only the
    exception's type: its text could quote a setting (the password, say)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted before the message was sent; not delivered"
    return f"unexpected {type(exc).__name__} before the message was sent; not delivered"
