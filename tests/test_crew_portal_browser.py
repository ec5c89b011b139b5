"""A crew member's own page in a real browser: headless Chromium (Debian's `chromium`, driven
by Playwright) at a phone's size, against the real listener. Each step's screenshot is kept in
test-artifacts/crew-page/ (not committed).

CI installs Chromium and sets SFCRM_REQUIRE_BROWSER=1, so a missing browser fails there
instead of skipping."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import run, run_json
from test_crew_portal import Site, assign, day, event, person, site  # noqa: F401 - the fixture

from sfcrm.db import Database
from sfcrm.models import EventCrew

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts" / "crew-page"
PHONE = {"width": 390, "height": 844}


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    if shutil.which("chromium") is None:
        return "Debian's chromium is not installed"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    missing = _browser_missing()
    if missing:
        if os.environ.get("SFCRM_REQUIRE_BROWSER"):
            pytest.fail(f"{missing}, and SFCRM_REQUIRE_BROWSER is set")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=shutil.which("chromium"),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def phone(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    page = context.new_page()
    errors: list[str] = []
    # what the page's own policy refused to load or run (its 403/409 answers are on purpose)
    page.on("console", lambda m: errors.append(m.text) if "Refused to" in m.text else None)
    folder = ARTIFACTS / request.node.name.replace("[", "-").rstrip("]")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    page.shot = lambda name: page.screenshot(path=str(folder / f"{name}.png"), full_page=True)
    try:
        yield page
        assert errors == []
    finally:
        context.close()


def titles(page: Any, group: str) -> list[str]:
    return [t.strip() for t in page.locator(f"section#{group} article h3").all_inner_texts()]


def worked(url: str, assignment_id: str) -> None:
    """An event the person worked, as `crew complete` leaves it after the event."""
    db = Database(url)
    try:
        with db.write() as session:
            crew = session.get(EventCrew, int(assignment_id))
            assert crew is not None
            crew.status = "completed"
            session.add(crew)
    finally:
        db.close()


def test_a_crew_member_answers_from_their_phone(
    site: Site,  # noqa: F811
    phone: Any,
    database_url: str,
) -> None:
    office = database_url
    amos = person("Amos Otieno", "0722111002")
    gala = event("Safari Gala", day(5), "--time", "16:00", "--end-time", "23:00")
    rally = event("Rally Night", day(8), "--time", "18:00")
    wedding = event("Wedding", day(12))
    done = event("Past Expo", day(-6), "--past")
    clash = event("Late Gig", day(5), "--time", "20:00")
    gala_id = assign(gala, amos)
    assign(rally, amos, "Stagehand")
    run("crew", "decline", assign(wedding, amos, "Usher"))
    worked(office, assign(done, amos, "Usher", "--past"))
    link = site.link(amos)

    # open the link: the four groups
    phone.goto(link)
    phone.shot("1-opened")
    assert phone.locator("h1").inner_text() == "Hello Amos Otieno"
    assert titles(phone, "pending") == ["Safari Gala", "Rally Night"]
    assert titles(phone, "confirmed") == []
    assert titles(phone, "completed") == ["Past Expo"]
    assert titles(phone, "declined") == ["Wedding"]
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"]  # nothing wider than the phone

    # Confirm the gala: it moves to Confirmed
    card = phone.locator(f"#assignment-{gala_id}")
    card.get_by_role("button", name="Confirm").click()
    phone.wait_for_load_state()
    phone.shot("2-confirmed")
    assert "Safari Gala: confirmed. Thank you." in phone.get_by_role("status").inner_text()
    assert titles(phone, "pending") == ["Rally Night"]
    assert titles(phone, "confirmed") == ["Safari Gala"]

    # then Can't make it: declined, and it stays so after a reload (no answer twice)
    phone.locator(f"#assignment-{gala_id}").get_by_role("button", name="Can't make it").click()
    phone.wait_for_load_state()
    phone.reload()
    phone.shot("3-declined-reloaded")
    assert "Safari Gala" in titles(phone, "declined")
    assert run_json("crew", "list", "--event", gala)[0]["status"] == "declined"

    # booked elsewhere at that time since: confirming again is refused, naming the clash
    run("crew", "confirm", assign(clash, amos, "Usher", "--allow-overlap"))
    phone.goto(link)
    phone.locator(f"#assignment-{gala_id}").get_by_role("button", name="Confirm").click()
    phone.wait_for_load_state()
    phone.shot("4-clash-refused")
    problem = phone.get_by_role("status").inner_text()
    assert "You are already on Late Gig" in problem and "call the office" in problem
    assert run_json("crew", "list", "--event", gala)[0]["status"] == "declined"

    # the office resets the link: the old one gets the 403 page with the office's contact
    site.link(amos, "--reset")
    response = phone.goto(link)
    phone.shot("5-revoked")
    assert response is not None and response.status == 403
    assert "This link is not valid" in phone.locator("h1").inner_text()
    assert phone.get_by_role("link", name="0711 000 111").count() in (0, 1)
    assert "0711 000 111" in phone.content()
