"""The one exception hierarchy of sfcrm and the exit codes it maps to."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes; the README lists them for scripts and cron."""

    OK = 0
    FAILED = 1  # the command ran but some of its work failed (a batch with failures)
    USAGE = 2  # unknown option or missing argument (Typer's own)
    CONFIG = 3  # configuration missing or invalid
    INVALID = 4  # bad input: phone, amount, CSV row, ...
    NOT_FOUND = 5  # person, payment or other record does not exist
    CONFLICT = 6  # the record's state forbids it (resend of a completed payment, ...)
    DARAJA = 7  # Daraja refused the request
    NETWORK = 8  # Daraja unreachable or did not answer in time
    DATABASE = 9  # the database file cannot be opened or is damaged
    MAIL = 10  # mail could not be sent
    INTERNAL = 70  # a bug: rerun with --traceback and report it
    OUTPUT = 74  # standard output could not be written (a full disk, an I/O error)
    INTERRUPTED = 130
    BROKEN_PIPE = 141  # the reader of stdout went away (`| head`): as a shell reports SIGPIPE


class SfcrmError(Exception):
    """Base of every error sfcrm reports to its user.

    ``message`` says what happened, ``value`` the offending value (shown in brackets),
    ``hint`` what to do about it.
    """

    exit_code: ExitCode = ExitCode.FAILED
    code: str = "ERROR"

    def __init__(self, message: str, *, value: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.value = value
        self.hint = hint

    def __str__(self) -> str:
        if self.value is not None:
            return f"{self.message} ({self.value})"
        return self.message


class ConfigError(SfcrmError):
    exit_code = ExitCode.CONFIG
    code = "CONFIG_ERROR"


class ValidationError(SfcrmError):
    exit_code = ExitCode.INVALID
    code = "INVALID_INPUT"


class NotFoundError(SfcrmError):
    exit_code = ExitCode.NOT_FOUND
    code = "NOT_FOUND"


class ConflictError(SfcrmError):
    exit_code = ExitCode.CONFLICT
    code = "CONFLICT"


class ClashError(ConflictError):
    """The person is already booked on another event at that time: ``other`` names it
    (its id, name and date), for the pages that explain it to the crew member."""

    def __init__(
        self, message: str, *, other: dict[str, object], value: str | None = None,
        hint: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message, value=value, hint=hint)
        self.other = other


class DatabaseError(SfcrmError):
    exit_code = ExitCode.DATABASE
    code = "DATABASE_ERROR"


class DatabaseBusyError(DatabaseError):
    """Another writer held the database for longer than the busy timeout."""

    code = "DATABASE_BUSY"


class DatabaseConflictError(DatabaseBusyError):
    """Another transaction's writes crossed this one's (PostgreSQL's serialization failure or
    deadlock); nothing was written, and the transaction is safe to run again."""

    code = "DATABASE_CONFLICT"


class MailError(SfcrmError):
    exit_code = ExitCode.MAIL
    code = "MAIL_ERROR"


class BatchError(SfcrmError):
    """Some items of a batch failed; each was reported on its own line already."""

    exit_code = ExitCode.FAILED
    code = "PARTIAL_FAILURE"


class DarajaError(SfcrmError):
    """Daraja answered with an error, or could not be reached."""

    exit_code = ExitCode.DARAJA
    code = "DARAJA_ERROR"

    def __init__(
        self,
        message: str,
        *,
        value: str | None = None,
        hint: str | None = None,
        http_status: int | None = None,
        error_code: str | None = None,
        request_id: str | None = None,
    ):
        super().__init__(message, value=value, hint=hint)
        self.http_status = http_status
        self.error_code = error_code
        self.request_id = request_id
        if error_code:
            self.code = error_code


class DarajaAuthError(DarajaError):
    """The consumer key or secret was refused when asking for a token."""

    code = "DARAJA_AUTH"


class DarajaTokenError(DarajaError):
    """404.001.03: the access token was refused."""


class DarajaRequestError(DarajaError):
    """400.002.02 and other 4xx: a field of the request is malformed."""


class DarajaCredentialsError(DarajaError):
    """500.001.1001 Wrong credentials / Merchant does not exist."""


class DarajaBusyError(DarajaError):
    """Try later: subscriber locked, spike arrest, quota, internal error."""


class DarajaProcessingError(DarajaError):
    """STK Push Query: the transaction is still being processed."""


class DarajaUnreachableError(DarajaError):
    """Nothing reached Daraja (DNS, refused connection, connect timeout)."""

    exit_code = ExitCode.NETWORK
    code = "DARAJA_UNREACHABLE"


class DarajaTimeoutError(DarajaError):
    """The request may have reached Daraja but no answer came in time: outcome unknown."""

    exit_code = ExitCode.NETWORK
    code = "DARAJA_TIMEOUT"


class CallbackFormatError(SfcrmError):
    """A callback body that is not a Daraja STK callback."""

    exit_code = ExitCode.INVALID
    code = "BAD_CALLBACK"
