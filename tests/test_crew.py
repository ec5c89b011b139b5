"""Events and the crew CRM, as the office uses them: through the CLI, with mail landing in a
real SMTP server on loopback (or the outbox folder when nothing is configured)."""

from __future__ import annotations

import email
import email.policy
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
from sqlalchemy import delete, func, update
from sqlmodel import col
from support import (
    SmtpSink,
    outcome,
    reasons,
    rsvp_link_in,
    rsvp_server,
    run,
    run_json,
    unstamped,
    written,
)

from sfcrm.db import Database
from sfcrm.models import EmailNotification, EventCrew

NAIROBI = ZoneInfo("Africa/Nairobi")


def day(offset: int) -> str:
    return (datetime.now(NAIROBI) + timedelta(days=offset)).date().isoformat()


def add_person(name: str, phone: str, email_address: str | None = None) -> dict[str, Any]:
    args = ["people", "add", "--name", name, "--phone", phone]
    if email_address:
        args += ["--email", email_address]
    doc: dict[str, Any] = run_json(*args)
    return doc


def add_event(name: str, date: str, *extra: str) -> dict[str, Any]:
    doc: dict[str, Any] = run_json(
        "events", "add", "--name", name, "--date", date, "--location", "KICC, Nairobi", *extra
    )
    return doc


@pytest.fixture(autouse=True)
def office(monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    """The office's database, for the CLI and the core alike: each test runs on each engine."""
    monkeypatch.setenv("SFCRM_DATABASE_URL", database_url)
    return database_url


@pytest.fixture
def smtp_env(monkeypatch: pytest.MonkeyPatch, smtp_sink: SmtpSink) -> SmtpSink:
    monkeypatch.setenv("EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")
    monkeypatch.setenv("EMAIL_HOST", "127.0.0.1")
    monkeypatch.setenv("EMAIL_PORT", str(smtp_sink.port))
    monkeypatch.setenv("DEFAULT_FROM_EMAIL", "Sound Fusion <office@soundfusion.test>")
    monkeypatch.setenv("SFCRM_ORG_PHONE", "0711000111")
    monkeypatch.setenv("SFCRM_ORG_EMAIL", "office@soundfusion.test")
    return smtp_sink


# -- events ------------------------------------------------------------------------------------


def test_event_json_has_the_documented_fields() -> None:
    doc = add_event("Gala", "2030-05-01", "--time", "18:00", "--end-time", "23:30",
                    "--details", "Black clothes")  # fmt: skip
    assert doc == {
        "id": 1, "name": "Gala", "date": "2030-05-01", "time": "18:00", "end_time": "23:30",
        "location": "KICC, Nairobi", "details": "Black clothes", "cancelled": False,
        "cancel_reason": None,
    }  # fmt: skip


BAD_EVENTS = [
    (["--date", "2030-13-01"], "Error: date must be YYYY-MM-DD (2030-13-01)"),
    (["--date", "2030-05-01", "--time", "25:00"], "Error: time must be HH:MM (24-hour) (25:00)"),
    (
        ["--date", "2030-05-01", "--end-time", "20:00"],
        "Error: an end time needs a start time (--time)",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD_EVENTS)
def test_events_add_refuses_bad_dates_and_times(args: list[str], message: str) -> None:
    result = run("events", "add", "--name", "X", "--location", "Y", *args)
    assert result.exit_code == 4
    assert result.stderr.splitlines()[0] == message
    assert run_json("events", "list") == []


def test_events_list_upcoming_leaves_out_past_events() -> None:
    add_event("Past", day(-3), "--past")
    add_event("Future", day(3))
    assert [e["name"] for e in run_json("events", "list")] == ["Past", "Future"]
    assert [e["name"] for e in run_json("events", "list", "--upcoming")] == ["Future"]


def test_events_show_includes_the_roster_with_status() -> None:
    add_event("Gala", day(5))
    add_person("Achieng", "0712000001", "a@x.co.ke")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound Engineer")
    doc = run_json("events", "show", "1")
    assert [(c["name"], c["role"], c["status"]) for c in doc["crew"]] == [
        ("Achieng", "Sound Engineer", "invited")
    ]


# -- assignments -------------------------------------------------------------------------------


def test_crew_assign_prints_the_assignment_with_every_documented_field() -> None:
    add_event("Gala", day(5))
    add_person("Achieng", "0712000001", "a@x.co.ke")
    doc = run_json("crew", "assign", "--event", "1", "--person", "a@x.co.ke",
                   "--role", "Sound Engineer", "--notes", "Bring the DI boxes")  # fmt: skip
    assert set(doc) == {
        "id", "event_id", "event", "person_id", "name", "email", "role", "status",
        "invitation_sent", "invitation_sent_at", "reminder_sent", "reminder_sent_at", "notes",
    }  # fmt: skip
    assert (doc["status"], doc["invitation_sent"], doc["notes"]) == (
        "invited",
        False,
        "Bring the DI boxes",
    )


def test_a_person_is_assigned_to_an_event_once() -> None:
    add_event("Gala", day(5))
    add_person("Achieng", "0712000001")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound")
    result = run("crew", "assign", "--event", "1", "--person", "1", "--role", "Lights")
    assert result.exit_code == 6
    assert "Achieng is already on Gala as Sound" in result.stderr


def test_overlapping_events_are_refused_with_the_clash_named() -> None:
    date = day(5)
    add_event("Wedding", date, "--time", "14:00", "--end-time", "20:00")
    add_event("Concert", date, "--time", "19:00", "--end-time", "23:00")
    add_event("Breakfast", date, "--time", "07:00", "--end-time", "10:00")
    add_person("Achieng", "0712000001")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound")
    result = run("crew", "assign", "--event", "2", "--person", "1", "--role", "Sound")
    assert result.exit_code == 6
    assert (
        f"Achieng is already on Wedding (event 1, {date} 14:00), which overlaps Concert (event 2)"
        in result.stderr
    )
    run_json("crew", "assign", "--event", "3", "--person", "1", "--role", "Sound")  # no overlap
    run_json("crew", "assign", "--event", "2", "--person", "1", "--role", "Sound",
             "--allow-overlap")  # fmt: skip


@pytest.mark.slow
def test_two_assignments_of_one_person_at_once_to_overlapping_events_leave_one() -> None:
    from support import finish, sfcrm_process

    date = day(5)
    add_event("Wedding", date, "--time", "14:00", "--end-time", "20:00")
    add_event("Concert", date, "--time", "19:00", "--end-time", "23:00")
    people = [add_person(f"Crew {n}", f"071200000{n}")["id"] for n in range(1, 4)]

    for person in people:  # three races: each has its chance to overlap
        assign = ["crew", "assign", "--person", str(person), "--role", "Sound", "--event"]
        procs = [sfcrm_process(*assign, event) for event in ("1", "2")]
        outputs = finish(procs)

        assert sorted(p.returncode for p in procs) == [0, 6], outputs
        assert sum("which overlaps" in err for _, err in outputs) == 1, outputs
    assert sorted(c["person_id"] for c in run_json("crew", "list")) == people


def test_events_on_one_date_without_times_overlap() -> None:
    add_event("Fair A", day(6))
    add_event("Fair B", day(6))
    add_event("Fair C", day(7))
    add_person("Achieng", "0712000001")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound")
    assert run("crew", "assign", "--event", "2", "--person", "1", "--role", "Sound").exit_code == 6
    run_json("crew", "assign", "--event", "3", "--person", "1", "--role", "Sound")


def test_a_declined_assignment_does_not_clash() -> None:
    add_event("Fair A", day(6))
    add_event("Fair B", day(6))
    add_person("Achieng", "0712000001")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound")
    run_json("crew", "decline", "1")
    run_json("crew", "assign", "--event", "2", "--person", "1", "--role", "Sound")


def test_crew_list_filters_and_searches() -> None:
    add_event("Gala", day(5))
    add_event("Rally", day(9))
    add_person("Achieng", "0712000001", "achieng@x.co.ke")
    add_person("Baraka", "0712000002", "baraka@x.co.ke")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound Engineer")
    run_json("crew", "assign", "--event", "1", "--person", "2", "--role", "Lighting Tech")
    run_json("crew", "assign", "--event", "2", "--person", "2", "--role", "Setup Lead")
    run_json("crew", "confirm", "2")
    assert len(run_json("crew", "list")) == 3
    assert [c["id"] for c in run_json("crew", "list", "--event", "1")] == [1, 2]
    assert [c["id"] for c in run_json("crew", "list", "--status", "confirmed")] == [2]
    for term, ids in (("lighting", [2]), ("RALLY", [3]), ("achieng@", [1]), ("baraka", [2, 3])):
        assert [c["id"] for c in run_json("crew", "list", "--search", term)] == ids, term
    assert run("crew", "list", "--status", "maybe").exit_code == 4


def test_confirm_decline_and_the_crew_members_own_view() -> None:
    add_event("Gala", day(5))
    add_event("Rally", day(9))
    add_event("Old show", day(-9), "--past")
    add_event("Fair", day(12))
    add_person("Achieng", "0712000001")
    for event in ("1", "2", "4"):
        run_json("crew", "assign", "--event", event, "--person", "1", "--role", "Sound")
    run_json("crew", "assign", "--event", "3", "--person", "1", "--role", "Sound", "--past")
    assert run_json("crew", "confirm", "1")["status"] == "confirmed"
    assert run_json("crew", "decline", "2")["status"] == "declined"
    view = run_json("crew", "assignments", "--person", "0712000001")
    assert [r["event"] for r in view["confirmed"]] == ["Old show", "Gala"]
    assert [r["event"] for r in view["declined"]] == ["Rally"]
    assert [r["event"] for r in view["pending"]] == ["Fair"]
    assert view["completed"] == []


def test_complete_after_the_event_moves_confirmed_crew_only() -> None:
    add_event("Old show", day(-2), "--past")
    add_event("Next show", day(4))
    add_person("Achieng", "0712000001")
    add_person("Baraka", "0712000002")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound", "--past")
    run_json("crew", "assign", "--event", "1", "--person", "2", "--role", "Lights", "--past")
    run_json("crew", "assign", "--event", "2", "--person", "1", "--role", "Sound")
    run_json("crew", "remove", "2")  # Baraka did not come after all
    declined = run("crew", "decline", "1")  # the event is over: too late to answer
    assert declined.exit_code == 6
    result = run("crew", "complete", "--event", "2")
    assert result.exit_code == 6
    assert "Next show has not ended yet" in result.stderr
    completed = run_json("crew", "complete", "--event", "1")
    assert [(c["id"], c["status"]) for c in completed] == [(1, "completed")]
    assert run_json("crew", "complete", "--event", "1") == []  # nobody confirmed left


def test_assigning_to_an_event_that_is_over_needs_past_and_records_who_worked_it(
    smtp_env: SmtpSink,
) -> None:
    add_event("Old show", day(-2), "--past")
    add_event("Next show", day(4))
    add_person("Achieng", "0712000001", "achieng@x.co.ke")

    refused = run("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound")
    assert refused.exit_code == 6
    assert refused.stderr.splitlines()[0] == "Error: Old show is over (event 1)"
    assert "--past" in refused.stderr
    assert run_json("crew", "list") == []
    early = run("crew", "assign", "--event", "2", "--person", "1", "--role", "Sound", "--past")
    assert early.exit_code == 4 and "Next show is not over" in early.stderr

    result = run("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound", "--past")

    assert result.exit_code == 0, result.stderr
    assert "`sfcrm crew complete --event 1` records the attendance" in result.stderr
    [doc] = run_json("crew", "list")
    assert (doc["status"], doc["invitation_sent"]) == ("confirmed", False)
    # never invited, reminded or briefed: nothing is written for it
    invite = run_json("crew", "invite", "1")
    assert reasons(invite, "skipped") == [(1, "the event is over")]
    assert written(run_json("crew", "remind", "--hours", "48")) == []
    brief = run("crew", "brief", "--event", "1")
    assert brief.exit_code == 6
    assert brief.stderr.splitlines()[0] == "Error: Old show is over (event 1)"
    assert run_json("mail", "list") == [] and smtp_env.handler.messages == []
    completed = run_json("crew", "complete", "--event", "1")
    assert [(c["id"], c["status"]) for c in completed] == [(1, "completed")]


# -- invitations -------------------------------------------------------------------------------


def test_invite_without_mail_settings_writes_eml_files_to_the_outbox(tmp_path: Path) -> None:
    add_event("Gala", day(5), "--time", "18:00")
    add_person("Achieng", "0712000001", "achieng@x.co.ke")
    add_person("No Email", "0712000002")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound Engineer")
    run_json("crew", "assign", "--event", "1", "--person", "2", "--role", "Rigger")
    result = run("crew", "invite", "--event", "1")
    assert result.exit_code == 0, result.stderr
    # nothing was sent: the file backend says where it wrote the email
    summary = unstamped(result.stdout).strip()
    assert summary == "Invitations: 1 written to outbox/, 0 failed, 1 skipped."
    [eml] = list((tmp_path / "outbox").glob("*.eml"))
    message = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
    assert message["Subject"] == "You are invited to work on: Gala"
    assert message["To"] == "achieng@x.co.ke"
    crew = run_json("crew", "list")
    assert crew[0]["invitation_sent"] is True and crew[0]["invitation_sent_at"]
    assert crew[1]["invitation_sent"] is False


def test_invite_sends_text_html_and_calendar_to_a_real_smtp_server(smtp_env: SmtpSink) -> None:
    add_event("Gala", day(5), "--time", "18:00", "--end-time", "23:00",
              "--details", "Load-in from 14:00")  # fmt: skip
    add_person("Achieng", "0712000001", "achieng@x.co.ke")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound Engineer",
             "--notes", "Bring the DI boxes")  # fmt: skip
    doc = run_json("crew", "invite", "1")
    assert len(outcome(doc, "sent")) == 1 and outcome(doc, "failed") == []
    [received] = smtp_env.handler.messages
    message = received.message
    assert message["Subject"] == "You are invited to work on: Gala"
    text = message.get_body(("plain",)).get_content()
    for expected in ("Dear Achieng", "Sound Engineer", "KICC, Nairobi", "Bring the DI boxes",
                     "Load-in from 14:00", "Reply to this email", "0711 000 111"):  # fmt: skip
        assert expected in text, expected
    assert "Sound Engineer" in message.get_body(("html",)).get_content()
    [calendar] = [p for p in message.iter_attachments() if p.get_content_type() == "text/calendar"]
    ics = calendar.get_content()
    assert "SUMMARY:Gala" in ics and "DTSTART:" in ics and "END:VEVENT" in ics
    # invited once: a second run sends nothing
    again = run_json("crew", "invite", "--event", "1")
    assert outcome(again, "sent") == [] and len(smtp_env.handler.messages) == 1
    assert run_json("mail", "list")[0]["notification_type"] == "crew_invitation"


def test_invite_dry_run_sends_and_records_nothing(smtp_env: SmtpSink) -> None:
    add_event("Gala", day(5))
    add_person("Achieng", "0712000001", "achieng@x.co.ke")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound")
    doc = run_json("crew", "invite", "--event", "1", "--dry-run")
    assert doc == {
        "results": [
            {"assignment_id": 1, "email_id": None, "outcome": "would_send",
             "message": "to achieng@x.co.ke: You are invited to work on: Gala"},
        ],
        "counts": {"would_send": 1}, "total": 1,
    }  # fmt: skip
    assert smtp_env.handler.messages == []
    assert run_json("mail", "list") == []
    assert run_json("crew", "list")[0]["invitation_sent"] is False


def test_invite_of_an_unknown_event_exits_5() -> None:
    result = run("crew", "invite", "--event", "9")
    assert result.exit_code == 5
    assert result.stderr.splitlines()[0] == "Error: no such event (9)"


def test_hostile_names_are_escaped_in_html_and_cannot_add_headers(smtp_env: SmtpSink) -> None:
    add_event("Gala <b>", day(5))
    add_person("<script>alert(1)</script>\r\nBcc: x@evil.test", "0712000001", "a@x.co.ke")
    run_json("crew", "assign", "--event", "1", "--person", "1",
             "--role", "Robert'); DROP TABLE person;--")  # fmt: skip
    run_json("crew", "invite", "--event", "1")
    [received] = smtp_env.handler.messages
    assert received.recipients == ["a@x.co.ke"]
    message = received.message
    assert message["Bcc"] is None
    html = message.get_body(("html",)).get_content()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Robert&#39;); DROP TABLE person;--" in html
    assert len(run_json("people", "list")) == 1  # the table is still there


# -- RSVP links --------------------------------------------------------------------------------


@pytest.fixture
def rsvp_listener(monkeypatch: pytest.MonkeyPatch, smtp_env: SmtpSink, tmp_path: Path) -> Any:
    """The listener with crew links on, on a loopback socket; yields its base URL."""
    with rsvp_server(monkeypatch) as base:
        yield base


def rsvp_link(smtp: SmtpSink) -> str:
    return rsvp_link_in(smtp.handler.messages[-1].message)


def test_rsvp_link_page_shows_the_event_and_changes_nothing_until_posted(
    rsvp_listener: str, smtp_env: SmtpSink
) -> None:
    add_event("Gala", day(5), "--time", "18:00")
    add_person("Achieng", "0712000001", "a@x.co.ke")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound")
    run_json("crew", "invite", "1")
    link = rsvp_link(smtp_env)
    page = requests.get(link, timeout=10)
    assert page.status_code == 200
    assert "Gala" in page.text and 'value="confirm"' in page.text
    assert run_json("crew", "list")[0]["status"] == "invited"
    done = requests.post(link, data={"answer": "confirm"}, timeout=10)
    assert done.status_code == 200 and "confirmed" in done.text
    assert run_json("crew", "list")[0]["status"] == "confirmed"
    requests.post(link, data={"answer": "decline"}, timeout=10)
    assert run_json("crew", "list")[0]["status"] == "declined"


def test_forged_or_tampered_rsvp_links_get_403(rsvp_listener: str, smtp_env: SmtpSink) -> None:
    add_event("Gala", day(5))
    add_person("Achieng", "0712000001", "a@x.co.ke")
    add_person("Baraka", "0712000002", "b@x.co.ke")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound")
    run_json("crew", "assign", "--event", "1", "--person", "2", "--role", "Lights")
    run_json("crew", "invite", "1")
    link = rsvp_link(smtp_env)
    base, token = link.rsplit("/", 1)
    assignment, expiry, signature = token.split(".")
    for forged in (
        f"2.{expiry}.{signature}",  # someone else's assignment
        f"{assignment}.{int(expiry) + 99999}.{signature}",  # a later expiry
        f"{assignment}.{expiry}.{signature[:-2]}AA",
        "1.9999999999.bm90IGEgc2lnbmF0dXJl",
        "garbage",
    ):
        for method in ("get", "post"):
            answer = getattr(requests, method)(f"{base}/{forged}", data={"answer": "confirm"},
                                               timeout=10)  # fmt: skip
            assert answer.status_code == 403, (forged, method)
    assert {c["status"] for c in run_json("crew", "list")} == {"invited"}


def test_expired_rsvp_link_gets_403(rsvp_listener: str, office: str) -> None:
    from sfcrm.rsvp import make_token

    add_event("Gala", day(5))
    add_person("Achieng", "0712000001", "a@x.co.ke")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound")
    now = datetime.now(UTC)
    token = make_token(
        "rsvp-test-secret-key", 1, bound_to(office, 1),
        now - timedelta(seconds=1), now - timedelta(days=1),
    )  # fmt: skip
    answer = requests.get(f"{rsvp_listener}/crew/rsvp/{token}", timeout=10)
    assert answer.status_code == 403 and "expired" in answer.text


@contextmanager
def database(url: str) -> Iterator[Database]:
    """The office's database, opened behind the CLI's back."""
    db = Database(url)
    try:
        yield db
    finally:
        db.close()


def bound_to(url: str, assignment_id: int) -> str:
    """The binding of the assignment now at ``assignment_id``, read behind sfcrm's back."""
    from sfcrm.rsvp import binding

    with database(url) as db, db.read() as session:
        crew = session.get(EventCrew, assignment_id)
        assert crew is not None
        return binding(crew.event_id, crew.person_id, crew.created_at)


def drop_assignment(url: str, assignment_id: int) -> None:
    """Delete an assignment the way a hand edit (or a future "remove" command) would; its
    logged emails stay, no longer pointing at it."""
    e = EmailNotification
    with database(url) as db, db.write() as session:
        session.exec(
            update(e).where(col(e.assignment_id) == assignment_id).values(assignment_id=None)
        )
        session.exec(delete(EventCrew).where(col(EventCrew.id) == assignment_id))


def test_rsvp_link_is_refused_once_its_assignment_id_belongs_to_another_assignment(
    rsvp_listener: str, smtp_env: SmtpSink, office: str, db_path: Path
) -> None:
    # (SQLite only: it hands a deleted last row's id to the next row; PostgreSQL never does)
    add_event("Gala", day(5))
    for n in range(1, 7):
        add_person(f"Crew {n}", f"071200000{n}", f"c{n}@x.co.ke")
    for n in range(1, 6):
        run_json("crew", "assign", "--event", "1", "--person", str(n), "--role", "Sound")
    run_json("crew", "invite", "5")
    old_link = rsvp_link(smtp_env)  # Crew 5's link, for assignment 5
    assert old_link.rsplit("/", 1)[1].startswith("5.")
    drop_assignment(office, 5)
    # SQLite gives the next row the id of the deleted last one
    again = run_json("crew", "assign", "--event", "1", "--person", "6", "--role", "Lights")
    assert again["id"] == 5 and again["name"] == "Crew 6"

    for method in ("get", "post"):
        answer = getattr(requests, method)(old_link, data={"answer": "decline"}, timeout=10)
        assert answer.status_code == 403, method
        assert "not a valid invitation link" in answer.text
        assert "Crew 6" not in answer.text and "Lights" not in answer.text
    assert run_json("crew", "list")[4]["status"] == "invited"

    run_json("crew", "invite", "5")  # the new assignment's own link works
    new_link = rsvp_link(smtp_env)
    assert new_link != old_link
    assert requests.post(new_link, data={"answer": "confirm"}, timeout=10).status_code == 200
    assert run_json("crew", "list")[4]["status"] == "confirmed"


def _raw_answer(base: str, request: str) -> tuple[int, dict[str, str], bytes]:
    """One request with Connection: close over a plain socket: status, headers, and every
    byte that came after the headers."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(base)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request.encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, rest = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, rest


def test_head_on_an_rsvp_page_sends_its_headers_and_no_body(
    rsvp_listener: str, smtp_env: SmtpSink
) -> None:
    add_event("Gala", day(5))
    add_person("Achieng", "0712000001", "a@x.co.ke")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound")
    run_json("crew", "invite", "1")
    path = "/crew/rsvp/" + rsvp_link(smtp_env).rsplit("/crew/rsvp/", 1)[1]
    request = "{} " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    status, headers, body = _raw_answer(rsvp_listener, request.format("GET"))
    assert status == 200 and "Gala" in body.decode()

    status, head_headers, after = _raw_answer(rsvp_listener, request.format("HEAD"))

    assert status == 200
    assert after == b""
    assert head_headers["content-type"] == "text/html; charset=utf-8"
    assert head_headers["content-length"] == headers["content-length"] == str(len(body))
    assert run_json("crew", "list")[0]["status"] == "invited"


def test_rsvp_page_is_served_only_under_crew_rsvp(rsvp_listener: str, smtp_env: SmtpSink) -> None:
    add_event("Gala", day(5))
    add_person("Achieng", "0712000001", "a@x.co.ke")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound")
    run_json("crew", "invite", "1")
    token = rsvp_link(smtp_env).rsplit("/crew/rsvp/", 1)[1]
    for elsewhere in (
        f"/x/crew/rsvp/{token}",
        f"/cb/crew/rsvp/{token}",
        f"/rsvp/{token}",
        f"/crew/{token}",
        f"/crew/rsvp/crew/rsvp/{token}",
        f"/CREW/RSVP/{token}",
    ):
        for method in ("get", "post"):
            answer = getattr(requests, method)(
                rsvp_listener + elsewhere, data={"answer": "confirm"}, timeout=10
            )
            assert answer.status_code == 404, (elsewhere, method)
            assert "Gala" not in answer.text
    assert run_json("crew", "list")[0]["status"] == "invited"
    assert requests.get(f"{rsvp_listener}/crew/rsvp/{token}", timeout=10).status_code == 200


def first_kind_token(secret: str, assignment_id: int, expiry: str) -> str:
    """A link as sfcrm signed them before links were bound: over the id and expiry only."""
    import base64
    import hashlib
    import hmac

    payload = f"{assignment_id}.{expiry}"
    digest = hmac.new(secret.encode(), b"sfcrm-rsvp:" + payload.encode(), hashlib.sha256)
    return f"{payload}.{base64.urlsafe_b64encode(digest.digest()[:18]).decode()}"


def test_link_emailed_before_links_were_bound_works_only_for_the_assignment_it_went_to(
    rsvp_listener: str, smtp_env: SmtpSink, office: str, db_path: Path
) -> None:
    # (SQLite only: the id reuse again)
    add_event("Gala", day(5))
    add_person("Achieng", "0712000001", "a@x.co.ke")
    add_person("Baraka", "0712000002", "b@x.co.ke")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound")
    run_json("crew", "assign", "--event", "1", "--person", "2", "--role", "Lights")
    run_json("crew", "invite", "1")
    link = rsvp_link(smtp_env)
    base, token = link.rsplit("/", 1)
    expiry = token.split(".")[1]
    old = first_kind_token("rsvp-test-secret-key", 1, expiry)
    with database(office) as db, db.write() as session:  # as the earlier sfcrm wrote it
        e = EmailNotification
        session.exec(update(e).values(message=func.replace(e.message, token, old)))

    assert requests.get(f"{base}/{old}", timeout=10).status_code == 200
    done = requests.post(f"{base}/{old}", data={"answer": "confirm"}, timeout=10)
    assert done.status_code == 200 and "confirmed" in done.text
    # of the same kind, but never sent for assignment 2
    never_sent = first_kind_token("rsvp-test-secret-key", 2, expiry)
    assert requests.get(f"{base}/{never_sent}", timeout=10).status_code == 403

    drop_assignment(office, 2)
    drop_assignment(office, 1)
    again = run_json("crew", "assign", "--event", "1", "--person", "2", "--role", "Stage")
    assert again["id"] == 1
    run_json("crew", "invite", "1")
    for method in ("get", "post"):
        answer = getattr(requests, method)(f"{base}/{old}", data={"answer": "decline"}, timeout=10)
        assert answer.status_code == 403 and "not a valid invitation link" in answer.text
    assert run_json("crew", "list")[0]["status"] == "invited"


def test_answer_by_link_is_not_recorded_on_an_assignment_that_replaced_the_linked_one(
    office: str, db_path: Path
) -> None:
    # the page checks the link, then records the answer: if the row changed in between, the
    # write itself refuses
    from sfcrm.cli.runtime import RootOptions, Runtime
    from sfcrm.errors import NotFoundError

    add_event("Gala", day(5))
    add_person("Achieng", "0712000001", "a@x.co.ke")
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Sound")
    linked = bound_to(office, 1)
    drop_assignment(office, 1)
    run_json("crew", "assign", "--event", "1", "--person", "1", "--role", "Stage")
    rt = Runtime(RootOptions(), json_output=False)
    try:
        with pytest.raises(NotFoundError):
            rt.crew.respond(1, "confirm", via="rsvp link", bound_to=linked)
        assert rt.crew.respond(1, "confirm", bound_to=bound_to(office, 1))
    finally:
        rt.close()
    assert run_json("crew", "list")[0]["status"] == "confirmed"


# -- an assignment made while its event is cancelled ---------------------------------------------


def test_an_assignment_made_while_its_event_is_being_cancelled_is_refused(
    database_url: str, engine_name: str
) -> None:
    # PostgreSQL: the cancellation has cancelled the event and its crew but not committed yet
    # when `crew assign` reads the event. Unlocked, the assignment read the event as it was
    # and was added, invited, on a cancelled event.
    if engine_name == "sqlite":
        pytest.skip("SQLite locks the whole file: the two never run at the same time")
    import threading

    from sqlalchemy import create_engine, text
    from support import services_for, wait_for

    from sfcrm.crew import cancel_assignments
    from sfcrm.errors import ConflictError
    from sfcrm.events import cancel_event

    add_event("Gala", day(5))
    add_person("Achieng", "0712000001")
    db = Database(database_url)
    watcher = create_engine(database_url)
    outcome: dict[str, Any] = {}

    def assign() -> None:
        try:
            outcome["row"] = services_for(database_url, db).crew.assign(1, "1", "Sound")
        except ConflictError as exc:
            outcome["error"] = exc

    def waiting_on_a_lock() -> bool:
        with watcher.connect() as conn:
            return bool(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'"
                    )
                ).scalar_one()
            )

    thread = threading.Thread(target=assign)
    try:
        with db.write() as session:
            cancel_event(session, 1, "client postponed", datetime.now(UTC))
            cancel_assignments(session, 1)
            thread.start()
            wait_for(lambda: not thread.is_alive() or waiting_on_a_lock())
        thread.join(30)
    finally:
        watcher.dispose()
        db.close()

    assert "row" not in outcome
    assert str(outcome["error"]) == "Gala is cancelled (event 1)"
    assert run_json("crew", "list") == []
