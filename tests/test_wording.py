"""How sfcrm's words read to people: "an Usher", "1 person", a subject said once, phones as
``0722 111 002`` with tap-to-call, and an RSVP page a crew member understands. Emails land in a
real SMTP server on loopback, the RSVP page is fetched over the real listener, the CLI runs
in-process."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
from support import SmtpSink, rsvp_link_in, rsvp_server, run, run_json, wait_for

from sfcrm.emulator import DarajaEmulator
from sfcrm.wording import about, article, plural, with_article

NAIROBI = ZoneInfo("Africa/Nairobi")


def day(offset: int) -> str:
    return (datetime.now(NAIROBI) + timedelta(days=offset)).date().isoformat()


def long_day(offset: int) -> str:
    """A date as the emails and pages write it: ``Tuesday 01 December 2026``."""
    return datetime.fromisoformat(day(offset)).strftime("%A %d %B %Y")


# -- the helpers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("Usher", "an Usher"),
        ("usher", "an usher"),
        ("Sound Engineer", "a Sound Engineer"),
        ("Electrician", "an Electrician"),
        ("Audio tech", "an Audio tech"),
        ("Intern", "an Intern"),
        ("Operator", "an Operator"),
        ("Lighting Tech", "a Lighting Tech"),
        ("MC", "an MC"),
        ("DJ", "a DJ"),
        ("LED wall tech", "an LED wall tech"),
        ("Unit lead", "a Unit lead"),
        ("Utility hand", "a Utility hand"),
        ("European guest", "a European guest"),
        ("one-day runner", "a one-day runner"),
        ("Hourly runner", "an Hourly runner"),
        ("Host", "a Host"),
    ],
)
def test_article_goes_by_the_sound_of_the_word(word: str, expected: str) -> None:
    assert with_article(word) == expected
    assert article(word) == expected.split()[0]


def test_plural_says_one_or_many() -> None:
    assert plural(1, "person", "people") == "1 person"
    assert plural(2, "person", "people") == "2 people"
    assert plural(0, "person", "people") == "0 people"
    assert plural(1, "email") == "1 email"
    assert plural(3, "email") == "3 emails"
    assert plural(1, "crew member") == "1 crew member"


def test_about_names_the_subject_once() -> None:
    assert about("payment 7", "Daraja is busy") == "payment 7: Daraja is busy"
    assert about("payment 7", "payment 7 is completed") == "payment 7 is completed"
    assert about("payment 7", "payment 7: Daraja is busy") == "payment 7: Daraja is busy"
    assert about("payment 7", "payment 70 is completed") == "payment 7: payment 70 is completed"


# -- the office, as the CLI runs it -------------------------------------------------------------


@pytest.fixture
def office(monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    """The office's database, for the CLI: each test that uses it runs on each engine."""
    monkeypatch.setenv("SFCRM_DATABASE_URL", database_url)
    return database_url


@pytest.fixture
def smtp_env(monkeypatch: pytest.MonkeyPatch, smtp_sink: SmtpSink, office: str) -> SmtpSink:
    monkeypatch.setenv("EMAIL_BACKEND", "smtp")
    monkeypatch.setenv("EMAIL_HOST", "127.0.0.1")
    monkeypatch.setenv("EMAIL_PORT", str(smtp_sink.port))
    monkeypatch.setenv("DEFAULT_FROM_EMAIL", "Sound Fusion <office@soundfusion.test>")
    monkeypatch.setenv("SFCRM_ORG_NAME", "Sound Fusion")
    monkeypatch.setenv("SFCRM_ORG_PHONE", "0711000111")
    monkeypatch.setenv("SFCRM_ORG_EMAIL", "office@soundfusion.test")
    return smtp_sink


def add_person(name: str, phone: str, email_address: str | None = None) -> int:
    args = ["people", "add", "--name", name, "--phone", phone]
    if email_address:
        args += ["--email", email_address]
    return int(run_json(*args)["id"])


def add_event(name: str, offset: int, *extra: str) -> int:
    doc = run_json("events", "add", "--name", name, "--date", day(offset),
                   "--location", "KICC, Nairobi", *extra)  # fmt: skip
    return int(doc["id"])


def assign(event: int, person: int, role: str, *extra: str) -> int:
    doc = run_json("crew", "assign", "--event", str(event), "--person", str(person),
                   "--role", role, *extra)  # fmt: skip
    return int(doc["id"])


def parts(received: Any) -> tuple[str, str]:
    message = received.message
    return (
        message.get_body(("plain",)).get_content(),
        message.get_body(("html",)).get_content(),
    )


# -- emails ------------------------------------------------------------------------------------


def test_invitation_asks_an_usher_and_gives_the_office_phone_to_tap(smtp_env: SmtpSink) -> None:
    event = add_event("Gala", 5, "--time", "18:00")
    assign(event, add_person("Achieng", "0712000001", "a@x.co.ke"), "Usher")

    run_json("crew", "invite", "--event", str(event))

    [received] = smtp_env.handler.messages
    text, html = parts(received)
    assert "You are invited to work as an Usher for the following event:" in text
    assert "work as an <strong>Usher</strong>" in html
    assert "a Usher" not in text + html
    assert "call the office on 0711 000 111." in text
    assert '<a href="tel:+254711000111">0711 000 111</a>' in html
    assert '<a href="mailto:office@soundfusion.test">office@soundfusion.test</a>' in html
    assert "0711000111" not in text + html


def test_briefing_roster_shows_phones_spaced_and_tap_to_call(smtp_env: SmtpSink) -> None:
    event = add_event("Gala", 2, "--time", "18:00")
    first = assign(event, add_person("Achieng", "0722111002", "a@x.co.ke"), "Sound Engineer")
    second = assign(event, add_person("Baraka", "+254 110 123 456", "b@x.co.ke"), "Usher")
    for assignment in (first, second):
        run_json("crew", "confirm", str(assignment))

    run_json("crew", "brief", "--event", str(event))

    assert len(smtp_env.handler.messages) == 2
    text, html = parts(smtp_env.handler.messages[0])
    assert "- Achieng, Sound Engineer, 0722 111 002" in text
    assert "- Baraka, Usher, 0110 123 456" in text
    assert "Office contact: Sound Fusion, 0711 000 111, office@soundfusion.test" in text
    assert '<a href="tel:+254722111002">0722 111 002</a>' in html
    assert '<a href="tel:+254110123456">0110 123 456</a>' in html
    assert "254722111002" not in text and "254110123456" not in text


# -- the RSVP page -------------------------------------------------------------------------------


@pytest.fixture
def rsvp_listener(monkeypatch: pytest.MonkeyPatch, smtp_env: SmtpSink) -> Any:
    with rsvp_server(monkeypatch) as base:
        yield base


def test_rsvp_page_shows_the_event_the_office_and_the_answer_in_words(
    rsvp_listener: str, smtp_env: SmtpSink
) -> None:
    event = add_event("Gala", 5, "--time", "18:00", "--end-time", "23:30",
                      "--details", "Black clothes")  # fmt: skip
    assign(event, add_person("Achieng", "0712000001", "a@x.co.ke"), "Usher",
           "--notes", "Bring the DI boxes")  # fmt: skip
    run_json("crew", "invite", "--event", str(event))
    link = rsvp_link_in(smtp_env.handler.messages[-1].message)

    page = requests.get(link, timeout=10).text

    for shown in ("Gala", long_day(5), "18:00, until 23:30", "KICC, Nairobi", "Black clothes",
                  "Bring the DI boxes", "<dt>Your role</dt><dd>Usher</dd>",
                  "work as an <strong>Usher</strong>",
                  "You have not answered yet."):  # fmt: skip
        assert shown in page, shown
    assert '<a href="tel:+254711000111">0711 000 111</a>' in page
    assert '<a href="mailto:office@soundfusion.test">office@soundfusion.test</a>' in page
    assert "answer so far" not in page and "invited</strong>" not in page

    done = requests.post(link, data={"answer": "confirm"}, timeout=10).text
    assert "confirmed</strong> as Usher for Gala on " + long_day(5) + " at 18:00" in done
    assert '<a href="tel:+254711000111">0711 000 111</a>' in done
    today = datetime.now(NAIROBI).strftime("%A %d %B %Y")
    assert f"You confirmed on {today}." in requests.get(link, timeout=10).text

    requests.post(link, data={"answer": "decline"}, timeout=10)
    assert f"You declined on {today}." in requests.get(link, timeout=10).text


def test_rsvp_page_without_an_office_phone_or_email_names_the_office_only(
    rsvp_listener: str, smtp_env: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    event = add_event("Gala", 5)
    assign(event, add_person("Achieng", "0712000001", "a@x.co.ke"), "Runner")
    run_json("crew", "invite", "--event", str(event))
    link = rsvp_link_in(smtp_env.handler.messages[-1].message)
    monkeypatch.delenv("SFCRM_ORG_PHONE")
    monkeypatch.delenv("SFCRM_ORG_EMAIL")

    with rsvp_server(monkeypatch) as base:
        page = requests.get(base + link[link.index("/crew/rsvp/") :], timeout=10).text

    assert "Questions? Please contact the Sound Fusion office." in page
    assert "tel:" not in page and "mailto:" not in page
    assert "<dt>Call time</dt>" not in page  # the event has no time


# -- the CLI -------------------------------------------------------------------------------------


@pytest.mark.usefixtures("office")
def test_people_table_shows_phones_spaced_while_json_and_csv_keep_the_stored_form() -> None:
    add_person("Achieng Otieno", "0722111002")

    table = run("people", "list")
    assert "0722 111 002" in table.stdout and "254722111002" not in table.stdout
    assert run_json("people", "list")[0]["phone"] == "254722111002"
    csv = run("people", "list", "--csv").stdout
    assert "254722111002" in csv and "0722 111 002" not in csv


@pytest.mark.usefixtures("office")
def test_people_import_of_one_says_one_person(tmp_path: Path) -> None:
    file = tmp_path / "crew.csv"
    file.write_text("name,phone,email,balance\nAchieng,0712000001,a@x.co.ke,0\n")

    result = run("people", "import", str(file))

    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"Imported 1 person from {file}."


def test_removed_crew_member_confirming_is_told_once_which_assignment(smtp_env: SmtpSink) -> None:
    event = add_event("Gala", 5)
    assignment = assign(event, add_person("Achieng", "0712000001", "a@x.co.ke"), "Usher")
    run_json("crew", "remove", str(assignment), "--quiet")

    result = run("crew", "confirm", str(assignment))

    assert result.exit_code == 6
    assert result.stderr.splitlines()[0] == (
        f"Error: the crew member was removed from Gala (assignment {assignment})"
    )


@pytest.mark.usefixtures("office")
def test_resend_of_a_completed_payment_names_the_payment_once(
    cli_env: dict[str, str], emulator: DarajaEmulator
) -> None:
    run_json("people", "add", "--name", "Wanjiru", "--phone", "0708374149", "--balance", "1500")
    run_json("mpesa", "request", "--person", "1", "--amount", "500", "--purpose", "Deposit")
    wait_for(lambda: run_json("mpesa", "status", "1")["status"] == "completed")

    result = run("mpesa", "resend", "1")

    assert result.exit_code == 6
    assert result.stderr.splitlines()[0] == "payment 1 is completed; it is never pushed again"
    table = run("mpesa", "status").stdout
    assert "0708 374 149" in table and "254708374149" not in table
