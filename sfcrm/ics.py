"""An event as an iCalendar (RFC 5545) file, attached to crew invitations.

Text values are escaped (``\\ ; ,`` and line breaks), so nothing typed into an event's name,
location or notes can end a property and start another; lines are folded at 75 octets without
cutting a UTF-8 character in two; lines end in CRLF as the RFC requires.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

PRODID = "-//Sound Fusion//sfcrm//EN"
MAX_LINE_OCTETS = 75

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # every control character but TAB and LF
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def escape_text(value: str) -> str:
    """A TEXT value (RFC 5545 3.3.11): backslash, semicolon, comma and newline escaped."""
    value = _LINE_BREAK.sub("\n", value)
    value = _CONTROL.sub(" ", value)
    value = value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
    return value.replace("\n", "\\n")


def _param_text(value: str) -> str:
    """A parameter value, always quoted; a quoted-string can hold neither DQUOTE nor controls."""
    cleaned = _LINE_BREAK.sub(" ", value)
    cleaned = _CONTROL.sub(" ", cleaned).replace("\t", " ").replace('"', "'")
    return f'"{cleaned}"'


def _uri_text(value: str) -> str:
    """An address for a URI value: no whitespace, controls or characters that end a line."""
    return re.sub(r"[\x00-\x20\x7f\"<>\\]", "", value)


def format_utc(moment: datetime) -> str:
    """``20250301T150000Z``; a naive datetime is refused rather than guessed."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime given to the calendar")
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def fold(line: str) -> str:
    """Fold one content line into CRLF-ended lines of at most 75 octets each.

    Continuation lines start with a space, which counts toward their 75 octets.
    """
    if len(line) <= MAX_LINE_OCTETS and line.isascii():
        return line + "\r\n"  # most lines: one octet per character, short enough
    out: list[str] = []
    current: list[str] = []
    size = 0
    limit = MAX_LINE_OCTETS
    for char in line:
        width = len(char.encode("utf-8"))
        if size + width > limit:
            out.append("".join(current))
            current, size, limit = [" "], 1, MAX_LINE_OCTETS
        current.append(char)
        size += width
    out.append("".join(current))
    return "".join(part + "\r\n" for part in out)


def event_ics(
    *,
    uid: str,
    summary: str,
    starts_at: datetime,
    ends_at: datetime,
    location: str,
    description: str,
    organizer_email: str | None,
    organizer_name: str | None,
    now: datetime,
    sequence: int = 0,
    cancelled: bool = False,
) -> str:
    """A VCALENDAR with one VEVENT, times in UTC: ``METHOD:PUBLISH``, or with ``cancelled``
    ``METHOD:CANCEL`` and ``STATUS:CANCELLED``. A calendar replaces the entry of the same UID
    it holds with one of a higher SEQUENCE, so a change or cancellation updates it in place."""
    lines = [
        "BEGIN:VCALENDAR",
        "VERSION:2.0",
        f"PRODID:{PRODID}",
        "CALSCALE:GREGORIAN",
        f"METHOD:{'CANCEL' if cancelled else 'PUBLISH'}",
        "BEGIN:VEVENT",
        f"UID:{escape_text(uid)}",
        f"SEQUENCE:{int(sequence)}",
        f"DTSTAMP:{format_utc(now)}",
        f"DTSTART:{format_utc(starts_at)}",
        f"DTEND:{format_utc(ends_at)}",
        f"SUMMARY:{escape_text(summary)}",
        f"LOCATION:{escape_text(location)}",
        f"DESCRIPTION:{escape_text(description)}",
    ]
    address = _uri_text(organizer_email or "")
    if address:
        cn = f";CN={_param_text(organizer_name)}" if organizer_name else ""
        lines.append(f"ORGANIZER{cn}:mailto:{address}")
    status = "CANCELLED" if cancelled else "CONFIRMED"
    lines += [f"STATUS:{status}", "TRANSP:OPAQUE", "END:VEVENT", "END:VCALENDAR"]
    return "".join(fold(line) for line in lines)
