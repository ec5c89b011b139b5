"""Rules that used to leak: a declined assignment confirmed again into a clash, events entered
in the past by mistake, invitations for an event that is over, dates in other ISO forms, option
values that matched nothing, and sfcrm.toml keys that meant nothing. All through the real CLI,
the RSVP pages through the real listener, mail to a real SMTP server on 127.0.0.1."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
from support import (
    SmtpSink,
    mail_office,
    reasons,
    rsvp_link_in,
    rsvp_server,
    run,
    run_json,
    written,
)

NAIROBI = ZoneInfo("Africa/Nairobi")


def day(offset: int) -> str:
    return (datetime.now(NAIROBI) + timedelta(days=offset)).date().isoformat()


def add_event(name: str, date: str, *extra: str) -> int:
    doc = run_json(
        "events", "add", "--name", name, "--date", date, "--location", "KICC, Nairobi", *extra
    )
    return int(doc["id"])


def add_person(name: str, n: int) -> int:
    doc = run_json("people", "add", "--name", name, "--phone", f"071200000{n}",
                   "--email", f"{name.lower()}@example.co.ke")  # fmt: skip
    return int(doc["id"])


def assign(event: int, person: int) -> int:
    doc = run_json("crew", "assign", "--event", str(event), "--person", str(person),
                   "--role", "Sound")  # fmt: skip
    return int(doc["id"])


def status_of(assignment_id: int) -> str:
    [doc] = [c for c in run_json("crew", "list") if c["id"] == assignment_id]
    return str(doc["status"])


@pytest.fixture
def office(monkeypatch: pytest.MonkeyPatch, database_url: str, smtp_sink: SmtpSink) -> SmtpSink:
    """The office, its database on each engine, its mail going to a real SMTP server."""
    return mail_office(monkeypatch, database_url, smtp_sink)


@pytest.fixture
def rsvp_listener(monkeypatch: pytest.MonkeyPatch, office: SmtpSink) -> Iterator[str]:
    """The listener with crew links on, on a loopback socket; yields its base URL."""
    with rsvp_server(monkeypatch) as base:
        yield base


def rsvp_link(received: Any) -> str:
    return rsvp_link_in(received.message)


# -- a declined assignment confirmed again ------------------------------------------------------


def overlapping_pair() -> tuple[int, int, str]:
    """Breakfast (event 1, apart), Wedding (event 2) and Concert (event 3) overlapping."""
    date = day(5)
    add_event("Breakfast", date, "--time", "07:00", "--end-time", "10:00")
    wedding = add_event("Wedding", date, "--time", "14:00", "--end-time", "20:00")
    concert = add_event("Concert", date, "--time", "19:00", "--end-time", "23:00")
    return wedding, concert, date


def test_the_overlap_error_names_the_event_already_booked_by_its_own_id(office: SmtpSink) -> None:
    wedding, concert, date = overlapping_pair()
    person = add_person("Achieng", 1)
    assign(wedding, person)

    result = run("crew", "assign", "--event", str(concert), "--person", str(person),
                 "--role", "Sound")  # fmt: skip

    assert result.exit_code == 6
    first = result.stderr.splitlines()[0]
    assert first == (
        f"Error: Achieng is already on Wedding (event {wedding}, {date} 14:00), which overlaps"
        f" Concert (event {concert})"
    )


def test_confirming_a_declined_assignment_that_now_clashes_is_refused_naming_the_clash(
    office: SmtpSink,
) -> None:
    wedding, concert, date = overlapping_pair()
    person = add_person("Achieng", 1)
    first = assign(wedding, person)
    run_json("crew", "decline", str(first))
    second = assign(concert, person)  # the declined one holds no time: allowed
    run_json("crew", "confirm", str(second))

    result = run("crew", "confirm", str(first))

    assert result.exit_code == 6, result.stdout
    assert (
        f"Achieng is already on Concert (event {concert}, {date} 19:00), which overlaps Wedding"
        f" (event {wedding})"
    ) in result.stderr
    assert "--allow-overlap" in result.stderr
    assert status_of(first) == "declined"
    as_json = run("crew", "confirm", str(first), "--json")
    assert as_json.exit_code == 6 and '"code": "CONFLICT"' in as_json.stdout
    # the office may mean it
    doc = run_json("crew", "confirm", str(first), "--allow-overlap")
    assert doc["status"] == "confirmed" and status_of(second) == "confirmed"


def test_a_declined_assignment_with_no_clash_is_confirmed_again(office: SmtpSink) -> None:
    wedding, _concert, _ = overlapping_pair()
    person = add_person("Achieng", 1)
    first = assign(wedding, person)
    run_json("crew", "decline", str(first))
    assign(1, person)  # Breakfast: does not overlap the wedding
    assert run_json("crew", "confirm", str(first))["status"] == "confirmed"


def test_the_rsvp_page_refuses_a_confirm_that_now_clashes_and_says_to_call_the_office(
    rsvp_listener: str, office: SmtpSink
) -> None:
    wedding, concert, _ = overlapping_pair()
    person = add_person("Achieng", 1)
    first = assign(wedding, person)
    run_json("crew", "invite", str(first))
    link = rsvp_link(office.handler.messages[-1])
    assert requests.post(link, data={"answer": "decline"}, timeout=10).status_code == 200
    second = assign(concert, person)
    run_json("crew", "confirm", str(second))

    page = requests.post(link, data={"answer": "confirm"}, timeout=10)

    assert page.status_code == 409
    assert "Concert" in page.text and f"event {concert}" in page.text
    assert datetime.fromisoformat(day(5)).strftime("%A %d %B %Y") in page.text  # Concert's date
    assert "call the Sound Fusion office" in page.text
    assert '<a href="tel:+254711000111">0711 000 111</a>' in page.text
    assert "not valid" not in page.text
    assert status_of(first) == "declined" and status_of(second) == "confirmed"


# -- events in the past --------------------------------------------------------------------------


def test_events_add_refuses_a_date_already_over_unless_past(office: SmtpSink) -> None:
    result = run("events", "add", "--name", "Gala", "--date", day(-1), "--location", "KICC")

    assert result.exit_code == 4
    assert result.stderr.splitlines()[0] == f"Error: Gala would be over already ({day(-1)})"
    assert "--past" in result.stderr
    assert run_json("events", "list") == []
    add_event("Gala", day(-1), "--past")  # recording history
    add_event("Today's fair", day(0))  # lasts to the end of today: not over
    assert [e["name"] for e in run_json("events", "list")] == ["Gala", "Today's fair"]


def test_events_edit_moving_an_event_into_the_past_needs_past(office: SmtpSink) -> None:
    event = add_event("Gala", day(5), "--time", "18:00")

    result = run("events", "edit", str(event), "--date", day(-2))

    assert result.exit_code == 4 and "would be over already" in result.stderr
    assert "--past" in result.stderr
    assert run_json("events", "show", str(event))["date"] == day(5)
    doc = run_json("events", "edit", str(event), "--date", day(-2), "--past", "--quiet")
    assert doc["event"]["date"] == day(-2)
    # an event that is over already takes other corrections without --past
    assert run_json("events", "edit", str(event), "--name", "Gala 2026")["event"]["name"] == (
        "Gala 2026"
    )
    doc = run_json("events", "edit", str(event), "--location", "Safari Park", "--quiet")
    assert doc["event"]["location"] == "Safari Park"
    assert run("events", "edit", str(event), "--time", "19:00").exit_code == 4


def test_no_invitation_goes_out_for_an_event_that_is_over_and_attendance_stays_recordable(
    office: SmtpSink,
) -> None:
    event = add_event("Gala", day(3))
    achieng, baraka = add_person("Achieng", 1), add_person("Baraka", 2)
    confirmed, waiting = assign(event, achieng), assign(event, baraka)
    run_json("crew", "confirm", str(confirmed))
    run_json("events", "edit", str(event), "--date", day(-1), "--past", "--quiet")

    doc = run_json("crew", "invite", str(waiting))

    assert written(doc) == []
    assert reasons(doc, "skipped") == [(waiting, "the event is over")]
    assert office.handler.messages == []
    bulk = run("crew", "invite", "--event", str(event))
    assert bulk.exit_code == 6
    assert f"Error: Gala is over (event {event})" in bulk.stderr
    assert office.handler.messages == []
    # after the event, attendance is still recorded
    completed = run_json("crew", "complete", "--event", str(event))
    assert [(c["id"], c["status"]) for c in completed] == [(confirmed, "completed")]


# -- dates exactly YYYY-MM-DD ----------------------------------------------------------------------

OTHER_ISO_FORMS = [
    "20301212",
    "2030-W50-1",
    "2030-12-1",
    "2030-1-12",
    "12/12/2030",
    "2030-12-12T10",
]


@pytest.mark.parametrize("typed", OTHER_ISO_FORMS)
def test_every_date_option_takes_yyyy_mm_dd_only(office: SmtpSink, typed: str) -> None:
    event = add_event("Gala", "2030-12-12")
    for args in (
        ("events", "add", "--name", "X", "--location", "Y", "--date", typed),
        ("events", "edit", str(event), "--date", typed),
        ("mail", "list", "--since", typed),
    ):
        result = run(*args)
        assert result.exit_code == 4, (args, result.stdout)
        lines = result.stderr.splitlines()
        assert lines[0] == f"Error: date must be YYYY-MM-DD ({typed})", args
        assert lines[1].startswith("Hint: e.g. 2026-12-05"), args
    assert [e["date"] for e in run_json("events", "list")] == ["2030-12-12"]


# -- option values ---------------------------------------------------------------------------------


def test_an_unknown_mail_type_is_an_error_naming_the_types(office: SmtpSink) -> None:
    result = run("mail", "list", "--type", "invitation")
    assert result.exit_code == 4
    assert "unknown email type (invitation)" in result.stderr
    assert "crew_invitation" in result.stderr and "crew_reminder" in result.stderr
    assert run_json("mail", "list", "--type", "crew_cancellation") == []


def test_an_unknown_callback_outcome_is_an_error_naming_the_outcomes(office: SmtpSink) -> None:
    result = run("mpesa", "callbacks", "--outcome", "aplied")
    assert result.exit_code == 4
    assert "unknown outcome (aplied)" in result.stderr
    assert "applied" in result.stderr and "needs_review" in result.stderr
    as_json = run("mpesa", "callbacks", "--outcome", "aplied", "--json")
    assert as_json.exit_code == 4 and '"code": "INVALID_INPUT"' in as_json.stdout
    assert run_json("mpesa", "callbacks", "--outcome", "applied") == []


# -- sfcrm.toml ----------------------------------------------------------------------------------


def test_unknown_keys_and_sections_of_sfcrm_toml_warn_naming_the_nearest_key(
    office: SmtpSink, isolated: Path
) -> None:
    (isolated / "sfcrm.toml").write_text(
        'timezon = "Africa/Nairobi"\n'
        "[mpesa]\n"
        'enviroment = "production"\n'
        "[mpsea]\n"
        'environment = "production"\n'
        "[org]\n"
        'name = "Toml Events"\n'
        'colour = "blue"\n',
        encoding="utf-8",
    )

    result = run("config", "show", "--json")

    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert warnings == [
        "Warning: sfcrm.toml: unknown key timezon, ignored (did you mean timezone?)",
        "Warning: sfcrm.toml: unknown key mpesa.enviroment, ignored (did you mean "
        "mpesa.environment?)",
        "Warning: sfcrm.toml: unknown section [mpsea], ignored (did you mean [mpesa]?)",
        "Warning: sfcrm.toml: unknown key org.colour, ignored",
    ]
    assert '"Toml Events"' in result.stdout  # the known keys still count
    assert run("events", "list").exit_code == 0


def test_a_sfcrm_toml_of_known_keys_gives_no_warning(office: SmtpSink, isolated: Path) -> None:
    example = Path(__file__).parent.parent / "sfcrm.toml.example"
    # every key the example shows, commented out or not, is one sfcrm reads
    text = re.sub(r"^# ((?!templates_dir)\w+ = )", r"\1", example.read_text(encoding="utf-8"),
                  flags=re.M)  # fmt: skip
    text = text.replace('url = "sfcrm.db"', "")  # the test's own database stays in force
    (isolated / "sfcrm.toml").write_text(text, encoding="utf-8")
    result = run("events", "list")
    assert result.exit_code == 0, result.stderr
    assert "Warning" not in result.stderr
