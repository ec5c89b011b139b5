"""Crew emails and the mail log end to end, as the office and cron use them: ``crew remind``,
``crew brief``, ``crew invite``, ``mail list/show/retry`` through the CLI (and as separate
processes where runs overlap), every message landing in a real SMTP server on 127.0.0.1 whose
faults the tests switch: stopped mid-batch, 451 or 550 for chosen recipients, a refused login.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiosmtpd.smtp import AuthResult
from sqlalchemy import event, update
from sqlmodel import col
from support import (
    Recorder,
    SmtpSink,
    finish,
    outcome,
    reasons,
    recipients,
    run,
    run_json,
    sfcrm_process,
    unstamped,
    wait_for,
    written,
)

from sfcrm.cli.runtime import RootOptions, Runtime
from sfcrm.db import Database
from sfcrm.mail import DEFAULT_LEASE, INTERRUPTED, Mailer, SmtpBackend
from sfcrm.models import EmailNotification, EventCrew
from sfcrm.phone import display

NAIROBI = ZoneInfo("Africa/Nairobi")
CANARY = "CANARY-smtp-pw-7c41d0e2"


# -- helpers -----------------------------------------------------------------------------------


def day(offset: int) -> str:
    return (datetime.now(NAIROBI) + timedelta(days=offset)).date().isoformat()


def at(delta: timedelta) -> tuple[str, str]:
    """Date and HH:MM in Nairobi, ``delta`` from now."""
    when = datetime.now(NAIROBI) + delta
    return when.date().isoformat(), when.strftime("%H:%M")


def add_event(name: str, delta: timedelta, *extra: str) -> dict[str, Any]:
    date, time_of_day = at(delta)
    doc: dict[str, Any] = run_json(
        "events", "add", "--name", name, "--date", date, "--time", time_of_day,
        "--location", "KICC, Nairobi", *extra,
    )  # fmt: skip
    return doc


def add_person(name: str, phone: str, email_address: str) -> dict[str, Any]:
    doc: dict[str, Any] = run_json(
        "people", "add", "--name", name, "--phone", phone, "--email", email_address
    )
    return doc


def assign(event_id: int, person_id: int, role: str, status: str = "invited") -> int:
    doc = run_json("crew", "assign", "--event", str(event_id), "--person", str(person_id),
                   "--role", role)  # fmt: skip
    if status != "invited":
        run_json("crew", {"confirmed": "confirm", "declined": "decline"}[status], str(doc["id"]))
    return int(doc["id"])


@contextmanager
def core() -> Iterator[Runtime]:
    """The services the CLI uses, with the same settings, for quick bulk set-up."""
    rt = Runtime(RootOptions(), json_output=False)
    try:
        yield rt
    finally:
        rt.close()


def seed_crew(event_id: int, count: int, *, confirmed: bool, first: int = 0) -> list[str]:
    """``count`` people on the event (crew{first}@… upwards); returns their addresses."""
    addresses = []
    with core() as rt:
        for n in range(first, first + count):
            address = f"crew{n}@example.co.ke"
            person = rt.people.add(f"Crew {n}", f"0712{n:06d}", address)
            row = rt.crew.assign(event_id, str(person.id), "Stagehand")
            assert row.crew.id is not None
            if confirmed:
                rt.crew.respond(row.crew.id, "confirm")
            addresses.append(address)
    return addresses


def use_smtp(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    monkeypatch.setenv("EMAIL_BACKEND", "smtp")
    monkeypatch.setenv("EMAIL_HOST", "127.0.0.1")
    monkeypatch.setenv("EMAIL_PORT", str(port))


def body(received: Any) -> str:
    text: str = received.message.get_body(("plain",)).get_content()
    return text


@pytest.fixture
def office(monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    """The office's settings: one database for the CLI, the core and child processes."""
    monkeypatch.setenv("SFCRM_DATABASE_URL", database_url)
    monkeypatch.setenv("DEFAULT_FROM_EMAIL", "Sound Fusion <office@soundfusion.test>")
    monkeypatch.setenv("SFCRM_ORG_NAME", "Sound Fusion Events Ltd")
    monkeypatch.setenv("SFCRM_ORG_PHONE", "0711000111")
    monkeypatch.setenv("SFCRM_ORG_EMAIL", "bookings@soundfusion.test")
    return database_url


@pytest.fixture
def smtp_env(monkeypatch: pytest.MonkeyPatch, office: str, smtp_sink: SmtpSink) -> SmtpSink:
    use_smtp(monkeypatch, smtp_sink.port)
    return smtp_sink


@dataclass
class CountingRecorder(Recorder):
    """Also remembers every RCPT TO it was asked, accepted or not: a refused recipient leaves
    no message behind, so this is how a test sees whether it was tried again."""

    asked: list[str] = field(default_factory=list)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.asked.append(address)
        return await super().handle_RCPT(server, session, envelope, address, options)


@pytest.fixture
def counting_smtp(monkeypatch: pytest.MonkeyPatch, office: str) -> Iterator[SmtpSink]:
    sink = SmtpSink(CountingRecorder())
    sink.handler.on_stop = sink.stop
    sink.start()
    use_smtp(monkeypatch, sink.port)
    yield sink
    sink.stop()


# -- crew remind -------------------------------------------------------------------------------


def test_remind_emails_only_confirmed_crew_of_events_starting_within_the_window_once(
    smtp_env: SmtpSink,
) -> None:
    soon = add_event("Soon Gala", timedelta(hours=2))
    add_event("Far Gala", timedelta(hours=30))
    _, end = at(timedelta(hours=3))
    add_event("Started Gala", timedelta(hours=-1), "--end-time", end)
    names = ["Achieng", "Baraka", "Chebet", "Daudi", "Esther"]
    for n, name in enumerate(names, start=1):
        add_person(name, f"071200000{n}", f"{name.lower()}@example.co.ke")
    assign(1, 1, "Sound Engineer", "confirmed")
    assign(1, 2, "Lighting Tech")  # invited, never answered
    assign(1, 3, "Rigger", "declined")
    assign(2, 4, "Sound Engineer", "confirmed")  # 30 h away
    assign(3, 5, "Sound Engineer", "confirmed")  # already started

    doc = run_json("crew", "remind")

    assert len(outcome(doc, "sent")) == 1 and outcome(doc, "failed") == []
    [received] = smtp_env.handler.messages
    assert received.recipients == ["achieng@example.co.ke"]
    assert received.message["Subject"] == f"Reminder: Soon Gala - {soon['date']}"
    crew = {c["name"]: c for c in run_json("crew", "list")}
    assert crew["Achieng"]["reminder_sent"] is True
    assert datetime.fromisoformat(crew["Achieng"]["reminder_sent_at"]) <= datetime.now(NAIROBI)
    for name in names[1:]:
        assert (crew[name]["reminder_sent"], crew[name]["reminder_sent_at"]) == (False, None)

    again = run_json("crew", "remind")
    assert again == {"results": [], "counts": {}, "total": 0}
    assert len(smtp_env.handler.messages) == 1

    # a wider window takes in the event 30 h away, but never the one that has started
    wider = run_json("crew", "remind", "--hours", "48")
    assert len(outcome(wider, "sent")) == 1
    assert recipients(smtp_env) == ["achieng@example.co.ke", "daudi@example.co.ke"]


def test_remind_event_option_reminds_that_event_only(smtp_env: SmtpSink) -> None:
    add_event("Wedding", timedelta(hours=3))
    add_event("Concert", timedelta(hours=5))
    add_person("Achieng", "0712000001", "achieng@example.co.ke")
    add_person("Baraka", "0712000002", "baraka@example.co.ke")
    assign(1, 1, "Sound", "confirmed")
    assign(2, 2, "Sound", "confirmed")

    assert len(outcome(run_json("crew", "remind", "--event", "2"), "sent")) == 1
    assert recipients(smtp_env) == ["baraka@example.co.ke"]
    assert [c["reminder_sent"] for c in run_json("crew", "list")] == [False, True]

    assert len(outcome(run_json("crew", "remind"), "sent")) == 1
    assert recipients(smtp_env) == ["baraka@example.co.ke", "achieng@example.co.ke"]


def test_remind_dry_run_sends_and_records_nothing(smtp_env: SmtpSink) -> None:
    soon = add_event("Gala", timedelta(hours=4))
    add_person("Achieng", "0712000001", "achieng@example.co.ke")
    assign(1, 1, "Sound", "confirmed")

    doc = run_json("crew", "remind", "--dry-run")

    assert reasons(doc, "would_send") == [
        (1, f"to achieng@example.co.ke: Reminder: Gala - {soon['date']}")
    ]
    assert smtp_env.handler.messages == []
    assert run_json("mail", "list") == []
    assert run_json("crew", "list")[0]["reminder_sent"] is False
    # nothing was taken: the real run still sends it
    assert len(outcome(run_json("crew", "remind"), "sent")) == 1


@pytest.mark.parametrize("hours", ["0", "-1"])
def test_remind_refuses_hours_that_are_not_positive(smtp_env: SmtpSink, hours: str) -> None:
    add_event("Gala", timedelta(hours=4))
    add_person("Achieng", "0712000001", "achieng@example.co.ke")
    assign(1, 1, "Sound", "confirmed")

    result = run("crew", "remind", "--hours", hours)

    assert result.exit_code == 4
    assert result.stderr.splitlines()[0] == f"Error: --hours must be positive ({hours})"
    assert smtp_env.handler.messages == []
    assert run_json("mail", "list") == []


def test_two_remind_processes_at_once_send_one_reminder_per_person(smtp_env: SmtpSink) -> None:
    add_event("Safari Rally Gala", timedelta(hours=3))
    addresses = seed_crew(1, 30, confirmed=True)
    smtp_env.handler.delay = 0.01  # keep both runs busy long enough to overlap

    procs = [sfcrm_process("crew", "remind", "--json") for _ in range(2)]
    outputs = finish(procs)

    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    first, second = (json.loads(out) for out, _ in outputs)
    assert set(outcome(first, "sent")).isdisjoint(outcome(second, "sent"))
    assert len(outcome(first, "sent")) + len(outcome(second, "sent")) == 30
    assert sorted(recipients(smtp_env)) == sorted(addresses)
    assert len(set(smtp_env.handler.message_ids())) == 30
    assert all(c["reminder_sent"] for c in run_json("crew", "list"))


def test_remind_passes_over_an_assignment_another_run_holds_instead_of_waiting(
    smtp_env: SmtpSink, office: str
) -> None:
    if "://" not in office:
        pytest.skip("SQLite locks the whole file: there a run waits for the other writer")
    add_event("Safari Rally Gala", timedelta(hours=3))
    addresses = seed_crew(1, 2, confirmed=True)
    other = Database(office)  # another run, mid-way through writing the first reminder
    try:
        with other.write() as session:
            assert session.get(EventCrew, 1, with_for_update=True)
            started = time.monotonic()
            doc = run_json("crew", "remind")
            waited = time.monotonic() - started
    finally:
        other.close()

    assert len(outcome(doc, "sent")) == 1 and outcome(doc, "skipped") == []
    assert recipients(smtp_env) == addresses[1:]
    assert waited < 10  # not the minute a lock wait lasts
    assert len(outcome(run_json("crew", "remind"), "sent")) == 1  # the next run finds it free
    assert sorted(recipients(smtp_env)) == sorted(addresses)


# -- crew brief --------------------------------------------------------------------------------


def test_brief_sends_each_confirmed_crew_member_the_roster_and_office_contacts_once(
    smtp_env: SmtpSink,
) -> None:
    add_event("Gala", timedelta(days=3), "--details", "Load-in from 14:00")
    people = [
        add_person("Achieng", "0712000001", "achieng@example.co.ke"),
        add_person("Baraka", "0712000002", "baraka@example.co.ke"),
        add_person("Chebet", "0712000003", "chebet@example.co.ke"),
        add_person("Daudi", "0712000004", "daudi@example.co.ke"),
    ]
    assign(1, 1, "Sound Engineer", "confirmed")
    assign(1, 2, "Lighting Tech", "confirmed")
    assign(1, 3, "Rigger")  # invited
    assign(1, 4, "Runner", "declined")

    doc = run_json("crew", "brief", "--event", "1")

    assert len(outcome(doc, "sent")) == 2 and outcome(doc, "failed") == []
    messages = smtp_env.handler.messages
    assert sorted(recipients(smtp_env)) == ["achieng@example.co.ke", "baraka@example.co.ke"]
    for received in messages:
        assert received.message["Subject"] == "Setup Briefing: Gala"
        text = body(received)
        lines = text.splitlines()
        for person, role in ((people[0], "Sound Engineer"), (people[1], "Lighting Tech")):
            assert any(
                person["name"] in line and role in line and display(person["phone"]) in line
                for line in lines
            ), (person, text)
        for absent in ("Chebet", "Rigger", "Daudi", "Runner", display(people[2]["phone"])):
            assert absent not in text
        for contact in ("Sound Fusion Events Ltd", "0711 000 111", "bookings@soundfusion.test"):
            assert contact in text
        assert "Load-in from 14:00" in text

    again = run_json("crew", "brief", "--event", "1")
    assert outcome(again, "sent") == [] and len(outcome(again, "skipped")) == 2
    assert all("--again" in why for _, why in reasons(again, "skipped"))
    assert len(smtp_env.handler.messages) == 2

    once_more = run_json("crew", "brief", "--event", "1", "--again")
    assert len(outcome(once_more, "sent")) == 2
    assert (
        sorted(recipients(smtp_env)) == ["achieng@example.co.ke"] * 2 + ["baraka@example.co.ke"] * 2
    )


# -- mail list and show ------------------------------------------------------------------------


def test_mail_list_shows_the_documented_fields_and_filters(counting_smtp: SmtpSink) -> None:
    add_event("Gala", timedelta(hours=3))
    add_person("Achieng", "0712000001", "achieng@example.co.ke")
    add_person("Baraka", "0712000002", "baraka@example.co.ke")
    add_person("Chebet", "0712000003", "nobody@example.co.ke")
    assign(1, 1, "Sound", "confirmed")
    assign(1, 2, "Lights", "confirmed")
    assign(1, 3, "Rigger")
    counting_smtp.handler.perm_fail.add("nobody@example.co.ke")
    assert run("crew", "invite", "--event", "1").exit_code == 10
    run_json("crew", "remind")

    everything = run_json("mail", "list")
    assert len(everything) == 5
    for doc in everything:
        assert set(doc) == {
            "id", "recipient", "person_id", "notification_type", "subject", "state", "is_sent",
            "sent_at", "failed_attempts", "last_error",
        }  # fmt: skip
        assert doc["state"] == ("sent" if doc["is_sent"] else "refused")

    [failed] = run_json("mail", "list", "--failed")
    assert (failed["recipient"], failed["person_id"], failed["is_sent"]) == (
        "nobody@example.co.ke", 3, False,
    )  # fmt: skip
    assert failed["failed_attempts"] == 1 and "550" in failed["last_error"]

    reminders = run_json("mail", "list", "--type", "crew_reminder")
    assert sorted(r["recipient"] for r in reminders) == [
        "achieng@example.co.ke", "baraka@example.co.ke",
    ]  # fmt: skip
    assert all(r["is_sent"] and r["sent_at"] for r in reminders)
    assert len(run_json("mail", "list", "--type", "crew_invitation")) == 3
    assert len(run_json("mail", "list", "--since", day(0))) == 5
    assert run_json("mail", "list", "--since", day(1)) == []


def test_mail_show_includes_the_message_text_and_unknown_id_exits_5(smtp_env: SmtpSink) -> None:
    add_event("Gala", timedelta(days=2))
    add_person("Achieng", "0712000001", "achieng@example.co.ke")
    assign(1, 1, "Sound Engineer")
    [email_id] = outcome(run_json("crew", "invite", "1"), "sent")

    doc = run_json("mail", "show", str(email_id))
    assert doc["subject"] == "You are invited to work on: Gala"
    assert doc["message"] == body(smtp_env.handler.messages[0]).replace("\r\n", "\n")
    assert "Dear Achieng" in doc["message"]
    shown = run("mail", "show", str(email_id))
    assert shown.exit_code == 0 and "Dear Achieng" in shown.stdout

    missing = run("mail", "show", "999")
    assert missing.exit_code == 5
    assert missing.stderr.splitlines()[0] == "Error: no such email (999)"


# -- faults: the server stopped, 451 and 550 ---------------------------------------------------


def test_server_stopped_mid_batch_of_50_then_retry_delivers_the_40_left_each_once(
    smtp_env: SmtpSink,
) -> None:
    add_event("Gala", timedelta(days=4))
    addresses = seed_crew(1, 50, confirmed=False)
    smtp_env.handler.stop_after = 10

    started = time.monotonic()
    result = run("crew", "invite", "--event", "1")
    elapsed = time.monotonic() - started

    assert result.exit_code == 10, result.output + result.stderr
    assert elapsed < 30
    assert unstamped(result.stdout) == "Invitations: 10 sent, 40 failed, 0 skipped.\n"
    delivered = recipients(smtp_env)
    assert len(delivered) == 10
    failed = run_json("mail", "list", "--failed", "--limit", "100")
    assert len(failed) == 40
    assert {f["recipient"] for f in failed} == set(addresses) - set(delivered)
    assert all(f["last_error"] and f["failed_attempts"] == 1 for f in failed)

    smtp_env.start()
    retried = run_json("mail", "retry")

    assert sorted(outcome(retried, "sent")) == sorted(f["id"] for f in failed)
    assert outcome(retried, "failed") == []
    assert sorted(recipients(smtp_env)) == sorted(addresses)
    assert len(set(smtp_env.handler.message_ids())) == 50
    assert run_json("mail", "list", "--failed") == []
    assert all(c["invitation_sent"] and c["invitation_sent_at"] for c in run_json("crew", "list"))


def test_451_recipients_are_retried_and_550_ones_only_when_named(counting_smtp: SmtpSink) -> None:
    handler = counting_smtp.handler
    assert isinstance(handler, CountingRecorder)
    add_event("Gala", timedelta(days=4))
    addresses = seed_crew(1, 6, confirmed=False)
    fine, later, refused = addresses[:2], addresses[2:4], addresses[4:]
    handler.temp_fail.update(later)
    handler.perm_fail.update(refused)

    first = run_json("crew", "invite", "--event", "1", code=10)

    assert len(outcome(first, "sent")) == 2 and len(outcome(first, "failed")) == 4
    assert sorted(recipients(counting_smtp)) == fine
    by_address = {m["recipient"]: m for m in run_json("mail", "list", "--failed")}
    assert sorted(by_address) == later + refused
    assert all("451" in by_address[a]["last_error"] for a in later)
    assert all("550" in by_address[a]["last_error"] for a in refused)

    handler.temp_fail.clear()  # the greylisting is over
    retried = run_json("mail", "retry")

    assert sorted(outcome(retried, "sent")) == sorted(by_address[a]["id"] for a in later)
    assert sorted(recipients(counting_smtp)) == fine + later
    assert [handler.asked.count(a) for a in refused] == [1, 1]  # not even tried
    assert outcome(run_json("mail", "retry"), "sent") == []  # cron again: still left alone
    assert [handler.asked.count(a) for a in refused] == [1, 1]
    still = run_json("mail", "list", "--failed")
    assert sorted(m["recipient"] for m in still) == refused
    assert all(m["failed_attempts"] == 1 for m in still)

    # named, a refused one is tried again: still refused, the attempt counted
    named = by_address[refused[0]]["id"]
    again = run_json("mail", "retry", str(named), code=10)
    assert outcome(again, "failed") == [named]
    assert handler.asked.count(refused[0]) == 2
    assert run_json("mail", "show", str(named))["failed_attempts"] == 2
    # once the mailbox exists, naming it delivers it
    handler.perm_fail.discard(refused[1])
    assert outcome(run_json("mail", "retry", str(by_address[refused[1]]["id"])), "sent") == [
        by_address[refused[1]]["id"]
    ]

    delivered = recipients(counting_smtp)
    assert sorted(delivered) == fine + later + [refused[1]]
    assert len(set(delivered)) == len(delivered)
    assert len(set(handler.message_ids())) == len(handler.messages)


def test_four_retry_processes_at_once_deliver_200_pending_emails_exactly_once(
    smtp_env: SmtpSink,
) -> None:
    add_event("Gala", timedelta(days=4))
    addresses = seed_crew(1, 200, confirmed=False)
    smtp_env.stop()
    assert run("crew", "invite", "--event", "1").exit_code == 10
    assert len(run_json("mail", "list", "--failed", "--limit", "500")) == 200
    smtp_env.start()
    smtp_env.handler.delay = 0.002

    procs = [sfcrm_process("mail", "retry", "--json") for _ in range(4)]
    outputs = finish(procs)

    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err for _, err in outputs]
    reports = [json.loads(out) for out, _ in outputs]
    sent = [i for r in reports for i in outcome(r, "sent")]
    assert len(sent) == len(set(sent)) == 200
    assert all(outcome(r, "failed") == [] for r in reports)
    assert len(smtp_env.handler.messages) == 200
    assert len(set(smtp_env.handler.message_ids())) == 200
    assert sorted(recipients(smtp_env)) == sorted(addresses)
    assert all(c["invitation_sent"] for c in run_json("crew", "list"))


@pytest.mark.slow
def test_cron_retry_during_an_invite_sends_the_old_failures_and_none_of_the_invitations(
    smtp_env: SmtpSink,
) -> None:
    add_event("Wedding", timedelta(days=3))
    add_event("Gala", timedelta(days=4))
    earlier = seed_crew(1, 30, confirmed=False)
    smtp_env.stop()
    assert run("crew", "invite", "--event", "1").exit_code == 10
    failed = sorted(m["id"] for m in run_json("mail", "list", "--failed"))
    assert len(failed) == 30
    smtp_env.start()
    later = seed_crew(2, 100, confirmed=False, first=30)
    smtp_env.handler.delay = 0.02  # the invitations take a few seconds to go out

    invite = sfcrm_process("crew", "invite", "--event", "2", "--json")
    wait_for(lambda: smtp_env.handler.messages, timeout=30)  # it is sending
    retry = sfcrm_process("mail", "retry", "--json")  # cron's run comes meanwhile
    outputs = finish([invite, retry])

    assert [invite.returncode, retry.returncode] == [0, 0], [err for _, err in outputs]
    invited, retried = (json.loads(out) for out, _ in outputs)
    assert (
        sorted(outcome(retried, "sent")) == failed
    )  # the invitations in flight are not its to send
    assert len(outcome(invited, "sent")) == 100 and set(outcome(invited, "sent")).isdisjoint(failed)
    assert sorted(recipients(smtp_env)) == sorted(earlier + later)  # each exactly once
    assert len(set(smtp_env.handler.message_ids())) == 130
    assert all(c["invitation_sent"] for c in run_json("crew", "list"))


@pytest.mark.slow
def test_retry_naming_the_emails_an_invite_is_sending_delivers_each_once(
    smtp_env: SmtpSink,
) -> None:
    add_event("Gala", timedelta(days=4))
    addresses = seed_crew(1, 100, confirmed=False)
    smtp_env.handler.delay = 0.02

    invite = sfcrm_process("crew", "invite", "--event", "1", "--json")
    wait_for(lambda: smtp_env.handler.messages, timeout=30)  # all written, the first one sent
    ids = [str(m["id"]) for m in run_json("mail", "list", "--limit", "500")]
    retry = sfcrm_process("mail", "retry", *ids, "--json")  # someone names every one of them
    outputs = finish([invite, retry])

    assert [invite.returncode, retry.returncode] == [0, 0], [err for _, err in outputs]
    invited, retried = (json.loads(out) for out, _ in outputs)
    assert set(outcome(invited, "sent")).isdisjoint(outcome(retried, "sent"))
    assert sorted(outcome(invited, "sent") + outcome(retried, "sent")) == sorted(map(int, ids))
    assert outcome(invited, "failed") == outcome(retried, "failed") == []
    assert sorted(recipients(smtp_env)) == sorted(addresses)  # each exactly once
    assert len(set(smtp_env.handler.message_ids())) == 100
    assert all(c["invitation_sent"] for c in run_json("crew", "list"))


@dataclass
class StallingRecorder(Recorder):
    """Takes ``stall_after`` messages, then takes the next one's data and never answers (once):
    its sender is left mid-send."""

    stall_after: int | None = 10
    stalled: threading.Event = field(default_factory=threading.Event)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.stall_after is not None and len(self.messages) >= self.stall_after:
            self.stall_after = None
            self.stalled.set()
            await asyncio.sleep(30)  # stopping the server cancels this
        return await super().handle_DATA(server, session, envelope)


def test_sender_killed_mid_batch_leaves_the_rest_to_retry_and_what_it_may_have_sent_to_be_named(
    monkeypatch: pytest.MonkeyPatch, office: str
) -> None:
    handler = StallingRecorder(stall_after=10)
    sink = SmtpSink(handler)
    sink.start()
    db = Database(office)
    try:
        use_smtp(monkeypatch, sink.port)
        add_event("Gala", timedelta(days=2))
        addresses = seed_crew(1, 50, confirmed=False)
        proc = sfcrm_process("crew", "invite", "--event", "1")
        assert handler.stalled.wait(30)

        proc.kill()  # SIGKILL mid-send: nothing of it runs again
        finish([proc])

        assert proc.returncode == -signal.SIGKILL
        delivered = recipients(sink)
        assert delivered == addresses[:10]
        logged = {m["recipient"]: m for m in run_json("mail", "list", "--limit", "100")}
        # a run records what it sent a few emails at a time: the ten delivered are recorded
        # sent, or not yet (a prefix of them may be); the eleventh, in flight, is not
        flags = [logged[a]["is_sent"] for a in addresses[:11]]
        recorded = flags.count(True)
        assert flags == [True] * recorded + [False] * (11 - recorded)
        unrecorded = [logged[a]["id"] for a in addresses[recorded:11]]  # the last is in flight
        # cron right away: what the run claimed is still claimed, and the rest still held by
        # their writer (killed, so it could not let go: its hold lapses after a lease)
        held = run_json("mail", "retry")
        assert outcome(held, "sent") == outcome(held, "failed") == []
        rest = sorted(logged[a]["id"] for a in addresses[recorded:])
        assert reasons(held, "not_retried", "email_id") == [
            (i, "being sent by another sfcrm right now") for i in rest
        ]
        assert {m["state"] for m in run_json("mail", "list", "--unsent")} == {"sending"}

        def a_lease_later() -> datetime:
            return datetime.now(UTC) + DEFAULT_LEASE + timedelta(minutes=1)

        cron = Mailer(
            db, lambda: SmtpBackend("127.0.0.1", sink.port, timeout=5),
            sender="Sound Fusion <office@soundfusion.test>", clock=a_lease_later,
        )  # fmt: skip
        report = cron.retry()

        # the ones never tried go; the ones it may have sent wait to be named, never resent
        assert sorted(report.sent) == sorted(logged[a]["id"] for a in addresses[11:])
        assert report.failed == []
        assert recipients(sink) == delivered + addresses[11:]  # nobody twice, none left out
        maybe = run_json("mail", "list", "--failed", "--limit", "100")
        assert sorted((m["id"], m["last_error"]) for m in maybe) == [
            (i, INTERRUPTED) for i in unrecorded
        ]
        assert cron.retry().sent == []  # they may have been delivered: only when named

        in_flight = unrecorded[-1]
        assert outcome(run_json("mail", "retry", str(in_flight)), "sent") == [in_flight]
        assert sorted(recipients(sink)) == sorted(addresses)
        told = {c["id"]: c["invitation_sent"] for c in run_json("crew", "list")}
        assert [told[i] for i in range(1, 51)] == [
            i <= recorded or i > 10 for i in range(1, 51)
        ]  # the delivered ones not recorded stay "may have been delivered" until named
    finally:
        db.close()
        sink.stop()


def test_retry_never_resends_an_email_already_sent_even_when_named(smtp_env: SmtpSink) -> None:
    add_event("Gala", timedelta(days=2))
    add_person("Achieng", "0712000001", "achieng@example.co.ke")
    assign(1, 1, "Sound")
    [email_id] = outcome(run_json("crew", "invite", "1"), "sent")

    doc = run_json("mail", "retry", str(email_id))
    assert doc == {
        "results": [{"email_id": email_id, "assignment_id": 1, "outcome": "not_retried",
                     "message": "already sent"}],
        "counts": {"not_retried": 1}, "total": 1,
    }  # fmt: skip
    result = run("mail", "retry", str(email_id))
    assert result.exit_code == 0
    assert unstamped(result.stdout) == (
        "Retry: 0 sent, 0 failed, 1 not retried.\n1 not retried: already sent — email 1\n"
    )
    assert len(smtp_env.handler.messages) == 1


# -- what may have been delivered, and what certainly was not ----------------------------------

OFFICE_USER = "office"
OFFICE_PASSWORD = "pa55-Word!"  # what the mail provider gave: ASCII


@pytest.fixture
def smtp_requiring_login(monkeypatch: pytest.MonkeyPatch, office: str) -> Iterator[SmtpSink]:
    """Offers AUTH and accepts only the office's login, which sfcrm is set up with."""

    def only_the_office(
        server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        office = (OFFICE_USER.encode(), OFFICE_PASSWORD.encode())
        return AuthResult(success=(auth_data.login, auth_data.password) == office, handled=False)

    sink = SmtpSink(Recorder(), authenticator=only_the_office, auth_require_tls=False)
    sink.start()
    use_smtp(monkeypatch, sink.port)
    monkeypatch.setenv("EMAIL_HOST_USER", OFFICE_USER)
    monkeypatch.setenv("EMAIL_HOST_PASSWORD", OFFICE_PASSWORD)
    yield sink
    sink.stop()


@dataclass
class DroppingRecorder(Recorder):
    """While ``drop`` is on, takes the whole message, then hangs up instead of answering: the
    client cannot know whether it was delivered."""

    drop: bool = True

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await super().handle_DATA(server, session, envelope)
        if self.drop:
            server.transport.close()
        return "250 2.0.0 accepted"


def test_non_ascii_smtp_password_is_a_config_error_before_any_email_is_written(
    smtp_requiring_login: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_event("Gala", timedelta(days=2))
    seed_crew(1, 2, confirmed=False)
    secret = "Jambo-pässwörd-2025"  # smtplib logs in with ASCII only
    monkeypatch.setenv("EMAIL_HOST_PASSWORD", secret)

    results = [run("crew", "invite", "--event", "1"), run("crew", "invite", "1", "--json")]

    assert [r.exit_code for r in results] == [3, 3]
    first = results[0].stderr.splitlines()
    assert first[0] == (
        "Error: EMAIL_HOST_PASSWORD holds a character SMTP login cannot send (only ASCII works)"
    )
    assert first[1].startswith("Hint: ")
    assert json.loads(results[1].stdout)["code"] == "CONFIG_ERROR"
    assert not any(secret in r.stdout + r.stderr for r in results)
    assert run_json("mail", "list") == []  # nothing written, so nothing stranded
    assert not any(c["invitation_sent"] for c in run_json("crew", "list"))

    monkeypatch.setenv("EMAIL_HOST_PASSWORD", OFFICE_PASSWORD)
    assert len(outcome(run_json("crew", "invite", "--event", "1"), "sent")) == 2
    assert sorted(recipients(smtp_requiring_login)) == [
        "crew0@example.co.ke",
        "crew1@example.co.ke",
    ]


def test_non_ascii_smtp_user_is_a_config_error_too(
    smtp_requiring_login: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_event("Gala", timedelta(days=2))
    seed_crew(1, 1, confirmed=False)
    monkeypatch.setenv("EMAIL_HOST_USER", "ofisi-ñ")

    result = run("crew", "invite", "--event", "1")

    assert result.exit_code == 3
    assert result.stderr.splitlines()[0] == (
        "Error: EMAIL_HOST_USER holds a character SMTP login cannot send (only ASCII works) "
        "(ofisi-\\xf1)"
    )
    assert run_json("mail", "list") == []


def test_refused_login_leaves_the_emails_for_mail_retry_and_a_non_ascii_password_touches_none(
    smtp_requiring_login: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_event("Gala", timedelta(days=2))
    addresses = seed_crew(1, 3, confirmed=False)
    monkeypatch.setenv("EMAIL_HOST_PASSWORD", "an-old-password")

    refused = run_json("crew", "invite", "--event", "1", code=10)

    assert len(outcome(refused, "failed")) == 3
    assert all("refused the login" in why for _, why in reasons(refused, "failed"))
    before = run_json("mail", "list", "--failed")
    assert [m["failed_attempts"] for m in before] == [1, 1, 1]
    assert all("refused the login" in m["last_error"] for m in before)

    monkeypatch.setenv("EMAIL_HOST_PASSWORD", "nywila-mpya-ë")  # a new one SMTP cannot carry
    result = run("mail", "retry")

    assert result.exit_code == 3
    assert result.stderr.splitlines()[0] == (
        "Error: EMAIL_HOST_PASSWORD holds a character SMTP login cannot send (only ASCII works)"
    )
    assert run_json("mail", "list", "--failed") == before  # not claimed, not counted

    monkeypatch.setenv("EMAIL_HOST_PASSWORD", OFFICE_PASSWORD)
    retried = run_json("mail", "retry")

    assert sorted(outcome(retried, "sent")) == sorted(m["id"] for m in before)
    assert sorted(recipients(smtp_requiring_login)) == sorted(addresses)  # each exactly once
    assert outcome(run_json("mail", "retry"), "sent") == []
    assert len(smtp_requiring_login.handler.messages) == 3


def test_ctrl_c_while_connecting_leaves_the_email_for_mail_retry(
    smtp_env: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_event("Gala", timedelta(days=2))
    seed_crew(1, 1, confirmed=False)
    with socket.socket() as silent:  # takes the connection, never greets
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent.setblocking(False)
        monkeypatch.setenv("EMAIL_PORT", str(silent.getsockname()[1]))
        proc = sfcrm_process("crew", "invite", "--event", "1")

        def connected() -> bool:
            try:
                silent.accept()[0].close()
            except BlockingIOError:
                return False
            return True

        wait_for(connected, timeout=20)
        proc.send_signal(signal.SIGINT)
        [(_, err)] = finish([proc])

    assert proc.returncode == 130, err
    [logged] = run_json("mail", "list", "--failed")
    assert logged["last_error"] != INTERRUPTED  # nothing was handed over: not "may have been"
    assert "not delivered" in logged["last_error"]

    monkeypatch.setenv("EMAIL_PORT", str(smtp_env.port))
    retried = run_json("mail", "retry")

    assert outcome(retried, "sent") == [logged["id"]]
    assert recipients(smtp_env) == ["crew0@example.co.ke"]
    assert run_json("crew", "list")[0]["invitation_sent"] is True


@dataclass
class SlowToAnswerRecorder(Recorder):
    """Takes the whole message, says so through ``taken``, and never answers."""

    taken: threading.Event = field(default_factory=threading.Event)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.taken.set()
        await asyncio.sleep(30)  # stopping the server cancels this
        return "250 2.0.0 accepted"


def test_ctrl_c_while_the_server_takes_the_message_leaves_it_maybe_delivered(
    monkeypatch: pytest.MonkeyPatch, office: str
) -> None:
    handler = SlowToAnswerRecorder()
    sink = SmtpSink(handler)
    sink.start()
    try:
        use_smtp(monkeypatch, sink.port)
        add_event("Gala", timedelta(days=2))
        seed_crew(1, 1, confirmed=False)
        proc = sfcrm_process("crew", "invite", "--event", "1")

        assert handler.taken.wait(20)
        proc.send_signal(signal.SIGINT)
        stopping = time.monotonic()
        [(_, err)] = finish([proc])

        assert proc.returncode == 130, err
        assert time.monotonic() - stopping < 5  # no polite QUIT waiting on the silent server
        [logged] = run_json("mail", "list", "--failed")
        assert logged["last_error"] == INTERRUPTED
        assert outcome(run_json("mail", "retry"), "sent") == []
    finally:
        sink.stop()


def test_hang_up_after_the_message_data_is_maybe_delivered_and_never_resent_unless_named(
    monkeypatch: pytest.MonkeyPatch, office: str
) -> None:
    sink = SmtpSink(DroppingRecorder())
    sink.start()
    try:
        use_smtp(monkeypatch, sink.port)
        add_event("Gala", timedelta(days=2))
        seed_crew(1, 1, confirmed=False)

        result = run("crew", "invite", "--event", "1", "--json")

        assert result.exit_code == 10, result.output
        [(failed, error)] = reasons(json.loads(result.stdout), "failed", "email_id")
        assert "may have been delivered" in error
        assert run_json("mail", "show", str(failed))["last_error"] == INTERRUPTED
        assert len(sink.handler.messages) == 1  # it did reach the server

        sink.handler.drop = False  # the server behaves again: cron's retry must not resend
        again = run_json("mail", "retry")
        assert (outcome(again, "sent"), outcome(again, "failed")) == ([], [])
        assert len(sink.handler.messages) == 1

        named = run_json("mail", "retry", str(failed))  # checked with the crew member
        assert outcome(named, "sent") == [failed]
        assert len(sink.handler.messages) == 2
    finally:
        sink.stop()


# -- output for cron and scripts ---------------------------------------------------------------


@pytest.mark.parametrize("command", [("crew", "invite", "--event", "1"), ("mail", "retry")])
def test_batch_with_failures_under_json_is_one_document_on_stdout(
    counting_smtp: SmtpSink, command: tuple[str, ...]
) -> None:
    add_event("Gala", timedelta(days=2))
    seed_crew(1, 2, confirmed=False)
    counting_smtp.handler.temp_fail.add("crew1@example.co.ke")
    if command[0] == "mail":
        assert run("crew", "invite", "--event", "1").exit_code == 10

    result = run(*command, "--json")

    assert result.exit_code == 10
    doc = json.loads(result.stdout)  # README: "one JSON document", so `| jq` works
    assert outcome(doc, "failed") == [2]


def test_bulk_send_without_a_terminal_prints_one_summary_line_and_no_progress_bar(
    smtp_env: SmtpSink,
) -> None:
    add_event("Gala", timedelta(hours=5))
    seed_crew(1, 3, confirmed=False)

    result = run("crew", "invite", "--event", "1")
    assert result.exit_code == 0, result.stderr
    assert unstamped(result.stdout) == "Invitations: 3 sent, 0 failed, 0 skipped.\n"
    assert result.stderr == ""  # nothing failed or skipped, so nothing to say; no bar either

    with core() as rt:
        for assignment in rt.crew.find(event_id=1):
            assert assignment.crew.id is not None
            rt.crew.respond(assignment.crew.id, "confirm")
    [proc] = procs = [sfcrm_process("crew", "remind")]  # as cron runs it
    [(out, err)] = finish(procs)
    assert proc.returncode == 0, err
    assert unstamped(out) == "Reminders: 3 sent, 0 failed, 0 skipped.\n"
    assert err == ""
    assert len(smtp_env.handler.messages) == 6


# -- secrets -----------------------------------------------------------------------------------


@pytest.fixture
def smtp_refusing_login(monkeypatch: pytest.MonkeyPatch, office: str) -> Iterator[SmtpSink]:
    """Offers AUTH and refuses every login; the office's password is a canary."""

    def refuse(*_args: Any) -> AuthResult:
        return AuthResult(success=False, handled=False)

    sink = SmtpSink(Recorder(), authenticator=refuse, auth_require_tls=False)
    sink.start()
    use_smtp(monkeypatch, sink.port)
    monkeypatch.setenv("EMAIL_HOST_USER", "office")
    monkeypatch.setenv("EMAIL_HOST_PASSWORD", CANARY)
    yield sink
    sink.stop()


def test_smtp_password_never_reaches_output_mail_log_or_log_file(
    smtp_refusing_login: SmtpSink, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, office: str
) -> None:
    log_file = tmp_path / "sfcrm.log"
    monkeypatch.setenv("SFCRM_LOG_FILE", str(log_file))
    add_event("Gala", timedelta(days=2))
    seed_crew(1, 3, confirmed=False)

    results = [
        run("crew", "invite", "--event", "1"),
        run("mail", "retry"),
        run("mail", "retry", "1", "2", "--json"),
        run("mail", "list", "--failed"),
        run("mail", "list", "--json"),
        run("mail", "show", "1"),
    ]

    assert [r.exit_code for r in results] == [10, 10, 10, 0, 0, 0]
    stored = run_json("mail", "list")
    assert len(stored) == 3
    assert all("refused the login" in (m["last_error"] or "") for m in stored)
    logged = log_file.read_text(encoding="utf-8")
    assert "refused the login" in logged
    forms = [
        CANARY,
        base64.b64encode(CANARY.encode()).decode(),
        base64.b64encode(f"\0office\0{CANARY}".encode()).decode(),
    ]
    texts = [r.stdout + r.stderr for r in results] + [json.dumps(stored), logged]
    if "://" not in office:  # the database file and its journal, byte for byte
        database = Path(office)
        texts += [
            p.read_bytes().decode("latin-1") for p in database.parent.glob(database.name + "*")
        ]
    for form in forms:
        assert not any(form in text for text in texts), form
    assert smtp_refusing_login.handler.messages == []


# -- an email's state, what mail retry leaves alone, and what crew invite says of it -----------


def test_ctrl_c_mid_batch_lets_go_of_the_rest_so_mail_retry_sends_them_at_once(
    smtp_env: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_event("Gala", timedelta(days=2))
    addresses = seed_crew(1, 3, confirmed=False)
    with socket.socket() as silent:  # takes the connection, never greets
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        silent.setblocking(False)
        monkeypatch.setenv("EMAIL_PORT", str(silent.getsockname()[1]))
        proc = sfcrm_process("crew", "invite", "--event", "1")

        def connected() -> bool:
            try:
                silent.accept()[0].close()
            except BlockingIOError:
                return False
            return True

        wait_for(connected, timeout=20)
        proc.send_signal(signal.SIGINT)
        [(_, err)] = finish([proc])
    assert proc.returncode == 130, err

    unsent = run_json("mail", "list", "--unsent")
    states = {m["recipient"]: m["state"] for m in unsent}
    assert states == {addresses[0]: "failed", addresses[1]: "queued", addresses[2]: "queued"}
    table = run("mail", "list", "--unsent").stdout
    assert "state" in table and table.count("queued") == 2 and table.count("failed") == 1
    ids = {m["recipient"]: m["id"] for m in unsent}
    shown = run("mail", "show", str(ids[addresses[1]])).stdout.splitlines()
    assert "state: queued" in shown
    assert "next: not sent yet and no sfcrm is sending it: `sfcrm mail retry` sends it" in shown

    # crew invite again: each one's reason says what will become of its email
    again = run_json("crew", "invite", "--event", "1")
    why = dict(reasons(again, "skipped"))
    assert written(again) == []
    assert why[2] == (
        f"invitation already written (email {ids[addresses[1]]}): not sent yet and no sfcrm is "
        "sending it: `sfcrm mail retry` sends it"
    )
    assert why[1].startswith(
        f"invitation already written (email {ids[addresses[0]]}): sending it failed ("
    )
    assert why[1].endswith("; `sfcrm mail retry` tries again")

    # no waiting for a lease: the run that wrote them is gone
    monkeypatch.setenv("EMAIL_PORT", str(smtp_env.port))
    retried = run_json("mail", "retry")

    assert sorted(outcome(retried, "sent")) == sorted(ids.values())
    assert sorted(recipients(smtp_env)) == sorted(addresses)
    assert run_json("mail", "list", "--unsent") == []


def test_mail_retry_leaves_an_invitation_run_still_sending_alone_and_says_so(
    smtp_env: SmtpSink,
) -> None:
    add_event("Gala", timedelta(days=2))
    addresses = seed_crew(1, 40, confirmed=False)
    smtp_env.handler.delay = 0.05

    invite = sfcrm_process("crew", "invite", "--event", "1", "--json")
    wait_for(lambda: smtp_env.handler.messages, timeout=30)  # all written, the first one sent
    retry = sfcrm_process("mail", "retry", "--json")  # cron, while the run is at work
    outputs = finish([invite, retry])

    assert [invite.returncode, retry.returncode] == [0, 0], [err for _, err in outputs]
    invited, retried = (json.loads(out) for out, _ in outputs)
    assert outcome(retried, "sent") == [] and outcome(retried, "failed") == []
    # it named them instead of passing over in silence
    assert retried["results"]
    assert {why for _, why in reasons(retried, "not_retried")} == {
        "being sent by another sfcrm right now"
    }
    assert len(outcome(invited, "sent")) == 40
    assert sorted(recipients(smtp_env)) == sorted(addresses)  # each exactly once


def test_bad_mail_folder_is_a_config_error_before_any_email_is_written(
    office: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    add_event("Gala", timedelta(days=2))
    seed_crew(1, 2, confirmed=False)
    taken = tmp_path / "not-a-folder"
    taken.write_text("a file where the outbox should be\n")
    monkeypatch.setenv("EMAIL_FILE_PATH", str(taken / "outbox"))

    result = run("crew", "invite", "--event", "1")

    assert result.exit_code == 3, result.stderr
    assert result.stderr.splitlines()[0] == (
        f"Error: the mail folder cannot be used ({taken} is not a folder)"
    )
    assert run_json("mail", "list") == []  # nothing written, so nothing stranded

    monkeypatch.setenv("EMAIL_FILE_PATH", str(tmp_path / "outbox"))
    assert len(outcome(run_json("crew", "invite", "--event", "1"), "written")) == 2


def test_file_backend_says_it_wrote_to_the_outbox_not_that_it_sent(
    office: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EMAIL_FILE_PATH", str(tmp_path / "outbox"))
    add_event("Gala", timedelta(days=2))
    seed_crew(1, 2, confirmed=False)

    doc = run_json("crew", "invite", "1")
    assert reasons(doc, "written", "email_id") == [(1, f"written to {tmp_path / 'outbox'}")]
    result = run("crew", "invite", "2")
    assert unstamped(result.stdout) == "Invitations: 1 written to outbox/, 0 failed, 0 skipped.\n"
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 2

    # one more, whose writer ended before it tried it
    with core() as rt, rt.db.write() as session:
        email_id = rt.mailer.queue(
                session, recipient="crew9@example.co.ke", notification_type="crew_invitation",
                subject="You are invited", text="Dear Crew 9\n",
            )  # fmt: skip
        session.exec(
            update(EmailNotification)
            .where(col(EmailNotification.id) == email_id)
            .values(claimed_until=None)
        )
    retried = run("mail", "retry")
    assert unstamped(retried.stdout) == "Retry: 1 written to outbox/, 0 failed, 0 not retried.\n"
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 3


def test_invitations_carry_reply_to_the_office(smtp_env: SmtpSink) -> None:
    add_event("Gala", timedelta(days=2))
    seed_crew(1, 1, confirmed=False)

    run_json("crew", "invite", "--event", "1")

    [received] = smtp_env.handler.messages
    assert received.message["Reply-To"] == "bookings@soundfusion.test"
    assert "Reply to this email to confirm or decline" in body(received)


def test_invitation_from_a_no_reply_address_never_asks_crew_to_reply(
    smtp_env: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEFAULT_FROM_EMAIL", "Sound Fusion <no-reply@soundfusion.test>")
    monkeypatch.delenv("SFCRM_ORG_EMAIL")
    add_event("Gala", timedelta(days=2))
    seed_crew(1, 1, confirmed=False)

    run_json("crew", "invite", "--event", "1")

    [received] = smtp_env.handler.messages
    assert received.message["Reply-To"] is None
    text = body(received)
    assert "reply" not in text.lower()
    assert "Call the office on 0711 000 111 to confirm or decline." in text
    html = received.message.get_body(("html",)).get_content()
    assert "reply" not in html.lower()


def test_a_batch_is_logged_in_one_insert_and_recorded_sent_a_few_emails_at_a_time(
    smtp_env: SmtpSink, engine_name: str
) -> None:
    add_event("Gala", timedelta(days=2))
    addresses = seed_crew(1, 50, confirmed=False)
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        statements.append(" ".join(statement.split()))

    with core() as rt:
        event.listen(rt.db.engine, "before_cursor_execute", seen)
        run = rt.crew_mail.invite(event_id=1)

    assert run.sent == 50
    assert sorted(recipients(smtp_env)) == sorted(addresses)
    assert all(c["invitation_sent"] for c in run_json("crew", "list"))
    logged = [s for s in statements if s.startswith("INSERT INTO email_notification")]
    recorded = [s for s in statements if s.startswith("UPDATE email_notification SET is_sent")]
    # one round trip on PostgreSQL; SQLite, in the same process, takes a row a statement
    assert len(logged) == (1 if engine_name == "postgresql" else 50)
    assert 1 <= len(recorded) <= 3  # every 20 (or every second), then the rest at the end


def test_a_batch_larger_than_one_statement_is_logged_in_order_a_few_hundred_at_a_time(
    smtp_env: SmtpSink, engine_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sfcrm.mail.sender

    monkeypatch.setattr(sfcrm.mail.sender, "_WRITE_EVERY", 20)  # so 50 take three statements
    add_event("Gala", timedelta(days=2))
    addresses = seed_crew(1, 50, confirmed=False)
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        statements.append(statement)

    with core() as rt:
        event.listen(rt.db.engine, "before_cursor_execute", seen)
        run = rt.crew_mail.invite(event_id=1)

    assert run.sent == 50
    logged = [s for s in statements if s.startswith("INSERT INTO email_notification")]
    assert len(logged) == (3 if engine_name == "postgresql" else 50)
    # each email id is its assignment's, and went to that assignment's crew member
    emails = {m["id"]: m for m in run_json("mail", "list", "--limit", "100")}
    assert len(emails) == 50
    for email_id, assignment_id in run.assignments.items():
        assert emails[email_id]["recipient"] == addresses[assignment_id - 1]
    # marked only where the assignment's invitation is this very email (see note_emails_sent)
    assert all(c["invitation_sent"] for c in run_json("crew", "list"))
