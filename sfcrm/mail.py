"""Email: building messages, the backends that deliver them, and the mail log.

The rules:

- every email is written to the log (``email_notification``) as the exact bytes to send, inside
  the caller's transaction, before anything is sent;
- a sender *claims* an email in its own short ``BEGIN IMMEDIATE`` transaction before sending it,
  so two runs at once (threads or processes, ``crew remind`` or ``mail retry`` from cron) never
  deliver one email twice;
- an email may have been delivered only once its message data went to the server (SMTP's
  DATA): a send that ended after that without the server's answer is logged as failed and
  retried only when named by id, and so is a claim that expired without a result (the sender
  died mid-send); anything that went wrong before DATA (connecting, TLS, the login, MAIL FROM,
  RCPT, Ctrl-C, even a bug) is an ordinary failure that ``mail retry`` sends again;
- one SMTP connection carries a whole batch; when the server cannot be reached, the rest of the
  batch is logged as failed at once instead of connecting again for each email;
- permanent refusals (SMTP 5xx) are not retried unless named; a refused login stops the batch;
- settings SMTP cannot use (a password smtplib cannot send, a port out of range) are a
  ConfigError when the backend is built, before any email is written;
- no stored or logged error ever holds the SMTP password.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import secrets
import sqlite3
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TextIO
from zoneinfo import ZoneInfo

from sfcrm.db import Database, db_time, from_db_time
from sfcrm.errors import ConfigError, MailError, NotFoundError, ValidationError
from sfcrm.times import iso_in

if TYPE_CHECKING:
    import smtplib
    import ssl

    from sfcrm.config import Settings
    from sfcrm.models import EmailNotification

log = logging.getLogger("sfcrm.mail")

CREW_INVITATION = "crew_invitation"
CREW_REMINDER = "crew_reminder"
CREW_BRIEFING = "crew_briefing"

INTERRUPTED = "interrupted while sending; it may have been delivered"
MAYBE_DELIVERED = "it may have been delivered, so it is sent again only when named by id"
MAX_ERROR = 1000
DEFAULT_LEASE = timedelta(minutes=10)

Attachment = tuple[str, str, bytes]  # (filename, MIME type with parameters, content)
Progress = Callable[[int, int], None]


# -- errors ------------------------------------------------------------------------------------


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


def _not_sent(exc: BaseException) -> str:
    """The logged error of a send that raised before handing its message over. Only the
    exception's type: its text could quote a setting (the password, say)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted before the message was sent; not delivered"
    return f"unexpected {type(exc).__name__} before the message was sent; not delivered"


def one_line(text: str, limit: int = MAX_ERROR) -> str:
    """Error text fit for a log line and the ``last_error`` column."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _reply(code: int, response: bytes | str) -> str:
    text = response.decode("utf-8", "replace") if isinstance(response, bytes) else str(response)
    return one_line(f"{code} {text}")


def _timed_out(exc: BaseException) -> bool:
    # smtplib reports a reply that never came as SMTPServerDisconnected("... timed out")
    return isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError)


def classify_smtp_error(exc: BaseException) -> SendError:
    """Map an smtplib or socket error to a SendError: permanent for 5xx, transient otherwise."""
    import smtplib

    if isinstance(exc, SendError):
        return exc
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        refused = exc.recipients
        codes = [code for code, _ in refused.values()]
        detail = "; ".join(f"{addr}: {_reply(c, r)}" for addr, (c, r) in refused.items())
        return SendError(
            "the SMTP server refused the recipient",
            value=detail,
            permanent=bool(codes) and all(code >= 500 for code in codes),
        )
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return SendError(
            "the SMTP server refused the login",
            value=_reply(exc.smtp_code, exc.smtp_error),
            hint="check EMAIL_HOST_USER and EMAIL_HOST_PASSWORD",
            stops_batch=True,
        )
    if isinstance(exc, smtplib.SMTPSenderRefused):
        return SendError(
            "the SMTP server refused the sender",
            value=_reply(exc.smtp_code, exc.smtp_error),
            hint="check DEFAULT_FROM_EMAIL: the server may not let this login send as it",
            permanent=exc.smtp_code >= 500,
        )
    if isinstance(exc, smtplib.SMTPDataError):
        return SendError(
            "the SMTP server refused the message",
            value=_reply(exc.smtp_code, exc.smtp_error),
            permanent=exc.smtp_code >= 500,
        )
    if isinstance(exc, smtplib.SMTPConnectError):
        return SendError(
            "the SMTP server refused the connection",
            value=_reply(exc.smtp_code, exc.smtp_error),
            stops_batch=True,
        )
    if isinstance(exc, smtplib.SMTPResponseException):
        return SendError(
            "the SMTP server answered with an error",
            value=_reply(exc.smtp_code, exc.smtp_error),
            permanent=exc.smtp_code >= 500,
        )
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return SendError(
            "the SMTP server does not support what sfcrm needs",
            value=one_line(str(exc)),
            hint="check EMAIL_USE_TLS, EMAIL_USE_SSL and EMAIL_HOST_USER",
            stops_batch=True,
        )
    if _timed_out(exc):
        return SendError("the SMTP server did not answer in time")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return SendError("the SMTP server closed the connection", value=one_line(str(exc)) or None)
    if isinstance(exc, TimeoutError):
        return SendError("the SMTP server did not answer in time")
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return SendError("network error talking to the SMTP server", value=one_line(reason))
    return SendError("SMTP error", value=one_line(str(exc) or type(exc).__name__))


# -- building messages -------------------------------------------------------------------------

_ADDRESS = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
_TOKEN = re.compile(r"[A-Za-z0-9!#$&^_.+-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


def validate_address(address: str) -> str:
    """A bare ASCII address (``name@domain``), or ValidationError.

    Anything that could add a header or a recipient (CR, LF, comma, angle brackets, quotes,
    spaces) is refused, never cleaned up.
    """
    if len(address) > 254 or not _ADDRESS.fullmatch(address):
        raise ValidationError(
            "not an email address sfcrm can send to",
            value=ascii(address)[1:-1],
            hint="use a plain address like name@example.co.ke",
        )
    return address


def clean_subject(subject: str) -> str:
    """One line: a CR, LF or other control character becomes a space, never a new header."""
    return " ".join(_CONTROL.sub(" ", subject).split())


def _header_text(value: str, what: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValidationError(f"{what} must be one line", value=ascii(value)[1:-1])
    return value


def _parse_mimetype(mimetype: str) -> tuple[str, str, dict[str, str]]:
    head, *rest = mimetype.split(";")
    maintype, _, subtype = head.strip().lower().partition("/")
    params: dict[str, str] = {}
    for part in rest:
        key, _, value = part.partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    if not all(_TOKEN.fullmatch(t) for t in (maintype, subtype, *params, *params.values())):
        raise ValidationError("not a usable attachment type", value=ascii(mimetype)[1:-1])
    return maintype, subtype, params


def _safe_filename(name: str) -> str:
    cleaned = _CONTROL.sub(" ", name).replace("/", "_").replace("\\", "_").replace('"', "'")
    return " ".join(cleaned.split()) or "attachment"


def build_message(
    *,
    sender: str,
    recipient: str,
    subject: str,
    text: str,
    html: str | None = None,
    attachments: Iterable[Attachment] = (),
    message_id_domain: str,
    date: datetime | None = None,
) -> bytes:
    """The complete email as bytes with CRLF line ends, ready for SMTP.

    Plain text, an HTML alternative when given, then attachments as (filename, MIME type,
    bytes); the MIME type may carry parameters (``text/calendar; method=PUBLISH``). Every call
    makes a fresh Message-ID.

    The MIME is written out here rather than by ``email.message``, which takes milliseconds a
    message (a thousand invitations would spend seconds on it). Every header value is checked
    or cleaned first, so nothing a name or subject holds can add a header; bodies are
    quoted-printable and attachments base64, so no body line can look like a boundary, which
    all contain ``=_``.
    """
    from email.utils import format_datetime

    if not re.fullmatch(r"[A-Za-z0-9.-]+", message_id_domain):
        raise ValidationError("not a usable Message-ID domain", value=ascii(message_id_domain))
    head = [
        f"From: {_address_header(_header_text(sender, 'the sender'))}",
        f"To: {validate_address(recipient)}",
        f"Subject: {_encoded_header(clean_subject(subject))}",
        f"Date: {format_datetime((date or datetime.now(UTC)).astimezone(UTC))}",
        f"Message-ID: <{secrets.token_hex(16)}@{message_id_domain}>",
        "MIME-Version: 1.0",
    ]
    body = _text_part(text, "plain")
    if html is not None:
        body = _multipart("alternative", [body, _text_part(html, "html")])
    parts = list(attachments)
    if parts:
        body = _multipart("mixed", [body, *(_attachment(*part) for part in parts)])
    return ("\r\n".join(head) + "\r\n").encode("ascii") + body


@functools.lru_cache(maxsize=16)  # one sender for a whole batch
def _address_header(value: str) -> str:
    from email.utils import formataddr, parseaddr

    name, address = parseaddr(value)
    if not address:
        return value
    return formataddr((name, address), charset="utf-8")


def _encoded_header(value: str) -> str:
    if value.isascii():
        return value
    from email.header import Header

    return Header(value, "utf-8", header_name="Subject").encode(linesep="\r\n")


def _text_part(content: str, subtype: str) -> bytes:
    import binascii

    lines = content.replace("\r\n", "\n").replace("\r", "\n")
    encoded = binascii.b2a_qp(lines.encode("utf-8"), istext=True).replace(b"\n", b"\r\n")
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    ).encode("ascii") + encoded


def _attachment(filename: str, mimetype: str, data: bytes) -> bytes:
    import base64

    maintype, subtype, params = _parse_mimetype(mimetype)
    if maintype == "text":
        params.setdefault("charset", "utf-8")
    extra = "".join(f'; {key}="{value}"' for key, value in params.items())
    name = _safe_filename(filename).encode("ascii", "replace").decode("ascii")
    encoded = base64.b64encode(bytes(data)).decode("ascii")
    lines = "\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    return (
        f"Content-Type: {maintype}/{subtype}{extra}\r\n"
        "Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="{name}"\r\n\r\n{lines}'
    ).encode("ascii")


def _multipart(kind: str, parts: list[bytes]) -> bytes:
    boundary = f"=_sfcrm_{secrets.token_hex(12)}"
    out = [f'Content-Type: multipart/{kind}; boundary="{boundary}"\r\n\r\n'.encode("ascii")]
    for part in parts:
        # the CRLF before a boundary belongs to the boundary, not to the part
        out.append(f"--{boundary}\r\n".encode("ascii"))
        out.append(part)
        out.append(b"\r\n")
    out.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(out)


# -- backends ----------------------------------------------------------------------------------


class Backend(ABC):
    """Delivers message bytes. ``open`` and ``close`` bracket a batch; usable with ``with``.

    ``send`` raises :class:`SendError` for anything that went wrong with one email.
    """

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


class _Dropped(Exception):
    """The server hung up before the message was sent: reconnecting and sending is safe."""


_FQDN: str | None = None


def _local_hostname() -> str:
    # smtplib calls getfqdn() for every connection, which can hang on a DNS lookup.
    global _FQDN
    if _FQDN is None:
        import socket

        _FQDN = socket.getfqdn()
    return _FQDN


class SmtpBackend(Backend):
    """SMTP with one connection for a whole batch: opened on the first send, reopened once when
    the server hung up between messages, with ``timeout`` on the connect and every command."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        use_tls: bool = False,
        use_ssl: bool = False,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 15.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if use_tls and use_ssl:
            raise ConfigError(
                "EMAIL_USE_TLS and EMAIL_USE_SSL are both on",
                hint="use EMAIL_USE_SSL for port 465, EMAIL_USE_TLS (STARTTLS) for port 587",
            )
        _check_server(host, int(port))
        _check_login(username or None, password or None)
        self.host = host
        self.port = int(port)
        self.use_tls = use_tls
        self.use_ssl = use_ssl
        self.username = username or None
        self._password = password or None
        self.timeout = timeout
        self._ssl_context = ssl_context
        self._conn: smtplib.SMTP | None = None
        self._data_started = False  # the current send got as far as DATA
        self.connections = 0  # connections opened so far

    def __repr__(self) -> str:
        password = "'********'" if self._password else "None"
        return (
            f"SmtpBackend(host={self.host!r}, port={self.port}, use_tls={self.use_tls}, "
            f"use_ssl={self.use_ssl}, username={self.username!r}, password={password}, "
            f"timeout={self.timeout})"
        )

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def _scrub(self, error: SendError) -> SendError:
        """Take the password out of an error's text, in case a server echoed it back."""
        if not self._password:
            return error
        from sfcrm.logs import Redactor

        redact = Redactor([self._password, f"\0{self.username or ''}\0{self._password}"])
        error.message = redact(error.message)
        error.value = redact(error.value) if error.value is not None else None
        error.args = (error.message,)
        return error

    def _context(self) -> ssl.SSLContext:
        import ssl

        return self._ssl_context or ssl.create_default_context()

    def open(self) -> None:
        if self._conn is not None:
            return
        import smtplib

        conn: smtplib.SMTP | None = None
        try:
            if self.use_ssl:
                conn = smtplib.SMTP_SSL(
                    self.host,
                    self.port,
                    local_hostname=_local_hostname(),
                    timeout=self.timeout,
                    context=self._context(),
                )
            else:
                conn = smtplib.SMTP(
                    self.host, self.port, local_hostname=_local_hostname(), timeout=self.timeout
                )
            if self.use_tls:
                conn.starttls(context=self._context())
                conn.ehlo()
            if self.username:
                conn.login(self.username, self._password or "")
        except OSError as exc:  # smtplib's errors, ssl's and the socket's are all OSErrors
            if conn is not None:
                _close_quietly(conn)
            raise self._scrub(self._connect_error(exc)) from None
        self._conn = conn
        self.connections += 1

    def _connect_error(self, exc: OSError) -> SendError:
        import smtplib
        import ssl

        if _timed_out(exc):
            error = SendError(
                f"the SMTP server {self.where} did not answer within {self.timeout:g} s",
                hint="check EMAIL_HOST and EMAIL_PORT, and that the server is running",
            )
        elif isinstance(exc, smtplib.SMTPException):
            error = classify_smtp_error(exc)
            error.message = error.message.replace(
                "the SMTP server", f"the SMTP server {self.where}"
            )
        elif isinstance(exc, TimeoutError):
            error = SendError(
                f"the SMTP server {self.where} did not answer within {self.timeout:g} s",
                hint="check EMAIL_HOST and EMAIL_PORT, and that the network lets them through",
            )
        elif isinstance(exc, ssl.SSLError):
            error = SendError(
                f"TLS with the SMTP server {self.where} failed",
                value=one_line(exc.reason or str(exc)),
                hint="check EMAIL_USE_TLS / EMAIL_USE_SSL against the port",
            )
        else:
            error = SendError(
                f"cannot connect to the SMTP server {self.where}",
                value=one_line(exc.strerror or str(exc) or type(exc).__name__),
                hint="check EMAIL_HOST and EMAIL_PORT, and that the server is running",
            )
        error.stops_batch = True
        return error

    def may_have_delivered(self) -> bool:
        return self._data_started

    def send(
        self, message: bytes, sender: str, recipients: list[str], *, label: str | None = None
    ) -> None:
        import smtplib

        self._data_started = False
        for attempt in (1, 2):
            reused = self._conn is not None
            self.open()
            try:
                self._transfer(message, sender, recipients)
                return
            except _Dropped as exc:
                self._drop()
                if reused and attempt == 1:
                    log.info(
                        "the SMTP server %s hung up between messages; reconnecting", self.where
                    )
                    continue
                raise self._scrub(
                    SendError("the SMTP server closed the connection", value=str(exc) or None)
                ) from None
            except (
                smtplib.SMTPRecipientsRefused,
                smtplib.SMTPSenderRefused,
                smtplib.SMTPDataError,
            ) as exc:
                raise self._scrub(classify_smtp_error(exc)) from None
            except OSError as exc:
                self._drop()
                error = classify_smtp_error(exc)
                if self._data_started:
                    # The message went out; whether the server kept it, only it knows.
                    error.message += " after the message was sent"
                    error.maybe_delivered = True
                    error.hint = (
                        "it may have been delivered: ask the recipient, then send it again "
                        "with `sfcrm mail retry ID` if it did not arrive"
                    )
                raise self._scrub(error) from None
            except BaseException:
                # Ctrl-C or a bug mid-command: a polite QUIT would wait for the answer
                self._drop()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _transfer(self, message: bytes, sender: str, recipients: list[str]) -> None:
        """smtplib's sendmail, step by step, so that a hang-up before any of the message went
        out (safe to resend) is told apart from one after (the outcome is unknown)."""
        import smtplib

        conn = self._conn
        assert conn is not None
        options: list[str] = []
        try:
            conn.ehlo_or_helo_if_needed()
            if conn.does_esmtp and conn.has_extn("size"):
                options.append(f"size={len(message)}")
            code, response = conn.mail(sender, options)
        except smtplib.SMTPServerDisconnected as exc:
            raise _Dropped(one_line(str(exc))) from None
        if code in (-1, 421):  # 421: the server is closing this connection
            raise _Dropped(_reply(code, response))
        if code != 250:
            self._reset()
            raise smtplib.SMTPSenderRefused(code, response, sender)
        refused: dict[str, tuple[int, bytes]] = {}
        for recipient in recipients:
            code, response = conn.rcpt(recipient)
            if code not in (250, 251):
                refused[recipient] = (code, response)
            if code == 421:
                self._drop()
                raise smtplib.SMTPRecipientsRefused(refused)
        if len(refused) == len(recipients):
            self._reset()
            raise smtplib.SMTPRecipientsRefused(refused)
        # From here on a failure without the server's answer leaves the outcome unknown.
        self._data_started = True
        try:
            code, response = conn.data(message)
        except smtplib.SMTPDataError as exc:  # DATA itself was refused: nothing was sent
            if exc.smtp_code == 421:
                self._drop()
            else:
                self._reset()
            raise
        if code != 250:
            if code == 421:
                self._drop()
            else:
                self._reset()
            raise smtplib.SMTPDataError(code, response)

    def _reset(self) -> None:
        import smtplib

        if self._conn is None:
            return
        try:
            self._conn.rset()
        except (smtplib.SMTPException, OSError):
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            _close_quietly(self._conn, quit=False)
            self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            _close_quietly(self._conn)
            self._conn = None


def _check_server(host: str, port: int) -> None:
    """Refuse, as a ConfigError, a host or port the socket layer would refuse with an
    exception that is neither an OSError nor an SMTP error."""
    try:
        host.encode("idna")  # what the socket does with a host name
    except UnicodeError:
        raise ConfigError(
            "EMAIL_HOST is not a usable host name",
            value=ascii(host)[1:-1],
            hint="use the SMTP server's name, like smtp.example.co.ke, or its address",
        ) from None
    if not 0 < port < 65536:
        raise ConfigError(
            "EMAIL_PORT must be from 1 to 65535",
            value=str(port),
            hint="587 with EMAIL_USE_TLS, 465 with EMAIL_USE_SSL, 25 for a server without TLS",
        )


def _check_login(username: str | None, password: str | None) -> None:
    """smtplib encodes the AUTH exchange (PLAIN, LOGIN, CRAM-MD5) as ASCII whatever the server
    offers, even SMTPUTF8, and raises UnicodeEncodeError mid-login on anything else."""
    if username is not None and not username.isascii():
        raise ConfigError(
            "EMAIL_HOST_USER holds a character SMTP login cannot send (only ASCII works)",
            value=ascii(username)[1:-1],
            hint="use the login the mail provider gives, usually the plain mailbox address",
        )
    if password is not None and not password.isascii():
        raise ConfigError(  # never shown, not even in part
            "EMAIL_HOST_PASSWORD holds a character SMTP login cannot send (only ASCII works)",
            hint="set a password of ASCII letters, digits and punctuation at the mail provider "
            "(or an app password) and put it in EMAIL_HOST_PASSWORD",
        )


def _close_quietly(conn: smtplib.SMTP, *, quit: bool = True) -> None:
    if quit:
        try:
            conn.quit()
            return
        except OSError:
            pass
    with contextlib.suppress(OSError):
        conn.close()


class ConsoleBackend(Backend):
    """Writes each message to a stream (the CLI passes stderr, so ``--json`` stays clean)."""

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

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.written: list[Path] = []
        self._placing = False  # the current send got as far as moving its file into place

    def __repr__(self) -> str:
        return f"FileBackend({str(self.folder)!r})"

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
    raw = settings.email_backend
    kind = "file" if raw is None else _BACKENDS.get(str(raw).strip().lower())
    if kind is None:
        raise ConfigError(
            "EMAIL_BACKEND is not one sfcrm knows",
            value=str(raw),
            hint="use smtp, console or file (Django's smtp, console and filebased names work)",
        )
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


# -- the mail log ------------------------------------------------------------------------------


@dataclass
class SendReport:
    """What a send or retry did, by email id."""

    sent: list[int] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    reasons: dict[int, str] = field(default_factory=dict)  # why each skipped one was skipped

    def skip(self, email_id: int, reason: str) -> None:
        self.skipped.append(email_id)
        self.reasons[email_id] = reason


@dataclass(frozen=True)
class _Claim:
    id: int
    token: str
    mime: bytes
    recipient: str
    notification_type: str


def notification_json(n: EmailNotification, tz: ZoneInfo) -> dict[str, Any]:
    return {
        "id": n.id,
        "recipient": n.recipient,
        "person_id": n.person_id,
        "notification_type": n.notification_type,
        "subject": n.subject,
        "is_sent": n.is_sent,
        "sent_at": iso_in(n.sent_at, tz),
        "failed_attempts": n.failed_attempts,
        "last_error": n.last_error,
    }


_STATE = (
    "is_sent", "claimed_until", "claim_token", "permanent_failure", "last_error",
    "failed_attempts", "created_at", "mime", "recipient", "notification_type",
)  # fmt: skip


@dataclass(slots=True)
class _State:
    """An email's sending state, read with plain SQL: claims run once per email, and a
    SQLModel object costs more to build than the whole claim."""

    id: int
    is_sent: bool
    claimed_until: datetime | None
    claim_token: str | None
    permanent_failure: bool
    last_error: str | None
    failed_attempts: int
    created_at: datetime
    mime: bytes
    recipient: str
    notification_type: str


def _load_state(conn: sqlite3.Connection, email_id: int) -> _State | None:
    found = conn.execute(
        f"SELECT {', '.join(_STATE)} FROM email_notification WHERE id = ?",  # noqa: S608
        (email_id,),
    ).fetchone()
    if found is None:
        return None
    sent, until, token, permanent, error, attempts, created, mime, recipient, kind = found
    created_at = from_db_time(created)
    assert created_at is not None  # NOT NULL
    return _State(
        email_id, bool(sent), from_db_time(until), token, bool(permanent), error, attempts,
        created_at, bytes(mime), recipient, kind,
    )  # fmt: skip


def _save_state(conn: sqlite3.Connection, row: _State) -> None:
    conn.execute(
        "UPDATE email_notification SET failed_attempts = ?, last_error = ?, "
        "permanent_failure = ?, claimed_until = ?, claim_token = ? WHERE id = ?",
        (
            row.failed_attempts, row.last_error, row.permanent_failure,
            db_time(row.claimed_until), row.claim_token, row.id,
        ),
    )  # fmt: skip


def _mark_interrupted(row: _State) -> None:
    row.failed_attempts += 1
    row.last_error = INTERRUPTED
    row.permanent_failure = False
    row.claimed_until = None
    row.claim_token = None


class Mailer:
    """Writes emails to the log and sends them. Dependencies are passed in."""

    def __init__(
        self,
        db: Database,
        backend_factory: Callable[[], Backend],
        *,
        sender: str,
        clock: Callable[[], datetime],
        lease: timedelta = DEFAULT_LEASE,
    ) -> None:
        self.db = db
        self._backend_factory = backend_factory
        self.sender = sender
        self.clock = clock
        self.lease = lease

    def __repr__(self) -> str:
        return f"Mailer(db={self.db.path!s}, sender={self.sender!r})"

    def _now(self) -> datetime:
        now = self.clock()
        if now.tzinfo is None:
            raise ValueError("the clock must give aware datetimes")
        return now

    @property
    def envelope_sender(self) -> str:
        """The bare address of DEFAULT_FROM_EMAIL, for SMTP's MAIL FROM."""
        from email.utils import parseaddr

        if "\r" in self.sender or "\n" in self.sender:
            raise ConfigError("DEFAULT_FROM_EMAIL must be one line")
        address = parseaddr(self.sender)[1]
        try:
            return validate_address(address)
        except ValidationError:
            raise ConfigError(
                "DEFAULT_FROM_EMAIL is not a usable address",
                value=self.sender,
                hint="e.g. DEFAULT_FROM_EMAIL='Sound Fusion <office@soundfusion.co.ke>'",
            ) from None

    def check(self) -> None:
        """Raise ConfigError now for mail settings that cannot work (DEFAULT_FROM_EMAIL, the
        backend's), so that a bulk send fails before it writes a single email."""
        _ = self.envelope_sender
        self._backend_factory().close()

    # -- writing ---------------------------------------------------------------------------

    def queue(
        self,
        conn: sqlite3.Connection,
        *,
        recipient: str,
        notification_type: str,
        subject: str,
        text: str,
        html: str | None = None,
        attachments: Iterable[Attachment] = (),
        person_id: int | None = None,
        assignment_id: int | None = None,
    ) -> int:
        """Write one email to the log inside the caller's write transaction (``conn`` from
        :meth:`Database.raw_write`, or ``raw_connection(session)`` after a flush) and return its
        id; send it later with :meth:`send`. A recipient that could add a header is refused
        (ValidationError)."""
        kind = notification_type.strip()
        if not kind or not _TOKEN.fullmatch(kind):
            raise ValidationError("not a notification type", value=ascii(notification_type))
        now = self._now()
        domain = self.envelope_sender.rpartition("@")[2]
        mime = build_message(
            sender=self.sender,
            recipient=recipient,
            subject=subject,
            text=text,
            html=html,
            attachments=attachments,
            message_id_domain=domain,
            date=now,
        )
        # Plain SQL: a batch writes a thousand of these in one transaction.
        cursor = conn.execute(
            "INSERT INTO email_notification (recipient, person_id, assignment_id, "
            "notification_type, subject, message, mime, created_at, is_sent, failed_attempts, "
            "permanent_failure) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0)",
            (recipient, person_id, assignment_id, kind, clean_subject(subject), text, mime,
             db_time(now)),
        )  # fmt: skip
        email_id = cursor.lastrowid
        assert email_id is not None
        log.debug("email %s queued: %s to %s", email_id, kind, recipient)
        return email_id

    # -- sending ---------------------------------------------------------------------------

    def send(self, ids: Sequence[int], *, progress: Progress | None = None) -> SendReport:
        """Send these logged emails over one connection; ones already sent or being sent by
        another run are skipped. Failures are logged and reported, not raised."""
        wanted = list(dict.fromkeys(ids))
        self._check_known(wanted)
        self._settle_interrupted()
        return self._run(wanted, auto=False, max_attempts=0, progress=progress)

    def retry(
        self,
        ids: Sequence[int] | None = None,
        *,
        max_attempts: int = 5,
        progress: Progress | None = None,
    ) -> SendReport:
        """Send failed emails again.

        Without ids: every unsent email that failed fewer than ``max_attempts`` times, except
        permanent refusals and ones interrupted mid-send (they may have been delivered), plus
        any written but never tried (its sender died before sending). Named ids are tried even
        when permanent or interrupted; a named one already sent is skipped; an unknown id raises
        NotFoundError before anything is sent.
        """
        if max_attempts < 1:
            raise ValidationError("max attempts must be at least 1", value=str(max_attempts))
        if ids is not None:
            wanted = list(dict.fromkeys(ids))
            self._check_known(wanted)
            self._settle_interrupted()
            return self._run(wanted, auto=False, max_attempts=max_attempts, progress=progress)
        self._settle_interrupted()
        return self._run(
            self._retryable_ids(max_attempts),
            auto=True,
            max_attempts=max_attempts,
            progress=progress,
        )

    def _check_known(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        found: set[int] = set()
        with self.db.raw_read() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                found.update(
                    row[0]
                    for row in conn.execute(
                        f"SELECT id FROM email_notification WHERE id IN ({marks})",  # noqa: S608
                        chunk,
                    )
                )
        missing = [i for i in ids if i not in found]
        if missing:
            raise NotFoundError("no such email", value=", ".join(map(str, missing)))

    def _retryable_ids(self, max_attempts: int) -> list[int]:
        fresh = db_time(self._now() - self.lease)
        with self.db.raw_read() as conn:
            rows = conn.execute(
                "SELECT id FROM email_notification WHERE is_sent = 0 AND permanent_failure = 0 "
                "AND claim_token IS NULL AND failed_attempts < ? AND ("
                " (failed_attempts >= 1 AND (last_error IS NULL OR last_error != ?))"
                " OR (failed_attempts = 0 AND created_at < ?)"
                ") ORDER BY id",
                (max_attempts, INTERRUPTED, fresh),
            ).fetchall()
        return [row[0] for row in rows]

    def _run(
        self, ids: list[int], *, auto: bool, max_attempts: int, progress: Progress | None
    ) -> SendReport:
        report = SendReport()
        total = len(ids)
        if not ids:
            return report
        envelope = self.envelope_sender
        backend = self._backend_factory()  # a configuration error shows before any claim
        try:
            for index, email_id in enumerate(ids):
                claim = self._claim(email_id, auto=auto, max_attempts=max_attempts)
                if isinstance(claim, str):
                    report.skip(email_id, claim)
                else:
                    try:
                        backend.send(claim.mime, envelope, [claim.recipient], label=str(email_id))
                    except SendError as exc:
                        text = one_line(str(exc))
                        if exc.maybe_delivered:
                            self._record_interrupted(claim, text)
                            report.failed.append((email_id, f"{text}; {MAYBE_DELIVERED}"))
                        else:
                            self._record_failure(claim, text, permanent=exc.permanent)
                            report.failed.append((email_id, text))
                        if exc.stops_batch:
                            rest = ids[index + 1 :]
                            self._fail_rest(rest, text, report, auto, max_attempts)
                            if progress is not None:
                                progress(total, total)
                            break
                    except BaseException as exc:
                        # Ctrl-C or a bug mid-send: record what is known now, then let it go on
                        if backend.may_have_delivered():
                            self._record_interrupted(claim)
                        else:
                            self._record_not_sent(claim, exc)
                        raise
                    else:
                        self._record_sent(claim)
                        report.sent.append(email_id)
                if progress is not None:
                    progress(index + 1, total)
        finally:
            backend.close()
        return report

    def _why_not(
        self, row: _State | None, now: datetime, auto: bool, max_attempts: int
    ) -> str | None:
        """Why this email must not be sent now, or None. Settles an expired claim first."""
        if row is None:
            return "no such email"
        if row.is_sent:
            return "already sent"
        if row.claimed_until is not None and row.claimed_until >= now:
            return "being sent by another sfcrm right now"
        if row.claim_token is not None:
            self._log_interrupted(row)
            _mark_interrupted(row)
        if not auto:
            return None
        if row.permanent_failure:
            return "refused for good by the server; name its id to retry"
        if row.last_error == INTERRUPTED:
            return "interrupted while sending, it may have been delivered; name its id to retry"
        if row.failed_attempts >= max_attempts:
            return f"gave up after {row.failed_attempts} attempts"
        if row.failed_attempts == 0 and row.created_at >= now - self.lease:
            return "not failed"
        return None

    def _claim(self, email_id: int, *, auto: bool, max_attempts: int) -> _Claim | str:
        now = self._now()
        token = secrets.token_hex(16)
        with self.db.raw_write() as conn:
            row = _load_state(conn, email_id)
            reason = self._why_not(row, now, auto, max_attempts)
            if row is not None:
                if reason is None:
                    row.claimed_until = now + self.lease
                    row.claim_token = token
                _save_state(conn, row)
            if reason is not None:
                return reason
            assert row is not None
            return _Claim(email_id, token, row.mime, row.recipient, row.notification_type)

    def _record_sent(self, claim: _Claim) -> None:
        now = db_time(self._now())
        with self.db.raw_write() as conn:
            found = conn.execute(
                "SELECT claim_token, assignment_id, notification_type FROM email_notification "
                "WHERE id = ?",
                (claim.id,),
            ).fetchone()
            if found is None:
                return
            token, assignment_id, kind = found
            if token != claim.token:
                log.warning("email %s: its claim expired while sending; logged as sent", claim.id)
            conn.execute(
                "UPDATE email_notification SET is_sent = 1, sent_at = ?, last_error = NULL, "
                "permanent_failure = 0, claimed_until = NULL, claim_token = NULL WHERE id = ?",
                (now, claim.id),
            )
            if assignment_id is not None and kind == CREW_INVITATION:
                conn.execute(
                    "UPDATE event_crew SET invitation_sent = 1, invitation_sent_at = ? "
                    "WHERE id = ?",
                    (now, assignment_id),
                )
            elif assignment_id is not None and kind == CREW_REMINDER:
                conn.execute(
                    "UPDATE event_crew SET reminder_sent = 1, reminder_sent_at = ? WHERE id = ?",
                    (now, assignment_id),
                )
        log.info("email %s sent: %s to %s", claim.id, claim.notification_type, claim.recipient)

    def _record_failure(self, claim: _Claim, text: str, *, permanent: bool) -> None:
        with self.db.raw_write() as conn:
            found = conn.execute(
                "SELECT is_sent, claim_token, failed_attempts FROM email_notification WHERE id = ?",
                (claim.id,),
            ).fetchone()
            if found is None or found[0] or found[1] != claim.token:
                log.warning("email %s failed after its claim expired: %s", claim.id, text)
                return
            attempts = int(found[2]) + 1
            conn.execute(
                "UPDATE email_notification SET failed_attempts = ?, last_error = ?, "
                "permanent_failure = ?, claimed_until = NULL, claim_token = NULL WHERE id = ?",
                (attempts, text, permanent, claim.id),
            )
        log.warning(
            "email %s failed (%s to %s, attempt %d%s): %s",
            claim.id, claim.notification_type, claim.recipient, attempts,
            ", permanent" if permanent else "", text,
        )  # fmt: skip

    def _record_not_sent(self, claim: _Claim, exc: BaseException) -> None:
        """A send that raised before its message went out: an ordinary failure, retried."""
        try:
            self._record_failure(claim, _not_sent(exc), permanent=False)
        except Exception:  # the claim's expiry records it in the end, as maybe delivered
            log.exception("email %s: could not record the failure", claim.id)

    def _record_interrupted(self, claim: _Claim, detail: str | None = None) -> None:
        try:
            with self.db.raw_write() as conn:
                row = _load_state(conn, claim.id)
                if row is None or row.is_sent or row.claim_token != claim.token:
                    return
                self._log_interrupted(row, detail)
                _mark_interrupted(row)
                _save_state(conn, row)
        except Exception:  # the claim's expiry records it in the end
            log.exception("email %s: could not record the interruption", claim.id)

    def _fail_rest(
        self, ids: list[int], text: str, report: SendReport, auto: bool, max_attempts: int
    ) -> None:
        """The server cannot be used: log the rest of the batch as failed, each counting an
        attempt, without touching ones sent or being sent by another run."""
        if not ids:
            return
        now = self._now()
        failed: list[_State] = []
        with self.db.raw_write() as conn:
            for email_id in ids:
                row = _load_state(conn, email_id)
                reason = self._why_not(row, now, auto, max_attempts)
                if row is not None and reason is None:
                    row.failed_attempts += 1
                    row.last_error = text
                    row.permanent_failure = False
                    row.claimed_until = None
                    row.claim_token = None
                    failed.append(row)
                if row is not None:
                    _save_state(conn, row)
                if reason is not None:
                    report.skip(email_id, reason)
                else:
                    report.failed.append((email_id, text))
        for row in failed:
            log.warning(
                "email %s failed (%s to %s, attempt %d): %s",
                row.id, row.notification_type, row.recipient, row.failed_attempts, text,
            )  # fmt: skip

    # -- interrupted sends -----------------------------------------------------------------

    def _log_interrupted(self, row: _State, detail: str | None = None) -> None:
        log.warning(
            "email %s (%s to %s): %s%s", row.id, row.notification_type, row.recipient,
            INTERRUPTED, f" ({detail})" if detail else "",
        )  # fmt: skip

    def _settle_interrupted(self) -> None:
        """Log as failed every email whose claim expired without a result. A cheap read first:
        the write lock is taken only when there is something to settle."""
        expired = (
            "SELECT id FROM email_notification "
            "WHERE is_sent = 0 AND claim_token IS NOT NULL AND claimed_until < ?"
        )
        now = (db_time(self._now()),)
        with self.db.raw_read() as conn:
            if conn.execute(expired + " LIMIT 1", now).fetchone() is None:
                return
        with self.db.raw_write() as conn:
            for (email_id,) in conn.execute(expired, now).fetchall():
                row = _load_state(conn, email_id)
                assert row is not None
                self._log_interrupted(row)
                _mark_interrupted(row)
                _save_state(conn, row)

    # -- reading ---------------------------------------------------------------------------

    def list(
        self,
        *,
        failed: bool = False,
        notification_type: str | None = None,
        since: datetime | None = None,
        limit: int = 200,
    ) -> Sequence[EmailNotification]:
        """Logged emails, newest first; ``failed``: not sent and tried at least once."""
        from sqlmodel import col, select

        from sfcrm.models import EmailNotification

        self._settle_interrupted()
        e = EmailNotification
        query = select(e)
        if failed:
            query = query.where(col(e.is_sent).is_(False), col(e.failed_attempts) > 0)
        if notification_type:
            query = query.where(e.notification_type == notification_type)
        if since is not None:
            query = query.where(col(e.created_at) >= since)
        query = query.order_by(col(e.created_at).desc(), col(e.id).desc()).limit(limit)
        with self.db.read() as session:
            return session.exec(query).all()

    def get(self, email_id: int) -> EmailNotification:
        from sfcrm.models import EmailNotification

        self._settle_interrupted()
        with self.db.read() as session:
            row = session.get(EmailNotification, email_id)
            if row is None:
                raise NotFoundError("no such email", value=str(email_id))
            return row
