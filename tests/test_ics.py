"""The event's iCalendar attachment: RFC 5545 escaping, folding and line ends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from sfcrm.ics import event_ics, fold

NAIROBI = ZoneInfo("Africa/Nairobi")


def make(**overrides: Any) -> str:
    fields: dict[str, Any] = {
        "uid": "event-1-crew-2@sfcrm",
        "summary": "Wedding at Safari Park",
        "starts_at": datetime(2025, 3, 1, 15, 0, tzinfo=NAIROBI),
        "ends_at": datetime(2025, 3, 1, 23, 30, tzinfo=NAIROBI),
        "location": "Safari Park Hotel, Nairobi",
        "description": "Your role: sound engineer",
        "organizer_email": "office@soundfusion.co.ke",
        "organizer_name": "Sound Fusion",
        "now": datetime(2025, 2, 20, 9, 15, 30, tzinfo=UTC),
    }
    fields.update(overrides)
    return event_ics(**fields)


def unfold(text: str) -> list[str]:
    """Content lines as a calendar reader sees them."""
    return text.replace("\r\n ", "").split("\r\n")[:-1]


def test_calendar_has_one_published_event_with_times_in_utc() -> None:
    lines = unfold(make())

    assert lines[0] == "BEGIN:VCALENDAR"
    assert lines[-1] == "END:VCALENDAR"
    assert "VERSION:2.0" in lines
    assert "METHOD:PUBLISH" in lines
    assert any(line.startswith("PRODID:") for line in lines)
    assert lines.count("BEGIN:VEVENT") == 1
    assert "UID:event-1-crew-2@sfcrm" in lines
    assert "DTSTAMP:20250220T091530Z" in lines
    assert "DTSTART:20250301T120000Z" in lines  # 15:00 in Nairobi is 12:00 UTC
    assert "DTEND:20250301T203000Z" in lines
    assert 'ORGANIZER;CN="Sound Fusion":mailto:office@soundfusion.co.ke' in lines


def test_every_line_ends_with_crlf() -> None:
    text = make(description="one\ntwo\r\nthree")

    assert text.endswith("\r\n")
    assert "\n" not in text.replace("\r\n", "")
    assert "\r" not in text.replace("\r\n", "")


def test_text_values_escape_backslash_semicolon_comma_and_newline() -> None:
    lines = unfold(make(summary="Sound, Light; Stage \\ Co", description="Bring:\ncables, DI"))

    assert "SUMMARY:Sound\\, Light\\; Stage \\\\ Co" in lines
    assert "DESCRIPTION:Bring:\\ncables\\, DI" in lines


@pytest.mark.parametrize("field", ["summary", "location", "description", "uid"])
def test_line_break_in_a_field_cannot_start_a_new_property(field: str) -> None:
    hostile = "Gig\r\nATTENDEE:mailto:x@evil.test\rEND:VEVENT\nBEGIN:VALARM"

    lines = unfold(make(**{field: hostile}))

    assert not any(line.startswith(("ATTENDEE", "BEGIN:VALARM")) for line in lines)
    assert lines.count("END:VEVENT") == 1
    assert any("Gig\\nATTENDEE:mailto:x@evil.test\\nEND:VEVENT\\nBEGIN:VALARM" in x for x in lines)


def test_organizer_name_and_address_cannot_break_the_line() -> None:
    lines = unfold(
        make(organizer_name='Sound "Fusion"\r\nATTENDEE:x', organizer_email="a@x.co.ke\r\nX:y")
    )

    organizer = [line for line in lines if line.startswith("ORGANIZER")]
    assert organizer == ["ORGANIZER;CN=\"Sound 'Fusion' ATTENDEE:x\":mailto:a@x.co.keX:y"]
    assert not any(line.startswith(("ATTENDEE", "X:")) for line in lines)


def test_no_organizer_line_without_an_office_email() -> None:
    assert not any(x.startswith("ORGANIZER") for x in unfold(make(organizer_email=None)))


def test_long_lines_fold_at_75_octets_without_splitting_a_utf8_character() -> None:
    description = "Ngoma 🥁 na sauti — é ñ 中文, " * 30
    text = make(description=description, summary="Sherehe ya 🎉 " * 20)

    for physical in text.split("\r\n")[:-1]:
        raw = physical.encode("utf-8")
        assert len(raw) <= 75
        raw.decode("utf-8")  # each physical line is whole characters
    folded = [line for line in text.split("\r\n") if line.startswith(" ")]
    assert folded  # folding happened
    assert "DESCRIPTION:" + description.replace(",", "\\,") in unfold(text)


def test_fold_keeps_a_line_of_exactly_75_octets_whole() -> None:
    line = "X" * 75

    assert fold(line) == line + "\r\n"
    assert fold(line + "Y") == line + "\r\n Y\r\n"


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        make(starts_at=datetime(2025, 3, 1, 15, 0))


def test_times_in_any_zone_are_written_as_utc() -> None:
    start = datetime(2025, 3, 1, 15, 0, tzinfo=ZoneInfo("Europe/London"))
    lines = unfold(make(starts_at=start, ends_at=start + timedelta(hours=2)))

    assert "DTSTART:20250301T150000Z" in lines
    assert "DTEND:20250301T170000Z" in lines


def test_an_update_carries_its_sequence_and_a_cancellation_says_cancel() -> None:
    assert "SEQUENCE:0" in unfold(make())
    update = unfold(make(sequence=3))
    assert "SEQUENCE:3" in update and "METHOD:PUBLISH" in update

    cancelled = unfold(make(sequence=4, cancelled=True))

    assert "METHOD:CANCEL" in cancelled and "METHOD:PUBLISH" not in cancelled
    assert "STATUS:CANCELLED" in cancelled and "STATUS:CONFIRMED" not in cancelled
    assert "SEQUENCE:4" in cancelled and "UID:event-1-crew-2@sfcrm" in cancelled
