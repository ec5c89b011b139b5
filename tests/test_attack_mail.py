"""Issue 4, rows 15-18: the mail paths attacked with a real SMTP server (aiosmtpd on 127.0.0.1)
whose faults the tests switch, real processes racing each other, and hostile names.

Each test prints the figures it measured (``pytest -s`` shows them); the README's Reliability
section quotes them.
"""

from __future__ import annotations

import csv
import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
from sqlalchemy import update
from sqlmodel import col, select
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
)
from typer.testing import CliRunner

from sfcrm.cli import app
from sfcrm.cli.runtime import RootOptions, Runtime
from sfcrm.db import Database
from sfcrm.models import CrewStatus, EmailNotification, EventCrew, Person

runner = CliRunner()
NAIROBI = ZoneInfo("Africa/Nairobi")


# -- helpers (small copies of test_crew_mail's, so the figures here stand on their own) --------


def add_event(name: str, delta: timedelta, *extra: str) -> dict[str, Any]:
    when = datetime.now(NAIROBI) + delta
    doc: dict[str, Any] = run_json(
        "events", "add", "--name", name, "--date", when.date().isoformat(),
        "--time", when.strftime("%H:%M"), "--location", "KICC, Nairobi", *extra,
    )  # fmt: skip
    return doc


@contextmanager
def core() -> Iterator[Runtime]:
    """The services the CLI uses, with the same settings, for quick bulk set-up."""
    rt = Runtime(RootOptions(), json_output=False)
    try:
        yield rt
    finally:
        rt.close()


def seed_crew(event_id: int, count: int, *, status: str = CrewStatus.INVITED) -> list[str]:
    """``count`` people on the event in one transaction (crew0@… upwards); their addresses."""
    addresses = [f"crew{n}@example.co.ke" for n in range(count)]
    with core() as rt:
        now = rt.clock()
        with rt.db.write() as session:
            people = [
                Person(name=f"Crew {n}", phone=f"254712{n:06d}", email=a, created_at=now)
                for n, a in enumerate(addresses)
            ]
            session.add_all(people)
            session.flush()
            for person in people:
                assert person.id is not None
                session.add(
                    EventCrew(
                        event_id=event_id, person_id=person.id, role="Stagehand", status=status,
                        created_at=now,
                    )
                )  # fmt: skip
    return addresses


def use_smtp(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    monkeypatch.setenv("EMAIL_BACKEND", "smtp")
    monkeypatch.setenv("EMAIL_HOST", "127.0.0.1")
    monkeypatch.setenv("EMAIL_PORT", str(port))


@dataclass
class CountingRecorder(Recorder):
    """Also remembers every RCPT TO it was asked, and answers DATA with 451 or 554 for chosen
    recipients: a refused message leaves nothing behind, so this is how a test sees retries."""

    asked: list[str] = field(default_factory=list)
    data_temp_fail: set[str] = field(default_factory=set)  # 451 after DATA
    data_perm_fail: set[str] = field(default_factory=set)  # 554 after DATA

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.asked.append(address)
        return await super().handle_RCPT(server, session, envelope, address, options)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if set(envelope.rcpt_tos) & self.data_perm_fail:
            return "554 5.7.1 message refused"
        if set(envelope.rcpt_tos) & self.data_temp_fail:
            return "451 4.7.1 greylisted, try again later"
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def office(monkeypatch: pytest.MonkeyPatch, database_url: str, tmp_path: Path) -> str:
    """One database for the CLI, the core and child processes; a log file."""
    monkeypatch.setenv("SFCRM_DATABASE_URL", database_url)
    monkeypatch.setenv("SFCRM_LOG_FILE", str(tmp_path / "sfcrm.log"))
    monkeypatch.setenv("DEFAULT_FROM_EMAIL", "Sound Fusion <office@soundfusion.test>")
    return database_url


@pytest.fixture
def smtp_env(monkeypatch: pytest.MonkeyPatch, office: str, smtp_sink: SmtpSink) -> SmtpSink:
    use_smtp(monkeypatch, smtp_sink.port)
    return smtp_sink


@pytest.fixture
def counting_smtp(monkeypatch: pytest.MonkeyPatch, office: str) -> Iterator[SmtpSink]:
    sink = SmtpSink(CountingRecorder())
    sink.handler.on_stop = sink.stop
    sink.start()
    use_smtp(monkeypatch, sink.port)
    yield sink
    sink.stop()


def figures(row: int, **measured: Any) -> None:
    print(f"\nissue 4 row {row}: " + ", ".join(f"{k}={v}" for k, v in measured.items()))


# -- row 15: the server down for a whole batch, then up, then `mail retry` ---------------------


def test_row15_server_down_for_a_batch_of_50_then_retry_delivers_each_exactly_once(
    smtp_env: SmtpSink, tmp_path: Path
) -> None:
    add_event("Safari Rally Gala", timedelta(days=4))
    addresses = seed_crew(1, 50)
    smtp_env.stop()  # nothing listens on the port at all: every connect is refused

    started = time.monotonic()
    result = run("crew", "invite", "--event", "1")
    first_run = time.monotonic() - started

    assert result.exit_code == 10, result.output + result.stderr
    assert first_run < 30
    assert unstamped(result.stdout) == "Invitations: 0 sent, 50 failed, 0 skipped.\n"
    failed = run_json("mail", "list", "--failed", "--limit", "100")
    assert len(failed) == 50
    assert {f["recipient"] for f in failed} == set(addresses)
    assert all(f["failed_attempts"] == 1 and not f["is_sent"] for f in failed)
    assert all(
        f["last_error"].startswith(f"cannot connect to the SMTP server 127.0.0.1:{smtp_env.port}")
        for f in failed
    ), failed[0]["last_error"]
    logged = (tmp_path / "sfcrm.log").read_text(encoding="utf-8").splitlines()
    failure_lines = [line for line in logged if " failed (crew_invitation to " in line]
    assert len(failure_lines) == 50
    assert all("cannot connect to the SMTP server" in line for line in failure_lines)
    assert smtp_env.handler.messages == []

    smtp_env.start()
    started = time.monotonic()
    retried = run_json("mail", "retry")
    retry_run = time.monotonic() - started

    assert sorted(outcome(retried, "sent")) == sorted(f["id"] for f in failed)
    assert outcome(retried, "failed") == [] and outcome(retried, "not_retried") == []
    message_ids = smtp_env.handler.message_ids()
    assert len(smtp_env.handler.messages) == 50
    assert len(set(message_ids)) == 50
    assert sorted(recipients(smtp_env)) == sorted(addresses)
    assert all(len(m.recipients) == 1 for m in smtp_env.handler.messages)
    # cron runs it again: nothing left, nothing sent twice
    again = run_json("mail", "retry")
    assert again == {"results": [], "counts": {}, "total": 0}
    assert len(smtp_env.handler.messages) == 50
    assert run_json("mail", "list", "--failed") == []
    crew = run_json("crew", "list")
    assert len(crew) == 50 and all(c["invitation_sent"] for c in crew)
    figures(
        15, first_run_s=f"{first_run:.2f}", failures_logged=len(failure_lines),
        retry_s=f"{retry_run:.2f}", delivered=len(message_ids),
        distinct_message_ids=len(set(message_ids)),
    )  # fmt: skip


# -- row 16: 451 and 550 -----------------------------------------------------------------------


def test_row16_451_is_retried_later_550_never_on_plain_retries_nothing_delivered_twice(
    counting_smtp: SmtpSink,
) -> None:
    handler = counting_smtp.handler
    assert isinstance(handler, CountingRecorder)
    add_event("Gala", timedelta(days=4))
    addresses = seed_crew(1, 40)
    fine = addresses[:10]
    rcpt_451, rcpt_550 = addresses[10:20], addresses[20:30]
    data_451, data_554 = addresses[30:35], addresses[35:40]
    handler.temp_fail.update(rcpt_451)
    handler.perm_fail.update(rcpt_550)
    handler.data_temp_fail.update(data_451)
    handler.data_perm_fail.update(data_554)
    temporary, permanent = rcpt_451 + data_451, rcpt_550 + data_554

    first = run_json("crew", "invite", "--event", "1", code=10)

    assert len(outcome(first, "sent")) == 10 and len(outcome(first, "failed")) == 30
    assert sorted(recipients(counting_smtp)) == sorted(fine)
    by_address = {m["recipient"]: m for m in run_json("mail", "list", "--failed")}
    assert sorted(by_address) == sorted(temporary + permanent)
    assert all("451" in by_address[a]["last_error"] for a in temporary)
    assert all(
        "550" in by_address[a]["last_error"] or "554" in by_address[a]["last_error"]
        for a in permanent
    )

    # cron retries while the greylisting lasts: the 4xx ones are tried each time, the 5xx never
    plain_retries = 3
    for _ in range(plain_retries):
        during = run_json("mail", "retry", code=10)
        assert sorted(outcome(during, "failed")) == sorted(by_address[a]["id"] for a in temporary)
        assert outcome(during, "sent") == []
    assert [handler.asked.count(a) for a in rcpt_451] == [1 + plain_retries] * 10
    assert [handler.asked.count(a) for a in data_451] == [1 + plain_retries] * 5

    handler.temp_fail.clear()
    handler.data_temp_fail.clear()  # the greylisting is over
    later = run_json("mail", "retry")
    assert sorted(outcome(later, "sent")) == sorted(by_address[a]["id"] for a in temporary)
    assert outcome(later, "failed") == []
    final = run_json("mail", "retry")  # names the refusals it leaves alone, by their code
    assert outcome(final, "sent") == outcome(final, "failed") == []
    assert outcome(final, "not_retried") == sorted(by_address[a]["id"] for a in permanent)
    assert reasons(final, "not_retried", "email_id") == sorted(
        (i, f"permanent refusal ({code}) — `sfcrm mail retry {i}` to force")
        for code, group in (("550", rcpt_550), ("554", data_554))
        for i in (by_address[a]["id"] for a in group)
    )

    rcpt_counts = [handler.asked.count(a) for a in permanent]
    assert rcpt_counts == [1] * 15  # never a second RCPT on plain retries
    still = run_json("mail", "list", "--failed")
    assert sorted(m["recipient"] for m in still) == sorted(permanent)
    assert all(m["failed_attempts"] == 1 for m in still)
    delivered = recipients(counting_smtp)
    assert sorted(delivered) == sorted(fine + temporary)
    assert len(set(delivered)) == len(delivered) == 25  # nothing delivered twice
    message_ids = handler.message_ids()
    assert len(set(message_ids)) == len(message_ids) == 25
    figures(
        16, delivered=len(delivered), duplicates=len(delivered) - len(set(delivered)),
        temp_failed_rcpts_each=1 + plain_retries + 1, perm_failed_rcpts_each=max(rcpt_counts),
    )  # fmt: skip


# -- row 17: four senders at once over 500 emails ----------------------------------------------


def queue_500_failed(count: int) -> list[int]:
    """``count`` crew invitations written to the mail log and logged as failed once, in one
    transaction, the way a run against a stopped server leaves them."""
    with core() as rt:
        mailer = rt.mailer
        with rt.db.write() as session:
            ids = [
                mailer.queue(
                    session,
                    recipient=f"crew{n}@example.co.ke",
                    notification_type="crew_invitation",
                    subject=f"You are invited to work on: Gig {n}",
                    text=f"Dear Crew {n},\nSee you there.\n",
                )
                for n in range(count)
            ]
            session.exec(
                update(EmailNotification)
                .where(col(EmailNotification.id).in_(ids))
                .values(
                    failed_attempts=1,
                    last_error="cannot connect to the SMTP server (Connection refused)",
                )
            )
            return ids


def test_row17_four_retry_processes_at_once_deliver_500_pending_emails_exactly_once(
    smtp_env: SmtpSink,
) -> None:
    ids = queue_500_failed(500)
    assert len(run_json("mail", "list", "--failed", "--limit", "1000")) == 500
    smtp_env.handler.delay = 0.001  # keep the four runs busy long enough to overlap

    started = time.monotonic()
    procs = [sfcrm_process("mail", "retry", "--json") for _ in range(4)]
    outputs = finish(procs)
    elapsed = time.monotonic() - started

    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err for _, err in outputs]
    reports = [json.loads(out) for out, _ in outputs]
    sent = [i for r in reports for i in outcome(r, "sent")]
    assert sorted(sent) == sorted(ids)  # each id sent by exactly one process
    assert all(outcome(r, "failed") == [] for r in reports)
    messages = smtp_env.handler.messages
    assert len(messages) == 500
    assert len(set(smtp_env.handler.message_ids())) == 500
    assert len(set(recipients(smtp_env))) == 500
    assert elapsed < 60
    figures(
        17, what="mail retry", processes=4, received=len(messages),
        distinct=len(set(smtp_env.handler.message_ids())),
        per_process=[len(outcome(r, "sent")) for r in reports], seconds=f"{elapsed:.1f}",
    )  # fmt: skip


def test_row17_four_remind_processes_at_once_over_500_crew_send_500_distinct_reminders(
    smtp_env: SmtpSink,
) -> None:
    add_event("Safari Rally Gala", timedelta(hours=3))
    addresses = seed_crew(1, 500, status=CrewStatus.CONFIRMED)
    smtp_env.handler.delay = 0.001

    started = time.monotonic()
    procs = [sfcrm_process("crew", "remind", "--json") for _ in range(4)]
    outputs = finish(procs)
    elapsed = time.monotonic() - started

    assert [p.returncode for p in procs] == [0, 0, 0, 0], [err for _, err in outputs]
    reports = [json.loads(out) for out, _ in outputs]
    sent = [i for r in reports for i in outcome(r, "sent")]
    assert len(sent) == len(set(sent)) == 500
    messages = smtp_env.handler.messages
    assert len(messages) == 500
    assert len(set(smtp_env.handler.message_ids())) == 500
    assert sorted(recipients(smtp_env)) == sorted(addresses)
    with core() as rt, rt.db.read() as session:
        logged = session.exec(select(EmailNotification.assignment_id)).all()
    assert len(logged) == len(set(logged)) == 500  # one reminder written per assignment
    assert all(c["reminder_sent"] for c in run_json("crew", "list"))
    assert elapsed < 60
    figures(
        17, what="crew remind", processes=4, received=len(messages),
        distinct=len(set(smtp_env.handler.message_ids())),
        per_process=[len(outcome(r, "sent")) for r in reports], seconds=f"{elapsed:.1f}",
    )  # fmt: skip


# -- row 18: hostile names and notes -----------------------------------------------------------

SCRIPT = "<script>alert(1)</script>"
SQL = "Robert'); DROP TABLE person;--"
CRLF = "Ann\r\nBcc: x@evil.test"
MARKUP = "[bold red]Mallory[/bold red]"

SCRIPT_HTML = "&lt;script&gt;alert(1)&lt;/script&gt;"
SQL_HTML = "Robert&#39;); DROP TABLE person;--"
EXPECTED_TABLES = {
    "person", "mpesa_payment", "mpesa_checkout", "mpesa_callback", "daraja_token", "event",
    "event_crew", "email_notification", "balance_entry",
}  # fmt: skip


@pytest.fixture
def rsvp_listener(monkeypatch: pytest.MonkeyPatch, smtp_env: SmtpSink) -> Iterator[str]:
    """The listener with crew links on, on a loopback socket; yields its base URL."""
    from sfcrm.server import CallbackApp, RsvpPages, make_server

    monkeypatch.setenv("SFCRM_SECRET_KEY", "row18-rsvp-secret-key-1b2c3d")
    rt = Runtime(RootOptions(), json_output=False)
    pages = RsvpPages(rt.crew, rt.renderer, secret_key="row18-rsvp-secret-key-1b2c3d",
                      clock=rt.clock)  # fmt: skip
    server = make_server(
        CallbackApp(rt.payments, callback_path=None, rsvp=pages), "127.0.0.1", 0, 4
    )
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{server.effective_port}"
    monkeypatch.setenv("SFCRM_PUBLIC_URL", base)
    yield base
    server.close()
    rt.close()


def tables(url: str) -> tuple[str, set[str], dict[str, int]]:
    """The database's integrity check (SQLite's; "ok" elsewhere), its tables and their rows."""
    from sqlalchemy import func, inspect, table

    db = Database(url)
    try:
        with db.read() as session:
            conn = session.connection()
            check = "ok"
            if db.dialect == "sqlite":
                check = conn.exec_driver_sql("PRAGMA integrity_check").scalar_one()
            names = set(inspect(conn).get_table_names())
            counts = {
                n: conn.execute(select(func.count()).select_from(table(n))).scalar_one()
                for n in names
            }
    finally:
        db.close()
    return check, names, counts


def test_row18_hostile_names_and_notes_are_escaped_add_no_header_and_leave_the_db_intact(
    rsvp_listener: str, smtp_env: SmtpSink, office: str, tmp_path: Path
) -> None:
    hostile = [SCRIPT, SQL, CRLF, MARKUP]
    # events: the name and the details carry the attacks (details keep their line breaks)
    for n, text in enumerate(hostile):
        add_event(f"{text} Gala {n}", timedelta(days=3 + n), "--details", "\n".join(hostile))
    # people by the CLI, with every attack in the name ...
    for n, text in enumerate(hostile):
        doc = run_json("people", "add", "--name", text, "--phone", f"07120000{n:02d}",
                       "--email", f"p{n}@example.co.ke")  # fmt: skip
        assert doc["name"] == " ".join(text.split())  # one line: CR/LF became a space
    # ... and by CSV import, quoted so the CR/LF is inside the cell
    csv_path = tmp_path / "crew.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "phone", "email", "balance"])
        for n, text in enumerate(hostile):
            writer.writerow([f"{text} csv", f"07130000{n:02d}", f"c{n}@example.co.ke", "100"])
    assert run_json("people", "import", str(csv_path))["imported"] == 4
    # an address that tries to add a header or a recipient is refused outright
    bad = run("people", "add", "--name", "Eve", "--phone", "0714000000",
              "--email", "eve@example.co.ke\r\nBcc: x@evil.test")  # fmt: skip
    assert bad.exit_code == 4, bad.output + bad.stderr
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text(
        'name,phone,email,balance\r\nEve,0714000001,"eve@example.co.ke\r\nBcc: x@evil.test",0\r\n',
        encoding="utf-8",
    )
    assert run("people", "import", str(bad_csv)).exit_code == 4
    # assignments: every hostile person on event 1 or 2, every attack in role and notes
    people = run_json("people", "list")
    assert len(people) == 8
    for n, person in enumerate(sorted(people, key=lambda p: p["id"])):
        text = hostile[n % 4]
        run_json("crew", "assign", "--event", str(1 + n % 2), "--person", str(person["id"]),
                 "--role", f"{text} role", "--notes", " | ".join(hostile))  # fmt: skip
    for a in run_json("crew", "list"):
        run_json("crew", "confirm", str(a["id"]))

    check_before, tables_before, _ = tables(office)
    invited = run_json("crew", "invite", "--event", "1")
    invited2 = run_json("crew", "invite", "--event", "2")
    briefed = run_json("crew", "brief", "--event", "1")
    assert len(outcome(invited, "sent")) + len(outcome(invited2, "sent")) == 8
    assert len(outcome(briefed, "sent")) == 4

    messages = smtp_env.handler.messages
    assert len(messages) == 12
    addresses = {p["email"] for p in people}
    allowed_headers = {
        "from", "to", "subject", "date", "message-id", "mime-version", "content-type",
        "content-transfer-encoding",
    }  # fmt: skip
    html_checked = 0
    for received in messages:
        assert len(received.recipients) == 1 and received.recipients[0] in addresses
        message = received.message
        assert message["To"] == received.recipients[0]
        assert message["Bcc"] is None and message["Cc"] is None
        assert {k.lower() for k in message} <= allowed_headers, message.keys()
        raw_head = received.content.split(b"\r\n\r\n", 1)[0].decode("ascii")
        assert not re.search(r"(?im)^(bcc|cc|reply-to|x-evil)\s*:", raw_head), raw_head
        html_part = message.get_body(("html",))
        assert html_part is not None
        html = html_part.get_content()
        assert "<script>" not in html and "</script>" not in html
        assert SCRIPT_HTML in html, html
        assert "Robert'); DROP" not in html
        assert SQL_HTML in html
        html_checked += 1
        for part in message.iter_attachments():  # the calendar entry: one event, no attendee
            ics = part.get_content()
            assert ics.count("BEGIN:VEVENT") == 1
            assert not re.search(r"(?im)^(ATTENDEE|BCC)", ics), ics
    # the RSVP pages, fetched over the listener as a phone would
    links = []
    for received in messages:
        text = received.message.get_body(("plain",)).get_content()
        links += re.findall(r"(http://\S+/crew/rsvp/\S+)", text)
    assert len(links) == 8
    for link in links:
        page = requests.get(link, timeout=10)
        assert page.status_code == 200
        assert "<script>" not in page.text
        assert SCRIPT_HTML in page.text
        assert SQL_HTML in page.text
        assert "Robert'); DROP" not in page.text
    # the terminal: rich markup in a name is shown literally, not interpreted
    listing = runner.invoke(app, ["people", "list"], env={"COLUMNS": "250"})
    assert listing.exit_code == 0 and MARKUP in listing.stdout

    check_after, tables_after, counts = tables(office)
    assert (check_before, check_after) == ("ok", "ok")
    assert tables_before == tables_after and tables_after >= EXPECTED_TABLES
    assert counts["person"] == 8 and counts["event"] == 4 and counts["event_crew"] == 8
    assert counts["email_notification"] == 12 and counts["balance_entry"] == 4
    names = sorted(p["name"] for p in run_json("people", "list"))
    stored = [" ".join(t.split()) for t in hostile]  # kept literally, on one line
    assert names == sorted(stored + [f"{t} csv" for t in stored])
    figures(
        18, emails=len(messages), html_bodies_checked=html_checked, rsvp_pages=len(links),
        extra_recipients=sum(len(m.recipients) - 1 for m in messages),
        integrity=check_after, tables=len(tables_after),
    )  # fmt: skip
