"""Each crew member's own page, `/crew/me/<token>`, and their calendar feed, over the real
listener on a loopback socket, as `serve-callback` serves them, on each engine."""

from __future__ import annotations

import email
import email.policy
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import icalendar
import pytest
import requests
from support import SmtpSink, free_port, run, run_json

from sfcrm.server import make_server

NAIROBI = ZoneInfo("Africa/Nairobi")
SECRET = "crew-page-test-secret-key-0123456789"


def day(offset: int) -> str:
    return (datetime.now(NAIROBI) + timedelta(days=offset)).date().isoformat()


@dataclass
class Site:
    base: str

    def link(self, person: str, *extra: str) -> str:
        return str(run_json("crew", "link", person, *extra)["page"])

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return requests.get(url, timeout=10, allow_redirects=False, **kwargs)

    def post(self, url: str, **form: str) -> requests.Response:
        return requests.post(url, data=form, timeout=10, allow_redirects=False)


@contextmanager
def serving(monkeypatch: pytest.MonkeyPatch, database_url: str, **env: str) -> Iterator[Site]:
    """The listener the office runs (`sfcrm serve-callback`'s app), crew pages on, with the
    settings ``env`` adds."""
    from sfcrm.cli.runtime import RootOptions, Runtime

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("SFCRM_DATABASE_URL", database_url)
    monkeypatch.setenv("SFCRM_SECRET_KEY", SECRET)
    monkeypatch.setenv("SFCRM_PUBLIC_URL", base)
    monkeypatch.setenv("SFCRM_ORG_PHONE", "0711000111")
    monkeypatch.setenv("SFCRM_ORG_EMAIL", "office@soundfusion.test")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rt = Runtime(RootOptions(), json_output=False)
    server = make_server(rt.services.callback_app(), "127.0.0.1", port, 4)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        yield Site(base)
    finally:
        server.close()
        rt.close()


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch, database_url: str) -> Iterator[Site]:
    with serving(monkeypatch, database_url) as served:
        yield served


def person(name: str, phone: str) -> str:
    return str(run_json("people", "add", "--name", name, "--phone", phone)["id"])


def event(name: str, date: str, *extra: str) -> str:
    doc = run_json("events", "add", "--name", name, "--date", date, "--location", "KICC",
                   *extra)  # fmt: skip
    return str(doc["id"])


def assign(event_id: str, person_id: str, role: str = "Sound Engineer", *extra: str) -> str:
    return str(run_json("crew", "assign", "--event", event_id, "--person", person_id,
                        "--role", role, *extra)["id"])  # fmt: skip


def section(html: str, group: str) -> str:
    match = re.search(rf'<section id="{group}">(.*?)</section>', html, re.S)
    return match.group(1) if match else ""


def test_the_page_shows_every_group_with_the_event_details(site: Site) -> None:
    amos = person("Amos Otieno", "0722111002")
    gala = event("Safari Gala", day(5), "--time", "16:00", "--end-time", "23:00",
                 "--details", "Black clothes")  # fmt: skip
    rally = event("Rally Night", day(9))
    wedding = event("Wedding", day(12))
    old = event("Old Show", day(-5), "--past")
    dropped = event("Dropped", day(20))
    pending = assign(gala, amos, "Sound Engineer", "--notes", "Bring the DI boxes")
    confirmed = assign(rally, amos, "Stagehand")
    declined = assign(wedding, amos, "Usher")
    assign(old, amos, "Usher", "--past")  # worked, not yet marked completed by the office
    assign(dropped, amos, "Usher")
    run("crew", "confirm", confirmed)
    run("crew", "decline", declined)
    run("events", "cancel", dropped, "--quiet")

    page = site.get(site.link(amos))
    assert page.status_code == 200
    html = page.text
    assert "Hello Amos Otieno" in html
    waiting = section(html, "pending")
    assert f'id="assignment-{pending}"' in waiting and "Safari Gala" in waiting
    for shown in ("16:00", "23:00", "KICC", "Sound Engineer", "Bring the DI boxes",
                  "Black clothes"):  # fmt: skip
        assert shown in waiting
    assert 'value="confirm"' in waiting and 'value="decline"' in waiting
    assert "Rally Night" in section(html, "confirmed")
    assert "Wedding" in section(html, "declined")
    assert "Dropped" in section(html, "cancelled") and "Cancelled" in section(html, "cancelled")
    assert "Old Show" in section(html, "confirmed")
    assert section(html, "confirmed").index("Rally Night") < section(html, "confirmed").index(
        "Old Show"
    )  # what is ahead first
    assert 'value="decline"' not in section(html, "confirmed").split("Old Show")[1]
    assert 'href="tel:+254711000111"' in html and "0711 000 111" in html
    assert 'href="mailto:office@soundfusion.test"' in html
    # safe to expose
    headers = page.headers
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Robots-Tag"] == "noindex"
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["Referrer-Policy"] == "no-referrer"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    nonce = re.search(r"'nonce-([^']+)'", csp)
    assert nonce and f'<style nonce="{nonce.group(1)}">' in html
    assert "<script" not in html and "http" not in re.sub(r"(href|code)[^<]*", "", html)


def test_confirm_and_decline_from_the_page_move_the_event(site: Site) -> None:
    amos = person("Amos", "0722111002")
    gala = event("Gala", day(5))
    crew_id = assign(gala, amos)
    url = site.link(amos)

    assert site.get(url).status_code == 200
    assert run_json("crew", "list", "--event", gala)[0]["status"] == "invited"  # GET: nothing

    answered = site.post(url, assignment=crew_id, answer="confirm")
    assert answered.status_code == 303
    token = url.rsplit("/", 1)[1]
    assert answered.headers["Location"] == f"/crew/me/{token}?done=confirm-{crew_id}"
    back = site.get(site.base + answered.headers["Location"])
    assert "Gala: confirmed. Thank you." in back.text
    assert "Gala" in section(back.text, "confirmed") and "Gala" not in section(back.text, "pending")
    assert run_json("crew", "list", "--event", gala)[0]["status"] == "confirmed"

    site.post(url, assignment=crew_id, answer="decline")
    assert "Gala" in section(site.get(url).text, "declined")
    history = run_json("history", "--event", gala)
    assert [(e["action"], e["reason"]) for e in history[:2]] == [
        ("assignment.decline", "crew page"), ("assignment.confirm", "crew page"),
    ]  # fmt: skip


def test_a_clash_is_refused_naming_the_other_event(site: Site) -> None:
    amos = person("Amos", "0722111002")
    gala = event("Gala", day(5), "--time", "18:00")
    other = event("Other Gig", day(5), "--time", "20:00")
    first = assign(gala, amos)
    run("crew", "decline", first)
    run("crew", "confirm", assign(other, amos, "Usher", "--allow-overlap"))
    answered = site.post(site.link(amos), assignment=first, answer="confirm")
    assert answered.status_code == 409
    assert "You are already on Other Gig" in answered.text and "call the office" in answered.text
    assert run_json("crew", "list", "--event", gala)[0]["status"] == "declined"


def test_nobody_answers_for_someone_else_or_after_the_event(site: Site) -> None:
    amos, beth = person("Amos", "0722111002"), person("Beth", "0722111003")
    gala = event("Gala", day(5))
    beths = assign(gala, beth)
    answered = site.post(site.link(amos), assignment=beths, answer="confirm")
    assert answered.status_code == 404
    assert run_json("crew", "list", "--event", gala)[0]["status"] == "invited"
    old = event("Old", day(-3), "--past")
    past = assign(old, amos, "Usher", "--past")
    assert site.post(site.link(amos), assignment=past, answer="decline").status_code == 409
    assert site.post(site.link(amos), assignment=past, answer="maybe").status_code == 400


def test_a_reset_link_and_a_forged_one_get_the_403_page(site: Site) -> None:
    amos = person("Amos", "0722111002")
    old_link = site.link(amos)
    assert site.link(amos) == old_link  # the same link until reset
    new_link = site.link(amos, "--reset", "--reason", "lost phone")
    assert new_link != old_link
    denied = site.get(old_link)
    assert denied.status_code == 403
    assert "0711 000 111" in denied.text and "office@soundfusion.test" in denied.text
    assert site.get(new_link).status_code == 200
    assert site.get(new_link[:-2] + "xx").status_code == 403
    assert site.get(site.base + "/crew/me/1.").status_code == 403
    assert site.get(site.base + "/crew/me/nonsense").status_code == 403
    run("people", "archive", amos)
    assert site.get(new_link).status_code == 403
    entry = run_json("history", "--person", amos)
    assert "person.link_reset" in [e["action"] for e in entry]


def test_check_in_opens_two_hours_before_the_call(site: Site) -> None:
    amos = person("Amos", "0722111002")
    soon = datetime.now(NAIROBI) + timedelta(minutes=90)
    later = datetime.now(NAIROBI) + timedelta(hours=30)
    now_event = event("Tonight", soon.date().isoformat(), "--time", soon.strftime("%H:%M"),
                      "--end-time", "23:59" if soon.hour < 23 else "")  # fmt: skip
    later_event = event("Tomorrow", later.date().isoformat(), "--time", later.strftime("%H:%M"))
    tonight, tomorrow = assign(now_event, amos), assign(later_event, amos, "Usher")
    run("crew", "confirm", tonight)
    run("crew", "confirm", tomorrow)
    url = site.link(amos)
    html = site.get(url).text
    assert 'value="checkin"' in html.split(f'id="assignment-{tomorrow}"')[0]
    assert 'value="checkin"' not in html.split(f'id="assignment-{tomorrow}"')[1]
    assert site.post(url, assignment=tomorrow, answer="checkin").status_code == 409
    assert site.post(url, assignment=tonight, answer="checkin").status_code == 303
    html = site.get(url).text
    assert "Checked in" in html and 'value="checkin"' not in html
    refused = run("crew", "checkin", tomorrow)
    assert refused.exit_code == 6 and "opens two hours before" in refused.stderr


def test_the_roster_of_a_confirmed_event_shows_names_and_roles(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    amos, beth = person("Amos", "0722111002"), person("Beth", "0722111003")
    gala = event("Gala", day(5))
    run("crew", "confirm", assign(gala, amos))
    run("crew", "confirm", assign(gala, beth, "Lighting Technician"))
    html = site.get(site.link(amos)).text
    roster = section(html, "confirmed")
    assert "Amos (you) — Sound Engineer" in roster and "Beth — Lighting Technician" in roster
    assert "0722 111 003" not in roster  # phones only when SFCRM_SHOW_CREW_PHONES allows


def test_the_roster_shows_phones_to_tap_when_the_office_allows(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    with serving(monkeypatch, database_url, SFCRM_SHOW_CREW_PHONES="true") as shown:
        amos, beth = person("Amos", "0722111002"), person("Beth", "0722111003")
        gala = event("Gala", day(5))
        run("crew", "confirm", assign(gala, amos))
        run("crew", "confirm", assign(gala, beth, "Lighting Technician"))
        roster = section(shown.get(shown.link(amos)).text, "confirmed")
    assert '<a href="tel:+254722111003">0722 111 003</a>' in roster


def test_the_feed_lists_each_assignment_with_the_invitation_uid(site: Site) -> None:
    amos = person("Amos", "0722111002")
    gala, rally, wedding = (
        event("Gala", day(5), "--time", "16:00"),
        event("Rally", day(7)),
        event("Wedding", day(9)),
    )
    invited = assign(gala, amos)
    confirmed = assign(rally, amos, "Usher")
    declined = assign(wedding, amos, "Usher")
    run("crew", "confirm", confirmed)
    run("crew", "decline", declined)
    doc = run_json("crew", "link", amos)
    assert doc["webcal"] == doc["feed"].replace("http://", "webcal://")
    feed = site.get(doc["feed"])
    assert feed.status_code == 200
    assert feed.headers["Content-Type"] == "text/calendar; charset=utf-8"
    assert b"\r\n" in feed.content and all(len(line) <= 75 for line in feed.content.split(b"\r\n"))
    assert feed.content.startswith(b"BEGIN:VCALENDAR\r\n")
    assert feed.content.endswith(b"END:VCALENDAR\r\n")
    assert b"\n" not in feed.content.replace(b"\r\n", b"")  # no bare line feeds
    calendar = icalendar.Calendar.from_ical(feed.content)
    assert calendar["METHOD"] == "PUBLISH" and "PRODID" in calendar
    assert calendar["VERSION"] == "2.0"
    for entry in calendar.walk("VEVENT"):  # what RFC 5545 requires of each, and clients read
        assert {"UID", "DTSTAMP", "DTSTART", "DTEND", "SUMMARY", "SEQUENCE", "STATUS"} <= set(entry)
        assert entry.decoded("DTSTAMP").utcoffset() == timedelta(0)
    events = {str(e["UID"]): e for e in calendar.walk("VEVENT")}
    assert set(events) == {f"event-{gala}-crew-{invited}@sfcrm",
                           f"event-{rally}-crew-{confirmed}@sfcrm",
                           f"event-{wedding}-crew-{declined}@sfcrm"}  # fmt: skip
    status = {str(e["SUMMARY"]): str(e["STATUS"]) for e in events.values()}
    assert status == {"Gala": "TENTATIVE", "Rally": "CONFIRMED", "Wedding": "CANCELLED"}
    gala_entry = events[f"event-{gala}-crew-{invited}@sfcrm"]
    assert gala_entry.decoded("DTSTART").tzinfo is not None
    assert gala_entry.decoded("DTSTART").astimezone(UTC).hour == 13  # 16:00 in Nairobi
    before = int(gala_entry["SEQUENCE"])
    run("events", "edit", gala, "--time", "17:00", "--quiet")
    again = icalendar.Calendar.from_ical(site.get(doc["feed"]).content)
    moved = {str(e["UID"]): e for e in again.walk("VEVENT")}[f"event-{gala}-crew-{invited}@sfcrm"]
    assert int(moved["SEQUENCE"]) > before
    assert moved.decoded("DTSTART").astimezone(UTC).hour == 14

    def rally_entry() -> Any:
        feed = icalendar.Calendar.from_ical(site.get(doc["feed"]).content)
        [entry] = [e for e in feed.walk("VEVENT") if str(e["SUMMARY"]) == "Rally"]
        return entry

    confirmed_seq = int(rally_entry()["SEQUENCE"])
    run("crew", "decline", confirmed)
    declined_entry = rally_entry()
    assert str(declined_entry["STATUS"]) == "CANCELLED"
    assert int(declined_entry["SEQUENCE"]) > confirmed_seq  # each answer is a change
    assert calendar.to_ical() == icalendar.Calendar.from_ical(calendar.to_ical()).to_ical()


def test_crew_link_needs_the_public_address_and_key(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    monkeypatch.setenv("SFCRM_DATABASE_URL", database_url)
    monkeypatch.delenv("SFCRM_PUBLIC_URL", raising=False)
    amos = person("Amos", "0722111002")
    result = run("crew", "link", amos)
    assert result.exit_code == 3 and "SFCRM_PUBLIC_URL is not set" in result.stderr


def test_every_route_answers_as_documented(site: Site) -> None:
    amos = person("Amos", "0722111002")
    link = site.link(amos)
    head = requests.head(link, timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) > 0
    assert requests.put(link, timeout=10).status_code == 405
    assert site.get(link + "/other").status_code == 404
    assert site.get(link + "/calendar.ics/more").status_code == 404
    assert requests.post(link + "/calendar.ics", timeout=10).status_code == 405
    assert site.get(site.base + "/crew/me/").status_code == 404
    assert site.post(link, assignment="x", answer="confirm").status_code == 400
    assert requests.post(link, data="a" * 5000, timeout=10).status_code == 400


def test_html_in_names_and_notes_is_shown_as_text(site: Site) -> None:
    amos = person("<b>Amos</b>", "0722111002")
    gala = event("<script>alert(1)</script>", day(5))
    assign(gala, amos, "Sound", "--notes", "<img src=x onerror=alert(1)>")
    html = site.get(site.link(amos)).text
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;Amos&lt;/b&gt;" in html


def test_one_address_gets_a_bounded_rate_of_pages(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    # behind a proxy on this machine, each crew member is known by the address it forwards
    with serving(monkeypatch, database_url, SFCRM_LISTENER_PAGE_RATE="5",
                 SFCRM_TRUSTED_PROXIES="127.0.0.1") as limited:  # fmt: skip
        amos = person("Amos", "0722111002")
        link = limited.link(amos)

        def get(url: str, client: str = "41.90.1.2") -> requests.Response:
            return requests.get(url, headers={"X-Forwarded-For": client}, timeout=10)

        answers = [get(link) for _ in range(7)]
        assert [a.status_code for a in answers] == [200] * 5 + [429] * 2
        assert 1 <= int(answers[-1].headers["Retry-After"]) <= 12
        assert get(link[:-3] + "abc").status_code == 429  # guesses count too
        assert get(link, client="41.90.9.9").status_code == 200  # another phone is not held up
        # the proxy's own requests (no forwarded address) are everyone's: never counted
        assert [requests.get(link, timeout=10).status_code for _ in range(7)] == [200] * 7


def test_rsvp_pages_carry_the_same_policy(site: Site, database_url: str) -> None:
    from sfcrm.crew import Crew, Org
    from sfcrm.db import Database
    from sfcrm.rsvp import make_token, rsvp_url

    amos = person("Amos", "0722111002")
    crew_id = int(assign(event("Gala", day(5)), amos))
    db = Database(database_url)
    try:
        row = Crew(db, clock=lambda: datetime.now(UTC), tz=NAIROBI,
                   org=Org("Sound Fusion", None, None)).get(crew_id)  # fmt: skip
    finally:
        db.close()
    now = datetime.now(UTC)
    url = rsvp_url(site.base, make_token(SECRET, crew_id, row.binding, row.event.ends_at, now))
    page = site.get(url)
    assert page.status_code == 200
    csp = page.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp)
    assert nonce and f'<style nonce="{nonce.group(1)}">' in page.text
    assert page.headers["X-Content-Type-Options"] == "nosniff"


def test_invitations_reminders_and_briefings_carry_the_page_link(
    site: Site, tmp_path: Path
) -> None:
    amos = person("Amos", "0722111002")
    run("people", "edit", amos, "--email", "amos@example.co.ke")
    soon = datetime.now(NAIROBI) + timedelta(hours=20)
    gala = event("Gala", soon.date().isoformat(), "--time", soon.strftime("%H:%M"))
    crew_id = assign(gala, amos)
    assert run("crew", "invite", crew_id).exit_code == 0  # the person's key is made with it
    run("crew", "confirm", crew_id)
    assert run("crew", "remind").exit_code == 0
    assert run("crew", "brief", "--event", gala).exit_code == 0
    page = site.link(amos)  # the same link the emails carry: made once, kept
    emails = sorted((tmp_path / "outbox").glob("*.eml"))
    assert len(emails) == 3
    for eml in emails:
        message = email.message_from_bytes(eml.read_bytes(), policy=email.policy.default)
        text = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        html = message.get_body(("html",)).get_content()  # type: ignore[union-attr]
        assert f"your answers: {page}" in text, message["Subject"]
        assert f'href="{page}"' in html
    assert site.get(page).status_code == 200


def test_crew_link_email_sends_the_link_logged_like_every_email(
    site: Site, smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMAIL_BACKEND", "smtp")
    monkeypatch.setenv("EMAIL_HOST", "127.0.0.1")
    monkeypatch.setenv("EMAIL_PORT", str(smtp_sink.port))
    amos = person("Amos", "0722111002")
    before = site.link(amos)
    refused = run("crew", "link", amos, "--email", "--reset")
    assert refused.exit_code == 4 and "Amos has no email address" in refused.stderr
    assert run_json("mail", "list") == [] and site.link(amos) == before  # nothing changed
    run("people", "edit", amos, "--email", "amos@example.co.ke")

    doc = run_json("crew", "link", amos, "--email", "--reset")

    [received] = smtp_sink.handler.messages
    assert received.message["Subject"] == "Your page with Sound Fusion"
    text = received.message.get_body(("plain",)).get_content()
    assert doc["page"] in text and "the old one no longer works" in text
    assert doc["webcal"] in text
    [logged] = run_json("mail", "list", "--type", "crew_link")
    assert (logged["id"], logged["state"]) == (doc["email_id"], "sent")
    assert site.get(doc["page"]).status_code == 200


def test_text_typed_into_an_event_cannot_add_a_line_to_the_feed(site: Site) -> None:
    amos = person("Amos", "0722111002")
    gala = event("Gala", day(5), "--details", "Doors 18:00\rATTENDEE:mailto:x@evil.test\x0bend")
    assign(gala, amos, "Sound", "--notes", "Bring\r\nSTATUS:CANCELLED cables")
    feed = site.get(str(run_json("crew", "link", amos)["feed"])).content
    lines = feed.replace(b"\r\n ", b"").split(b"\r\n")  # unfolded
    assert not any(line.startswith((b"ATTENDEE", b"STATUS:CANCELLED")) for line in lines)
    [entry] = icalendar.Calendar.from_ical(feed).walk("VEVENT")
    assert str(entry["STATUS"]) == "TENTATIVE"
    assert "ATTENDEE:mailto:x@evil.test" in str(entry["DESCRIPTION"])
