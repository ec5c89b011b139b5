"""Building an email: the exact bytes SMTP carries, with every header value checked or cleaned
first, so nothing a name, subject or address holds can add a header or a recipient."""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sfcrm.errors import ValidationError

if TYPE_CHECKING:
    from email.message import EmailMessage, MIMEPart
    from email.policy import EmailPolicy

Attachment = tuple[str, str, bytes]  # (filename, MIME type with parameters, content)

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
    reply_to: str | None = None,
) -> bytes:
    """The complete email as bytes with CRLF line ends, ready for SMTP.

    Plain text, an HTML alternative when given, then attachments as (filename, MIME type,
    bytes); the MIME type may carry parameters (``text/calendar; method=PUBLISH``). Every call
    makes a fresh Message-ID. ``reply_to``, a bare address, is where replies go (the office).

    Built with the standard library's ``EmailMessage`` under ``email.policy.SMTP``, which
    encodes non-ASCII headers (RFC 2047) and folds them. Every header value is checked or
    cleaned first, so nothing a name or subject holds can add a header; bodies are
    quoted-printable and attachments base64, so the message is 7-bit and no body line can look
    like a boundary, which all contain ``=_``.
    """
    from email.message import EmailMessage

    if not re.fullmatch(r"[A-Za-z0-9.-]+", message_id_domain):
        raise ValidationError("not a usable Message-ID domain", value=ascii(message_id_domain))
    policy = _policy()
    message = EmailMessage(policy=policy)
    message["From"] = _sender_header(_header_text(sender, "the sender"))
    if reply_to:
        message["Reply-To"] = validate_address(reply_to)
    message["To"] = validate_address(recipient)
    message["Subject"] = clean_subject(subject)
    # whole seconds, as the header shows them: a batch's emails of one second share one header
    message["Date"] = (date or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
    message["Message-ID"] = f"<{secrets.token_hex(16)}@{message_id_domain}>"
    message["MIME-Version"] = "1.0"
    parts = [_attachment(*attachment) for attachment in attachments]
    if html is not None:
        content = _multipart(
            _part() if parts else message,
            "alternative",
            [_text(_part(), text, "plain"), _text(_part(), html, "html")],
        )
    else:
        content = _text(_part() if parts else message, text, "plain")
    if parts:
        _multipart(message, "mixed", [content, *parts])
    return message.as_bytes()


@functools.cache
def _policy() -> EmailPolicy[EmailMessage]:
    """``email.policy.SMTP`` (CRLF, 7-bit headers), cloned once with a header factory that
    parses and folds each header value once: a batch repeats most of its headers."""
    from email.policy import SMTP

    return SMTP.clone(header_factory=_header_factory())


def _header_factory() -> Callable[[str, Any], Any]:
    from email.headerregistry import BaseHeader, HeaderRegistry

    class FoldedOnce(BaseHeader):
        """A header that remembers how it folds under the policy it was last folded with."""

        def fold(self, *, policy: Any) -> str:
            key = (policy.max_line_length, policy.linesep, policy.utf8)
            known = self.__dict__.get("_sfcrm_folded")
            if known is not None and known[0] == key:
                return str(known[1])
            folded = str(super().fold(policy=policy))
            self.__dict__["_sfcrm_folded"] = (key, folded)
            return folded

    class Headers(HeaderRegistry):
        """The registry, keeping the header classes it makes (the standard one makes a class
        per header) and the last few hundred headers it parsed: they are immutable values."""

        def __init__(self) -> None:
            super().__init__(base_class=FoldedOnce)
            self._classes: dict[str, Any] = {}
            self._parsed: dict[tuple[str, Any], Any] = {}

        def __getitem__(self, name: str) -> Any:
            cls = self._classes.get(name.lower())
            if cls is None:
                cls = self._classes[name.lower()] = super().__getitem__(name)
            return cls

        def __call__(self, name: str, value: Any) -> Any:
            if type(value) not in (str, datetime):
                return super().__call__(name, value)
            header = self._parsed.get((name, value))
            if header is None:
                if len(self._parsed) >= _PARSED_HEADERS:
                    self._parsed.clear()
                header = self._parsed[(name, value)] = super().__call__(name, value)
            return header

    return Headers()


_PARSED_HEADERS = 512


@functools.lru_cache(maxsize=16)  # one sender for a whole batch
def _sender_header(value: str) -> Any:
    """The From header: the display name quoted or encoded as it needs, the address as is."""
    from email.headerregistry import Address
    from email.utils import parseaddr

    name, address = parseaddr(value)
    try:
        shown: Any = Address(name, addr_spec=address) if address else value
    except (ValueError, IndexError):
        shown = value
    return _policy().header_factory("From", shown)


@functools.cache
def _boundary(kind: str) -> str:
    """The boundary of each ``kind`` of multipart, drawn once a process.

    No part can hold it, since every body is quoted-printable (where ``=`` is ``=3D``) or base64
    (which has no ``=_``): so it need not be new for every message, and the generator need not
    search the parts for a free one. The same boundary lets the header be parsed once.
    """
    return f"=_sfcrm_{kind}_{secrets.token_hex(8)}"


def _part() -> MIMEPart:
    from email.message import MIMEPart

    return MIMEPart(policy=_policy())


def _text(part: MIMEPart, content: str, subtype: str) -> MIMEPart:
    lines = content.replace("\r\n", "\n").replace("\r", "\n")
    part.set_content(lines, subtype=subtype, charset="utf-8", cte="quoted-printable")
    return part


def _attachment(filename: str, mimetype: str, data: bytes) -> MIMEPart:
    maintype, subtype, params = _parse_mimetype(mimetype)
    if maintype == "text":
        params.setdefault("charset", "utf-8")
    part = _part()
    part.set_content(
        bytes(data), maintype, subtype, cte="base64", disposition="attachment",
        filename=_safe_filename(filename), params=params,
    )  # fmt: skip
    return part


def _multipart(whole: MIMEPart, kind: str, parts: list[MIMEPart]) -> MIMEPart:
    if kind == "alternative":
        whole.make_alternative(boundary=_boundary(kind))
    else:
        whole.make_mixed(boundary=_boundary(kind))
    for part in parts:
        whole.attach(part)
    return whole


def clean_notification_type(text: str) -> str:
    """A kind of email for the log (``crew_invitation``): one token, or ValidationError."""
    kind = text.strip()
    if not kind or not _TOKEN.fullmatch(kind):
        raise ValidationError("not a notification type", value=ascii(text))
    return kind
