"""SMTP with one connection for a whole batch, and what each SMTP failure means for the email:
permanent (5xx), transient, stopping the batch, or maybe delivered (after DATA)."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from sfcrm.errors import ConfigError
from sfcrm.mail.backends import Backend
from sfcrm.mail.errors import SendError, one_line

if TYPE_CHECKING:
    import smtplib
    import ssl

log = logging.getLogger("sfcrm.mail")


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
