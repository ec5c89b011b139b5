"""The event's iCalendar attachment: RFC 5545 escaping, folding and line ends, and every kind
of entry sfcrm sends read back with the icalendar library."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import icalendar
import pytest
from support import Received, SmtpSink, mail_office, run, run_json

from sfcrm.ics import event_calendar, event_ics

NAIROBI = ZoneInfo("Africa/Nairobi")


def make_fields() -> dict[str, Any]:
    return {
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


def make(**overrides: Any) -> str:
    return event_ics(**{**make_fields(), **overrides})


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


def test_a_long_ascii_line_folds_within_75_octets_and_unfolds_to_the_same_value() -> None:
    # icalendar folds before the 75th octet (RFC 5545's limit), a short line not at all
    for length in (60, 66, 67, 68, 200):
        text = make(summary="X" * length)

        assert all(len(line) <= 75 for line in text.split("\r\n"))
        assert "SUMMARY:" + "X" * length in unfold(text)
    assert "\r\nSUMMARY:" + "X" * 60 + "\r\n" in make(summary="X" * 60)


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


def test_the_text_is_the_librarys_calendar_whatever_the_entries_before_it_shared() -> None:
    # the lines an event's crew share are written once per event: each entry still says all
    kinds = [
        {},
        {"uid": "event-1-crew-3@sfcrm", "description": "Your role: lights\nBring, cables"},
        {"sequence": 2, "now": datetime(2025, 2, 21, 8, 0, tzinfo=UTC)},
        {"cancelled": True, "sequence": 3},
        {"summary": "Harusi ya 🎉 " * 9, "organizer_email": None},
    ]
    for overrides in kinds * 2:
        text = make(**overrides)
        fields = {**make_fields(), **overrides}
        expected = event_calendar(**fields)
        parsed = icalendar.Calendar.from_ical(text)

        assert parsed.to_ical() == icalendar.Calendar.from_ical(expected.to_ical()).to_ical()
        assert unfold(text).count("BEGIN:VEVENT") == 1


# -- every kind of entry sfcrm sends, read back by the library as a calendar would -------------


@pytest.fixture
def office(monkeypatch: pytest.MonkeyPatch, database_url: str, smtp_sink: SmtpSink) -> SmtpSink:
    """The office, its database on each engine, its mail going to a real SMTP server."""
    return mail_office(monkeypatch, database_url, smtp_sink)


def entries(received: Received) -> list[tuple[str, icalendar.Calendar]]:
    """Each calendar attached to an email: the part's ``method`` and the parsed calendar."""
    found = []
    for part in received.message.iter_attachments():
        if part.get_content_type() == "text/calendar":
            assert part.get_filename() == "event.ics"
            parsed = icalendar.Calendar.from_ical(part.get_content())
            found.append((part.get_param("method"), parsed))
    return found


def test_every_kind_of_calendar_entry_parses_back_with_its_uid_sequence_method_and_status(
    office: SmtpSink,
) -> None:
    when = datetime.now(NAIROBI) + timedelta(days=4)
    event = run_json("events", "add", "--name", "Gala, Night; One", "--location", "KICC",
                     "--date", when.date().isoformat(), "--time", "18:00")["id"]  # fmt: skip
    ids = []
    for n, name in enumerate(["Achieng", "Baraka"], start=1):
        person = run_json("people", "add", "--name", name, "--phone", f"071200000{n}",
                          "--email", f"{name.lower()}@example.co.ke")  # fmt: skip
        assignment = run_json("crew", "assign", "--event", str(event), "--person",
                              str(person["id"]), "--role", "Sound Engineer")  # fmt: skip
        ids.append(assignment["id"])
    for args in (
        ("crew", "invite", "--event", str(event)),  # invitations
        ("events", "edit", str(event), "--time", "19:30"),  # a change
        ("crew", "remove", str(ids[1])),  # one member taken off
        ("events", "cancel", str(event), "--reason", "client postponed"),  # the whole event
    ):
        result = run(*args)
        assert result.exit_code == 0, (args, result.stderr)

    seen: dict[str, list[tuple[str, str, int, str]]] = {}
    for received in office.handler.messages:
        [(method, cal)] = entries(received)
        assert cal["METHOD"] == method  # the MIME part says what the calendar says
        assert str(cal["PRODID"]) == "-//Sound Fusion//sfcrm//EN"
        [vevent] = cal.walk("VEVENT")
        assert vevent["SUMMARY"] == "Gala, Night; One"
        assert vevent.decoded("DTSTART").tzinfo is not None
        assert vevent.decoded("DTSTART").utcoffset() == timedelta(0)  # written in UTC
        seen.setdefault(received.recipients[0], []).append(
            (str(vevent["UID"]), method, int(vevent["SEQUENCE"]), str(vevent["STATUS"]))
        )
    achieng, baraka = (seen[f"{n}@example.co.ke"] for n in ("achieng", "baraka"))
    for crew_id, got in ((ids[0], achieng), (ids[1], baraka)):
        assert {uid for uid, *_ in got} == {f"event-{event}-crew-{crew_id}@sfcrm"}
        sequences = [sequence for _, _, sequence, _ in got]
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    # invitation, change, cancellation of the event
    assert [(m, s) for _, m, _, s in achieng] == [
        ("PUBLISH", "CONFIRMED"), ("PUBLISH", "CONFIRMED"), ("CANCEL", "CANCELLED")]  # fmt: skip
    # invitation, change, removal (nothing more once removed)
    assert [(m, s) for _, m, _, s in baraka] == [
        ("PUBLISH", "CONFIRMED"), ("PUBLISH", "CONFIRMED"), ("CANCEL", "CANCELLED")]  # fmt: skip
