"""Building an email: the exact bytes SMTP carries, with every header value checked or cleaned
first, so nothing a name, subject or address holds can add a header or a recipient."""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime

from sfcrm.errors import ValidationError

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
        *([f"Reply-To: {validate_address(reply_to)}"] if reply_to else []),
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


def clean_notification_type(text: str) -> str:
    """A kind of email for the log (``crew_invitation``): one token, or ValidationError."""
    kind = text.strip()
    if not kind or not _TOKEN.fullmatch(kind):
        raise ValidationError("not a notification type", value=ascii(text))
    return kind
