"""One JSON shape for every batch command: ``crew invite|remind|brief``, ``mail retry`` and
``mpesa resend`` each print ``{"results": [...], "counts": {...}, "total": n}``, one item for
each assignment, email or payment, over the real CLI, a real SMTP server and the emulator."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import update
from sqlmodel import col
from support import SmtpSink, run, run_json, unstamped, wait_for

from sfcrm.cli.runtime import RootOptions, Runtime
from sfcrm.models import EmailNotification

NAIROBI = ZoneInfo("Africa/Nairobi")
TOP = {"results", "counts", "total"}
ITEM = {"email_id", "outcome", "message"}


@pytest.fixture
def office(monkeypatch: pytest.MonkeyPatch, database_url: str, smtp_sink: SmtpSink) -> SmtpSink:
    """An office whose emails go to a real SMTP server."""
    for name, value in {
        "SFCRM_DATABASE_URL": database_url,
        "DEFAULT_FROM_EMAIL": "Sound Fusion <office@soundfusion.test>",
        "EMAIL_BACKEND": "smtp",
        "EMAIL_HOST": "127.0.0.1",
        "EMAIL_PORT": str(smtp_sink.port),
    }.items():
        monkeypatch.setenv(name, value)
    return smtp_sink


def add_event(hours: float) -> int:
    when = datetime.now(NAIROBI) + timedelta(hours=hours)
    doc = run_json("events", "add", "--name", "Gala", "--date", when.date().isoformat(),
                   "--time", when.strftime("%H:%M"), "--location", "KICC")  # fmt: skip
    return int(doc["id"])


def crew(event: int, name: str, phone: str, email: str | None, *, confirmed: bool = False) -> int:
    contact = ["--email", email] if email else []
    person = run_json("people", "add", "--name", name, "--phone", phone, *contact)
    doc = run_json("crew", "assign", "--event", str(event), "--person", str(person["id"]),
                   "--role", "Sound")  # fmt: skip
    if confirmed:
        run_json("crew", "confirm", str(doc["id"]))
    return int(doc["id"])


def test_invite_json_has_an_item_per_assignment_with_its_email_and_outcome(
    office: SmtpSink,
) -> None:
    event = add_event(48)
    sent = crew(event, "Achieng", "0712000001", "achieng@example.co.ke")
    refused = crew(event, "Baraka", "0712000002", "baraka@example.co.ke")
    archived = crew(event, "Chebet", "0712000003", "chebet@example.co.ke")
    run_json("people", "archive", "3")
    office.handler.perm_fail.add("baraka@example.co.ke")

    doc = run_json("crew", "invite", "--event", str(event), code=10)

    [achieng, baraka, chebet] = doc["results"]
    assert achieng == {"assignment_id": sent, "email_id": 1, "outcome": "sent", "message": None}
    assert (baraka["assignment_id"], baraka["email_id"], baraka["outcome"]) == (
        refused, 2, "failed",
    )  # fmt: skip
    assert "550" in baraka["message"]
    assert chebet == {"assignment_id": archived, "email_id": None, "outcome": "skipped",
                      "message": "Chebet is archived"}  # fmt: skip
    assert (doc["counts"], doc["total"]) == ({"sent": 1, "failed": 1, "skipped": 1}, 3)
    # the failure joins the same document, exit 10 as before
    assert doc["code"] == "MAIL_ERROR" and doc["error"] == "1 of 2 emails failed"


def test_remind_json_names_the_reminder_written_and_the_crew_member_passed_over(
    office: SmtpSink,
) -> None:
    event = add_event(3)
    reminded = crew(event, "Achieng", "0712000001", "achieng@example.co.ke", confirmed=True)
    no_email = crew(event, "Baraka", "0712000002", None, confirmed=True)

    assert run_json("crew", "remind") == {
        "results": [
            {"assignment_id": reminded, "email_id": 1, "outcome": "sent", "message": None},
            {"assignment_id": no_email, "email_id": None, "outcome": "skipped",
             "message": "Baraka has no email address"},
        ],
        "counts": {"sent": 1, "skipped": 1},
        "total": 2,
    }  # fmt: skip


def test_brief_json_skips_those_already_briefed_with_the_reason_the_text_gives(
    office: SmtpSink,
) -> None:
    event = add_event(24 * 3)
    first = crew(event, "Achieng", "0712000001", "achieng@example.co.ke", confirmed=True)
    second = crew(event, "Baraka", "0712000002", "baraka@example.co.ke", confirmed=True)
    assert [r["outcome"] for r in run_json("crew", "brief", "--event", str(event))["results"]] == [
        "sent",
        "sent",
    ]

    again = run_json("crew", "brief", "--event", str(event))

    why = "briefing already written (use --again to send it once more)"
    assert again == {
        "results": [
            {"assignment_id": first, "email_id": None, "outcome": "skipped", "message": why},
            {"assignment_id": second, "email_id": None, "outcome": "skipped", "message": why},
        ],
        "counts": {"skipped": 2},
        "total": 2,
    }
    text = run("crew", "brief", "--event", str(event))
    assert f"assignment {first} skipped: {why}" in text.stderr
    assert unstamped(text.stdout) == "Briefings: 0 sent, 0 failed, 2 skipped.\n"


def test_mail_retry_json_has_an_item_per_email_with_its_assignment_or_none(
    office: SmtpSink,
) -> None:
    event = add_event(48)
    later = crew(event, "Achieng", "0712000001", "achieng@example.co.ke")
    never = crew(event, "Baraka", "0712000002", "baraka@example.co.ke")
    office.handler.temp_fail.add("achieng@example.co.ke")
    office.handler.perm_fail.add("baraka@example.co.ke")
    run_json("crew", "invite", "--event", str(event), code=10)
    rt = Runtime(RootOptions(), json_output=False)  # an email no crew member is on
    try:
        with rt.db.write() as session:
            office_email = rt.mailer.queue(
                session, recipient="accounts@example.co.ke", notification_type="crew_briefing",
                subject="Statement", text="Attached\n",
            )  # fmt: skip
            session.exec(
                update(EmailNotification)
                .where(col(EmailNotification.id) == office_email)
                .values(claimed_until=None)  # its writer is gone: queued
            )
    finally:
        rt.close()
    office.handler.temp_fail.clear()

    doc = run_json("mail", "retry")

    assert doc == {
        "results": [
            {"email_id": 1, "assignment_id": later, "outcome": "sent", "message": None},
            {"email_id": 2, "assignment_id": never, "outcome": "not_retried",
             "message": "permanent refusal (550) — `sfcrm mail retry 2` to force"},
            {"email_id": office_email, "assignment_id": None, "outcome": "sent", "message": None},
        ],
        "counts": {"sent": 2, "not_retried": 1},
        "total": 3,
    }  # fmt: skip


def test_resend_json_has_an_item_per_payment_and_exits_1_when_one_is_not_pushed(
    cli_env: dict[str, str],
) -> None:
    run_json("people", "add", "--name", "Cancels", "--phone", "0700000032", "--balance", "20")
    run_json("people", "add", "--name", "Wanjiru", "--phone", "0708374149", "--balance", "500")
    run_json("mpesa", "request", "--person", "1", "--amount", "20", "--purpose", "Deposit")
    run_json("mpesa", "request", "--person", "2", "--amount", "500", "--purpose", "Deposit")
    wait_for(lambda: run_json("mpesa", "status", "1")["status"] == "cancelled")
    wait_for(lambda: run_json("mpesa", "status", "2")["status"] == "completed")

    doc = run_json("mpesa", "resend", "1", "2", code=1)

    assert doc["results"] == [
        {"payment_id": 1, "email_id": None, "outcome": "pushed",
         "message": "STK push sent again"},
        {"payment_id": 2, "email_id": None, "outcome": "not_pushed",
         "message": "payment 2 is completed; it is never pushed again"},
    ]  # fmt: skip
    assert (doc["counts"], doc["total"]) == ({"pushed": 1, "not_pushed": 1}, 2)
    assert doc["code"] == "PARTIAL_FAILURE"
    text = run("mpesa", "resend", "2")  # the same words in text; one payment: its own exit
    assert text.exit_code == 6
    assert unstamped(text.stdout) == "Resend: 0 pushed, 0 already paid, 1 not pushed.\n"


def test_all_five_batch_commands_print_the_same_keys(
    cli_env: dict[str, str], office: SmtpSink
) -> None:
    event = add_event(3)
    crew(event, "Achieng", "0712000001", "achieng@example.co.ke")
    run_json("people", "add", "--name", "Cancels", "--phone", "0700000032", "--balance", "20")
    run_json("mpesa", "request", "--person", "2", "--amount", "20", "--purpose", "Deposit")
    wait_for(lambda: run_json("mpesa", "status", "1")["status"] == "cancelled")

    docs: dict[str, Any] = {"invite": run_json("crew", "invite", "--event", str(event))}
    run_json("crew", "confirm", "1")
    docs["remind"] = run_json("crew", "remind")
    docs["brief"] = run_json("crew", "brief", "--event", str(event))
    docs["retry"] = run_json("mail", "retry", "1")
    docs["resend"] = run_json("mpesa", "resend", "1")

    ids = {"invite": {"assignment_id"}, "remind": {"assignment_id"}, "brief": {"assignment_id"},
           "retry": {"assignment_id"}, "resend": {"payment_id"}}  # fmt: skip
    for name, doc in docs.items():
        assert set(doc) == TOP, name
        assert doc["total"] == len(doc["results"]) == sum(doc["counts"].values()) == 1, name
        [item] = doc["results"]
        assert set(item) == ITEM | ids[name], name
    assert [docs[n]["results"][0]["outcome"] for n in docs] == [
        "sent", "sent", "sent", "not_retried", "pushed",
    ]  # fmt: skip
