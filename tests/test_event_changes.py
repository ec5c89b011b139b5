"""Correcting what was entered: an event changed or cancelled, a crew member taken off it, as
the office does it through the CLI, with every email landing in a real SMTP server on
127.0.0.1 and the RSVP pages served by the real listener."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
from sqlalchemy import update
from support import SmtpSink, mail_office, outcome, reasons, rsvp_server, run, run_json, written

from sfcrm.db import Database
from sfcrm.models import Person

NAIROBI = ZoneInfo("Africa/Nairobi")


# -- helpers -----------------------------------------------------------------------------------


def at(delta: timedelta) -> tuple[str, str]:
    """Date and HH:MM in Nairobi, ``delta`` from now."""
    when = datetime.now(NAIROBI) + delta
    return when.date().isoformat(), when.strftime("%H:%M")


def add_event(name: str, delta: timedelta, *extra: str) -> int:
    date, time_of_day = at(delta)
    doc = run_json(
        "events", "add", "--name", name, "--date", date, "--time", time_of_day,
        "--location", "KICC, Nairobi", *extra,
    )  # fmt: skip
    return int(doc["id"])


def crew_member(event_id: int, name: str, n: int, *, status: str = "invited",
                invite: bool = True) -> int:  # fmt: skip
    """A person on the event; invited by email, then answered as ``status``."""
    person = run_json("people", "add", "--name", name, "--phone", f"071200000{n}",
                      "--email", f"{name.lower()}@example.co.ke")  # fmt: skip
    doc = run_json("crew", "assign", "--event", str(event_id), "--person", str(person["id"]),
                   "--role", "Sound Engineer")  # fmt: skip
    if invite:
        run_json("crew", "invite", str(doc["id"]))
    if status != "invited":
        run_json("crew", {"confirmed": "confirm", "declined": "decline"}[status], str(doc["id"]))
    return int(doc["id"])


def calendar(received: Any) -> dict[str, str]:
    """The calendar entry attached to a received email, property by property."""
    [part] = [p for p in received.message.iter_attachments()
              if p.get_content_type() == "text/calendar"]  # fmt: skip
    lines = part.get_content().replace("\r\n ", "").split("\r\n")
    return dict(line.split(":", 1) for line in lines if ":" in line)


def body(received: Any) -> str:
    text: str = received.message.get_body(("plain",)).get_content()
    return text


def sent_to(sink: SmtpSink, address: str) -> list[Any]:
    return [m for m in sink.handler.messages if address in m.recipients]


def status_of(assignment_id: int) -> dict[str, Any]:
    [doc] = [c for c in run_json("crew", "list") if c["id"] == assignment_id]
    return doc


ANSWERS = ("assignment.confirm", "assignment.decline")


def history(*args: str) -> list[dict[str, Any]]:
    """The audit log's changes, without the crew's answers the set-ups record (those are
    tested with the crew page)."""
    entries: list[dict[str, Any]] = run_json("history", *args)
    return [e for e in entries if e["action"] not in ANSWERS]


@pytest.fixture
def office(monkeypatch: pytest.MonkeyPatch, database_url: str, smtp_sink: SmtpSink) -> SmtpSink:
    """The office, its database on each engine, its mail going to a real SMTP server."""
    return mail_office(monkeypatch, database_url, smtp_sink)


# -- events edit -------------------------------------------------------------------------------


def test_a_new_date_tells_invited_and_confirmed_crew_with_an_update_of_their_calendar_entry(
    office: SmtpSink,
) -> None:
    event = add_event("Gala", timedelta(days=5), "--end-time", "23:30")
    confirmed = crew_member(event, "Achieng", 1, status="confirmed")
    invited = crew_member(event, "Baraka", 2)
    not_invited = crew_member(event, "Chebet", 3, invite=False)
    declined = crew_member(event, "Daudi", 4, status="declined")
    invitations = {m.recipients[0]: calendar(m) for m in office.handler.messages}
    new_date, _ = at(timedelta(days=6))

    doc = run_json("events", "edit", str(event), "--date", new_date, "--time", "19:00")

    assert doc["event"]["date"] == new_date and doc["event"]["time"] == "19:00"
    assert doc["changes"]["date"][1] == new_date and doc["changes"]["time"][1] == "19:00"
    assert len(doc["sent"]) == 2 and doc["failed"] == []
    assert sorted((s["assignment_id"], s["reason"]) for s in doc["skipped"]) == [
        (not_invited, "not invited yet"), (declined, "assignment is declined"),
    ]  # fmt: skip
    for assignment, address in ((confirmed, "achieng@example.co.ke"),
                                (invited, "baraka@example.co.ke")):  # fmt: skip
        [_, change] = sent_to(office, address)
        assert change.message["Subject"] == f"Changed: Gala - now {new_date}"
        text = body(change)
        assert "19:00" in text and "It was:" in text and "replaces the one you have" in text
        ics, before = calendar(change), invitations[address]
        assert ics["UID"] == before["UID"] == f"event-{event}-crew-{assignment}@sfcrm"
        assert int(ics["SEQUENCE"]) > int(before["SEQUENCE"])
        assert ics["METHOD"] == "PUBLISH"
        assert ics["DTSTART"] == new_date.replace("-", "") + "T160000Z"  # 19:00 in Nairobi
        assert "Sound Engineer" in change.message.get_body(("html",)).get_content()
    assert sent_to(office, "chebet@example.co.ke") == []
    assert len(sent_to(office, "daudi@example.co.ke")) == 1  # the invitation only
    [entry] = history("--event", str(event))
    assert entry["action"] == "event.edit"
    assert entry["changes"]["date"][1] == new_date
    assert entry["changes"]["time"][1] == "19:00"


def test_a_second_change_raises_the_sequence_again(office: SmtpSink) -> None:
    event = add_event("Gala", timedelta(days=5))
    crew_member(event, "Achieng", 1, status="confirmed")

    run_json("events", "edit", str(event), "--location", "Safari Park Hotel")
    run_json("events", "edit", str(event), "--time", "20:00")

    sequences = [int(calendar(m)["SEQUENCE"]) for m in office.handler.messages]
    assert sequences == sorted(set(sequences)) and len(sequences) == 3
    assert "It was at: KICC, Nairobi" in body(office.handler.messages[1])
    assert calendar(office.handler.messages[1])["LOCATION"] == "Safari Park Hotel"


def test_a_new_name_or_details_only_emails_nobody_and_says_so(office: SmtpSink) -> None:
    event = add_event("Gala", timedelta(days=5))
    crew_member(event, "Achieng", 1, status="confirmed")

    result = run("events", "edit", str(event), "--name", "Gala Dinner", "--details", "Black tie")

    assert result.exit_code == 0, result.stderr
    assert "nobody was emailed" in result.stdout
    assert len(office.handler.messages) == 1  # the invitation
    assert run_json("events", "show", str(event))["name"] == "Gala Dinner"
    [entry] = history("--event", str(event))
    assert entry["changes"] == {"name": ["Gala", "Gala Dinner"], "details": [None, "Black tie"]}


def test_quiet_edit_changes_the_event_and_emails_nobody(office: SmtpSink) -> None:
    event = add_event("Gala", timedelta(days=5))
    crew_member(event, "Achieng", 1, status="confirmed")

    result = run("events", "edit", str(event), "--time", "21:00", "--quiet")

    assert result.exit_code == 0, result.stderr
    assert "Nobody was emailed (--quiet)." in result.stdout
    assert len(office.handler.messages) == 1
    assert run_json("events", "show", str(event))["time"] == "21:00"
    assert [e["action"] for e in history("--event", str(event))] == ["event.edit"]


def test_edit_is_checked_as_add_is_and_changes_nothing_when_refused(office: SmtpSink) -> None:
    event = add_event("Gala", timedelta(days=5))
    for args, message in (
        (["--date", "2030-13-01"], "Error: date must be YYYY-MM-DD (2030-13-01)"),
        (["--time", "25:00"], "Error: time must be HH:MM (24-hour) (25:00)"),
        (["--time", "", "--end-time", "23:00"], "Error: an end time needs a start time (--time)"),
        (["--name", "  "], "Error: name must not be empty"),
    ):
        result = run("events", "edit", str(event), *args)
        assert result.exit_code == 4, (args, result.output)
        assert result.stderr.splitlines()[0] == message
    for args in (
        [],
        ["--quiet"],
        ["--past"],
    ):  # nothing to change: a usage error, as a missing option
        result = run("events", "edit", str(event), *args)
        assert result.exit_code == 2, (args, result.output)
        assert "give at least one of --name, --date" in result.stderr
    missing = run("events", "edit", "99", "--name", "X")
    assert missing.exit_code == 5 and missing.stderr.splitlines()[0] == "Error: no such event (99)"
    assert history() == []


def test_a_new_time_re_arms_the_reminders_so_crew_are_reminded_of_it(office: SmtpSink) -> None:
    event = add_event("Gala", timedelta(hours=3))
    assignment = crew_member(event, "Achieng", 1, status="confirmed")
    assert len(outcome(run_json("crew", "remind"), "sent")) == 1
    assert status_of(assignment)["reminder_sent"] is True
    assert outcome(run_json("crew", "remind"), "sent") == []
    day, later = at(timedelta(hours=5))  # (the date too: five hours on may be tomorrow)

    run_json("events", "edit", str(event), "--date", day, "--time", later)

    assert (status_of(assignment)["reminder_sent"], status_of(assignment)["reminder_sent_at"]) == (
        False, None,
    )  # fmt: skip
    assert len(outcome(run_json("crew", "remind"), "sent")) == 1
    reminder = office.handler.messages[-1]
    assert reminder.message["Subject"].startswith("Reminder: Gala") and later in body(reminder)


def test_a_change_that_makes_confirmed_crew_clash_names_each_clash_and_keeps_them(
    office: SmtpSink,
) -> None:
    wedding = add_event("Wedding", timedelta(days=5), "--end-time", "23:59")
    gala = add_event("Gala", timedelta(days=6))
    mine = crew_member(wedding, "Achieng", 1, status="confirmed")
    other = run_json("crew", "assign", "--event", str(gala), "--person", "1",
                     "--role", "Lights")["id"]  # fmt: skip
    run_json("crew", "confirm", str(other))
    date, time_of_day = at(timedelta(days=5))

    result = run("events", "edit", str(gala), "--date", date, "--time", time_of_day)

    assert result.exit_code == 0, result.stderr
    warning = f"Warning: Achieng (assignment {other}) is also on Wedding (event {wedding},"
    assert warning in result.stderr
    assert "which now overlaps Gala" in result.stderr
    assert status_of(other)["status"] == "confirmed" and status_of(mine)["status"] == "confirmed"
    doc = run_json("events", "edit", str(gala), "--location", "Safari Park")
    assert doc["clashes"] == [
        {"assignment_id": other, "name": "Achieng", "other_assignment_id": mine,
         "other_event_id": wedding, "other_event": "Wedding"},
    ]  # fmt: skip


def test_archived_crew_are_not_emailed_of_a_change(office: SmtpSink, database_url: str) -> None:
    event = add_event("Gala", timedelta(days=5))
    assignment = crew_member(event, "Achieng", 1, status="confirmed")
    db = Database(database_url)
    try:
        with db.write() as session:
            session.execute(update(Person).values(archived_at=datetime.now(UTC)))
    finally:
        db.close()

    doc = run_json("events", "edit", str(event), "--time", "21:00")

    assert doc["sent"] == []
    assert doc["skipped"] == [{"assignment_id": assignment, "reason": "Achieng is archived"}]
    assert len(office.handler.messages) == 1


def test_a_change_whose_email_fails_is_kept_exits_10_and_leaves_the_email_for_retry(
    office: SmtpSink,
) -> None:
    event = add_event("Gala", timedelta(days=5))
    crew_member(event, "Achieng", 1, status="confirmed")
    crew_member(event, "Baraka", 2, status="confirmed")
    office.handler.temp_fail.add("baraka@example.co.ke")

    result = run("events", "edit", str(event), "--time", "20:00")

    assert result.exit_code == 10
    assert "Crew told: 1 sent, 1 failed, 0 skipped." in result.stdout
    assert run_json("events", "show", str(event))["time"] == "20:00"
    assert [e["action"] for e in history("--event", str(event))] == ["event.edit"]
    office.handler.temp_fail.clear()
    assert len(outcome(run_json("mail", "retry"), "sent")) == 1
    change = sent_to(office, "baraka@example.co.ke")[-1]
    assert change.message["Subject"].startswith("Changed: Gala")


# -- events cancel -----------------------------------------------------------------------------


def test_cancel_tells_invited_and_confirmed_crew_with_a_calendar_cancellation(
    office: SmtpSink,
) -> None:
    event = add_event("Gala", timedelta(hours=5))
    confirmed = crew_member(event, "Achieng", 1, status="confirmed")
    invited = crew_member(event, "Baraka", 2)
    not_invited = crew_member(event, "Chebet", 3, invite=False)
    invitation = calendar(office.handler.messages[0])

    result = run("events", "cancel", str(event), "--reason", "client postponed")

    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"Cancelled event {event} (Gala)."
    assert "Crew told: 2 sent, 0 failed, 1 skipped." in result.stdout
    [_, cancellation] = sent_to(office, "achieng@example.co.ke")
    assert cancellation.message["Subject"].startswith("Cancelled: Gala - ")
    assert "has been cancelled" in body(cancellation)
    assert "client postponed" not in body(cancellation)  # the reason is the office's
    ics = calendar(cancellation)
    assert ics["METHOD"] == "CANCEL" and ics["STATUS"] == "CANCELLED"
    assert ics["UID"] == invitation["UID"]
    assert int(ics["SEQUENCE"]) > int(invitation["SEQUENCE"])
    assert len(sent_to(office, "baraka@example.co.ke")) == 2
    assert sent_to(office, "chebet@example.co.ke") == []
    assert {status_of(a)["status"] for a in (confirmed, invited, not_invited)} == {"cancelled"}
    [entry] = history("--event", str(event))
    assert (entry["action"], entry["reason"]) == ("event.cancel", "client postponed")

    # marked in the lists, and no reminder, briefing or invitation goes out for it
    [listed] = run_json("events", "list")
    assert listed["cancelled"] is True and listed["cancel_reason"] == "client postponed"
    assert "CANCELLED" in run("events", "list").stdout
    assert run_json("events", "show", str(event))["cancelled"] is True
    assert written(run_json("crew", "remind", "--hours", "48")) == []
    brief = run("crew", "brief", "--event", str(event))
    assert brief.exit_code == 6 and brief.stderr.splitlines()[0] == (
        f"Error: Gala is cancelled (event {event})"
    )
    invite = run_json("crew", "invite", "--event", str(event))
    assert written(invite) == [] and {why for _, why in reasons(invite, "skipped")} == {
        "invitation already sent", "assignment is cancelled",
    }  # fmt: skip
    confirm = run("crew", "confirm", str(invited))
    assert confirm.exit_code == 6
    assert confirm.stderr.splitlines()[0] == f"Error: Gala was cancelled (assignment {invited})"
    assert len(office.handler.messages) == 4
    again = run("events", "cancel", str(event))
    assert again.exit_code == 6 and "already cancelled" in again.stderr
    late = run("crew", "assign", "--event", str(event), "--person", "3", "--role", "Runner")
    assert late.exit_code == 6
    assert late.stderr.splitlines()[0] == f"Error: Gala is cancelled (event {event})"


def test_quiet_cancel_emails_nobody(office: SmtpSink) -> None:
    event = add_event("Gala", timedelta(days=5))
    assignment = crew_member(event, "Achieng", 1, status="confirmed")

    doc = run_json("events", "cancel", str(event), "--quiet")

    assert doc["emailed"] is False and doc["sent"] == []
    assert len(office.handler.messages) == 1
    assert status_of(assignment)["status"] == "cancelled"


def test_a_cancelled_event_cannot_be_edited(office: SmtpSink) -> None:
    event = add_event("Gala", timedelta(days=5))
    run_json("events", "cancel", str(event))

    result = run("events", "edit", str(event), "--time", "20:00")

    assert result.exit_code == 6
    assert result.stderr.splitlines()[0] == f"Error: Gala is cancelled (event {event})"


@pytest.fixture
def rsvp_listener(monkeypatch: pytest.MonkeyPatch, office: SmtpSink) -> Iterator[str]:
    """The listener with crew links on, on a loopback socket; yields its base URL."""
    with rsvp_server(monkeypatch) as base:
        yield base


def rsvp_link(received: Any) -> str:
    match = re.search(r"(http://\S+/crew/rsvp/\S+)", body(received))
    assert match, body(received)
    return match.group(1)


def test_rsvp_link_of_a_cancelled_event_says_cancelled_and_changes_nothing(
    rsvp_listener: str, office: SmtpSink
) -> None:
    event = add_event("Gala", timedelta(days=5))
    assignment = crew_member(event, "Achieng", 1)
    link = rsvp_link(office.handler.messages[0])
    run_json("events", "cancel", str(event))

    page = requests.get(link, timeout=10)
    answer = requests.post(link, data={"answer": "confirm"}, timeout=10)

    assert page.status_code == 200
    assert "Gala was cancelled" in page.text and 'value="confirm"' not in page.text
    assert answer.status_code == 409 and "Gala was cancelled" in answer.text
    assert status_of(assignment)["status"] == "cancelled"


def test_a_change_email_carries_a_working_rsvp_link(rsvp_listener: str, office: SmtpSink) -> None:
    event = add_event("Gala", timedelta(days=5))
    assignment = crew_member(event, "Achieng", 1, status="confirmed")
    run_json("events", "edit", str(event), "--time", "10:00")

    answer = requests.post(rsvp_link(office.handler.messages[-1]), data={"answer": "decline"},
                           timeout=10)  # fmt: skip

    assert answer.status_code == 200
    assert status_of(assignment)["status"] == "declined"


# -- crew remove -------------------------------------------------------------------------------


def test_remove_tells_an_invited_crew_member_and_cancels_their_calendar_entry(
    rsvp_listener: str, office: SmtpSink
) -> None:
    event = add_event("Gala", timedelta(days=5))
    assignment = crew_member(event, "Achieng", 1, status="confirmed")
    link = rsvp_link(office.handler.messages[0])
    invitation = calendar(office.handler.messages[0])

    result = run("crew", "remove", str(assignment))

    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == "Removed Achieng (Sound Engineer) from Gala."
    assert "Crew told: 1 sent, 0 failed, 0 skipped." in result.stdout
    removal = office.handler.messages[-1]
    assert removal.message["Subject"].startswith("No longer needed: Gala - ")
    assert "no longer needed as Sound Engineer" in body(removal)
    ics = calendar(removal)
    assert (ics["METHOD"], ics["STATUS"], ics["UID"]) == ("CANCEL", "CANCELLED", invitation["UID"])
    assert int(ics["SEQUENCE"]) > int(invitation["SEQUENCE"])
    assert status_of(assignment)["status"] == "removed"
    [entry] = history("--event", str(event))
    assert (entry["action"], entry["assignment_id"]) == ("assignment.remove", assignment)
    assert entry["changes"] == {"status": ["confirmed", "removed"]}
    page = requests.post(link, data={"answer": "confirm"}, timeout=10)
    assert page.status_code == 409 and "no longer on Gala" in page.text
    assert status_of(assignment)["status"] == "removed"
    again = run("crew", "remove", str(assignment))
    assert again.exit_code == 6 and "is removed" in again.stderr


def test_remove_of_someone_never_invited_or_quiet_emails_nobody(office: SmtpSink) -> None:
    event = add_event("Gala", timedelta(days=5))
    never = crew_member(event, "Achieng", 1, invite=False)
    invited = crew_member(event, "Baraka", 2)

    first = run_json("crew", "remove", str(never))
    second = run_json("crew", "remove", str(invited), "--quiet")

    assert first["sent"] == [] and first["skipped"] == [
        {"assignment_id": never, "reason": "not invited yet"}
    ]
    assert second["emailed"] is False and second["sent"] == []
    assert (second["assignment"]["id"], second["assignment"]["status"]) == (invited, "removed")
    assert len(office.handler.messages) == 1  # Baraka's invitation
    assert {status_of(a)["status"] for a in (never, invited)} == {"removed"}
    own = run_json("crew", "assignments", "--person", "1")  # no longer theirs to see
    assert [own[group] for group in ("pending", "confirmed", "completed", "declined")] == [[]] * 4


def test_assigning_a_removed_crew_member_again_puts_the_same_assignment_back(
    office: SmtpSink,
) -> None:
    event = add_event("Gala", timedelta(days=5))
    assignment = crew_member(event, "Achieng", 1, status="confirmed")
    run_json("crew", "remove", str(assignment))
    cancelled = calendar(office.handler.messages[-1])

    doc = run_json("crew", "assign", "--event", str(event), "--person", "1", "--role", "Lights")

    assert (doc["id"], doc["status"], doc["role"]) == (assignment, "invited", "Lights")
    assert doc["invitation_sent"] is False
    assert len(outcome(run_json("crew", "invite", str(assignment)), "sent")) == 1
    invitation = calendar(office.handler.messages[-1])
    assert invitation["UID"] == cancelled["UID"] and invitation["METHOD"] == "PUBLISH"
    assert int(invitation["SEQUENCE"]) > int(cancelled["SEQUENCE"])
    duplicate = run("crew", "assign", "--event", str(event), "--person", "1", "--role", "X")
    assert duplicate.exit_code == 6


def test_a_removed_assignment_or_a_cancelled_event_no_longer_holds_the_time(
    office: SmtpSink,
) -> None:
    wedding = add_event("Wedding", timedelta(days=5))
    gala = add_event("Gala", timedelta(days=5))
    party = add_event("Party", timedelta(days=5))
    removed = crew_member(wedding, "Achieng", 1, invite=False)
    run_json("crew", "assign", "--event", str(gala), "--person", "1",
             "--role", "Lights", code=6)  # fmt: skip
    run_json("crew", "remove", str(removed))

    run_json("crew", "assign", "--event", str(gala), "--person", "1", "--role", "Lights")
    run_json("events", "cancel", str(gala), "--quiet")
    run_json("crew", "assign", "--event", str(party), "--person", "1", "--role", "Lights")


# -- emails written before a change and not sent yet -----------------------------------------


def not_retried(doc: dict[str, Any]) -> list[tuple[str, list[int], str | None]]:
    """(reason, email ids, the command that forces them or None) of what a retry left alone."""
    groups: dict[str, list[int]] = {}
    for email_id, message in reasons(doc, "not_retried", key="email_id"):
        groups.setdefault(message, []).append(email_id)
    found = []
    for message, ids in groups.items():
        reason, _, force = message.partition(" — `")
        found.append((reason, ids, force.removesuffix("` to force") or None))
    return found


def state_of(email_id: int) -> str:
    [doc] = [e for e in run_json("mail", "list") if e["id"] == email_id]
    return str(doc["state"])


def test_an_old_reminder_not_sent_before_the_event_moved_is_superseded_and_never_sent(
    office: SmtpSink,
) -> None:
    event = add_event("Gala", timedelta(hours=3))
    assignment = crew_member(event, "Achieng", 1, status="confirmed")
    office.handler.temp_fail.add("achieng@example.co.ke")
    assert run("crew", "remind").exit_code == 10  # written, and its send failed
    [old] = [e["id"] for e in run_json("mail", "list", "--unsent")]
    office.handler.temp_fail.clear()
    day, later = at(timedelta(hours=5))
    run_json("events", "edit", str(event), "--date", day, "--time", later, "--quiet")

    retried = run_json("mail", "retry")
    named = run_json("mail", "retry", str(old))

    assert outcome(retried, "sent") == [] and outcome(named, "sent") == []
    [(reason, ids, force)] = not_retried(retried)
    assert reason.startswith("superseded by the change of ") and "+03:00" in reason
    assert (ids, force) == ([old], None)  # not even by naming it
    assert [i["email_id"] for i in named["results"]] == [old]
    assert outcome(named, "sent") == []
    assert state_of(old) == "superseded"
    assert f"next: never sent: {reason}" in run("mail", "show", str(old)).stdout
    assert len(office.handler.messages) == 1  # the invitation only
    assert status_of(assignment)["reminder_sent"] is False
    summary = run("mail", "retry").stdout
    assert f"1 not retried: {reason} — email {old}" in summary
    # the reminder of the new time goes out as ever
    assert len(outcome(run_json("crew", "remind"), "sent")) == 1
    assert later in body(office.handler.messages[-1])
    assert status_of(assignment)["reminder_sent"] is True


def test_an_invitation_not_sent_before_the_event_moved_is_written_again_with_the_new_time(
    office: SmtpSink,
) -> None:
    event = add_event("Gala", timedelta(days=5))
    told = crew_member(event, "Achieng", 1, status="confirmed")
    office.handler.temp_fail.add("baraka@example.co.ke")
    waiting = crew_member(event, "Baraka", 2, invite=False)
    assert run("crew", "invite", str(waiting)).exit_code == 10
    [old] = [e["id"] for e in run_json("mail", "list", "--unsent")]
    office.handler.temp_fail.clear()

    doc = run_json("events", "edit", str(event), "--time", "21:15")

    assert len(doc["sent"]) == 2 and doc["skipped"] == []
    [invitation] = sent_to(office, "baraka@example.co.ke")
    assert invitation.message["Subject"] == "You are invited to work on: Gala"
    assert "21:15" in body(invitation) and "It was:" not in body(invitation)
    [_, change] = sent_to(office, "achieng@example.co.ke")
    assert change.message["Subject"].startswith("Changed: Gala")
    assert state_of(old) == "superseded"
    assert outcome(run_json("mail", "retry"), "sent") == []
    assert len(sent_to(office, "baraka@example.co.ke")) == 1
    assert status_of(waiting)["invitation_sent"] is True
    assert status_of(told)["status"] == "confirmed"


def test_an_invitation_not_sent_before_a_cancellation_never_goes_and_nor_does_a_cancellation(
    office: SmtpSink,
) -> None:
    event = add_event("Gala", timedelta(days=5))
    crew_member(event, "Achieng", 1, status="confirmed")
    office.handler.temp_fail.add("baraka@example.co.ke")
    waiting = crew_member(event, "Baraka", 2, invite=False)
    assert run("crew", "invite", str(waiting)).exit_code == 10
    [old] = [e["id"] for e in run_json("mail", "list", "--unsent")]
    office.handler.temp_fail.clear()

    doc = run_json("events", "cancel", str(event))

    assert len(doc["sent"]) == 1
    assert doc["skipped"] == [{"assignment_id": waiting, "reason": "not invited yet"}]
    [_, cancellation] = sent_to(office, "achieng@example.co.ke")
    assert cancellation.message["Subject"].startswith("Cancelled: Gala")
    retried = run_json("mail", "retry")
    assert outcome(retried, "sent") == [] and sent_to(office, "baraka@example.co.ke") == []
    [(reason, ids, _)] = not_retried(retried)
    assert reason.startswith("superseded by the cancellation of ") and ids == [old]
    assert state_of(old) == "superseded"


def test_a_quiet_cancellation_supersedes_the_unsent_invitations_too(office: SmtpSink) -> None:
    event = add_event("Gala", timedelta(days=5))
    office.handler.temp_fail.add("achieng@example.co.ke")
    waiting = crew_member(event, "Achieng", 1, invite=False)
    assert run("crew", "invite", str(waiting)).exit_code == 10
    office.handler.temp_fail.clear()

    run_json("events", "cancel", str(event), "--quiet")

    assert outcome(run_json("mail", "retry"), "sent") == [] and office.handler.messages == []


def test_removing_someone_whose_invitation_was_not_sent_emails_them_nothing(
    office: SmtpSink,
) -> None:
    event = add_event("Gala", timedelta(days=5))
    office.handler.temp_fail.add("achieng@example.co.ke")
    waiting = crew_member(event, "Achieng", 1, invite=False)
    assert run("crew", "invite", str(waiting)).exit_code == 10
    [old] = [e["id"] for e in run_json("mail", "list", "--unsent")]
    office.handler.temp_fail.clear()

    doc = run_json("crew", "remove", str(waiting))

    assert doc["sent"] == []
    assert doc["skipped"] == [{"assignment_id": waiting, "reason": "not invited yet"}]
    retried = run_json("mail", "retry")
    assert outcome(retried, "sent") == [] and office.handler.messages == []
    assert not_retried(retried)[0][0].startswith("superseded by the removal of ")
    assert state_of(old) == "superseded"


def test_a_briefing_not_sent_before_the_event_moved_is_written_again_by_the_next_brief(
    office: SmtpSink,
) -> None:
    event = add_event("Gala", timedelta(days=5))
    crew_member(event, "Achieng", 1, status="confirmed")
    office.handler.temp_fail.add("achieng@example.co.ke")
    assert run("crew", "brief", "--event", str(event)).exit_code == 10
    office.handler.temp_fail.clear()
    run_json("events", "edit", str(event), "--time", "22:45", "--quiet")

    doc = run_json("crew", "brief", "--event", str(event))  # no --again: it never went out

    assert len(outcome(doc, "sent")) == 1
    briefing = office.handler.messages[-1]
    assert briefing.message["Subject"] == "Setup Briefing: Gala" and "22:45" in body(briefing)
    assert outcome(run_json("mail", "retry"), "sent") == []
    assert len(office.handler.messages) == 2  # the invitation, the new briefing
