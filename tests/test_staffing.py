"""Staffing as the office uses it, through the CLI on each engine: the headcount each event
needs per role (`events needs`), the roles still short (`crew gaps`), and who could fill one
(`crew suggest`)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import update
from support import run, run_json, unstamped

from sfcrm.db import Database
from sfcrm.models import EventCrew

NAIROBI = ZoneInfo("Africa/Nairobi")


def day(offset: int) -> str:
    return (datetime.now(NAIROBI) + timedelta(days=offset)).date().isoformat()


@pytest.fixture(autouse=True)
def office(monkeypatch: pytest.MonkeyPatch, database_url: str) -> str:
    monkeypatch.setenv("SFCRM_DATABASE_URL", database_url)
    return database_url


def person(name: str, phone: str) -> int:
    doc = run_json("people", "add", "--name", name, "--phone", phone)
    return int(doc["id"])


def event(name: str, offset: int, *extra: str) -> int:
    doc = run_json("events", "add", "--name", name, "--date", day(offset), "--time", "14:00",
                   "--end-time", "22:00", "--location", "KICC", *extra)  # fmt: skip
    return int(doc["id"])


def assign(event_id: int, person_id: int, role: str, *extra: str) -> int:
    doc = run_json("crew", "assign", "--event", str(event_id), "--person", str(person_id),
                   "--role", role, *extra)  # fmt: skip
    return int(doc["id"])


def set_status(url: str, assignment_id: int, status: str) -> None:
    """A status as the crew's answers and the event's end leave it (confirm and complete have
    their own tests): here only the counts that follow matter."""
    db = Database(url)
    try:
        with db.write() as session:
            session.execute(
                update(EventCrew).where(EventCrew.id == assignment_id).values(status=status)  # type: ignore[arg-type]
            )
    finally:
        db.close()


def roles_of(doc: dict[str, Any]) -> dict[str, tuple[int, int, int, int]]:
    return {r["role"]: (r["needed"], r["confirmed"], r["invited"], r["missing"])
            for r in doc["roles"]}  # fmt: skip


# -- events needs ------------------------------------------------------------------------------


def test_needs_set_change_and_remove_roles_and_show_counts(office: str) -> None:
    gala = event("Gala", 5)
    amos, beth, cate = (
        person("Amos", "0722000001"),
        person("Beth", "0722000002"),
        person("Cate", "0722000003"),
    )
    assign(gala, amos, "Sound Engineer")
    confirmed = assign(gala, beth, "sound  engineer")  # the same role, typed differently
    set_status(office, confirmed, "confirmed")
    assign(gala, cate, "Stagehand")

    doc = run_json("events", "needs", str(gala), "Sound Engineer=2", "Stagehand=4")
    assert roles_of(doc) == {"Sound Engineer": (2, 1, 1, 1), "Stagehand": (4, 0, 1, 4)}

    # a later call changes one role and leaves the other; 0 takes a need off
    doc = run_json("events", "needs", str(gala), "stagehand=0", "Lighting Technician=1")
    assert roles_of(doc) == {
        "Sound Engineer": (2, 1, 1, 1),
        "Lighting Technician": (1, 0, 0, 1),
        "Stagehand": (0, 0, 1, 0),  # crew are still on it, but nobody more is needed
    }
    shown = run_json("events", "show", str(gala))
    assert roles_of(shown) == roles_of(doc)
    text = run("events", "show", str(gala)).stdout
    assert "Lighting Technician" in text and "missing" in text

    history = run_json("history", "--event", str(gala))
    needs = [e for e in history if e["action"] == "event.needs"]
    assert [e["changes"] for e in needs] == [
        {"Lighting Technician": [0, 1], "stagehand": [4, 0]},
        {"Sound Engineer": [0, 2], "Stagehand": [0, 4]},
    ]


def test_events_list_upcoming_shows_staffing_per_role() -> None:
    gala = event("Gala", 5)
    event("Other", 6)
    run_json("events", "needs", str(gala), "Stagehand=3")
    docs = run_json("events", "list", "--upcoming")
    assert [roles_of(d) for d in docs] == [{"Stagehand": (3, 0, 0, 3)}, {}]
    assert "Stagehand: 0/3 confirmed" in run("events", "list", "--upcoming").stdout
    csv = run("events", "list", "--upcoming", "--csv").stdout.splitlines()
    assert csv[0].endswith(",staffing") and csv[1].endswith(",Stagehand: 0/3 confirmed")
    assert "staffing" not in run("events", "list", "--csv").stdout.splitlines()[0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("Stagehand", "Error: a need is written ROLE=COUNT (Stagehand)"),
        ("=3", "Error: a need is written ROLE=COUNT (=3)"),
        ("Stagehand=-1", "Error: a need is written ROLE=COUNT (Stagehand=-1)"),
        ("Stagehand=501", "Error: a role's headcount is at most 500 (Stagehand=501)"),
    ],
)
def test_bad_needs_are_refused_and_change_nothing(spec: str, message: str) -> None:
    gala = event("Gala", 5)
    result = run("events", "needs", str(gala), "Sound Engineer=2", spec)
    assert result.exit_code == 4
    assert result.stderr.splitlines()[0] == message
    assert run_json("events", "show", str(gala))["roles"] == []


def test_the_same_role_twice_is_refused() -> None:
    gala = event("Gala", 5)
    result = run("events", "needs", str(gala), "Stagehand=2", "stagehand=3")
    assert result.exit_code == 4
    assert "the same role is given twice" in result.stderr


def test_needs_of_a_cancelled_or_missing_event_are_refused() -> None:
    gala = event("Gala", 5)
    run("events", "cancel", str(gala), "--quiet")
    assert run("events", "needs", str(gala), "Stagehand=2").exit_code == 6
    assert run("events", "needs", "99", "Stagehand=2").exit_code == 5


# -- crew gaps ---------------------------------------------------------------------------------


def test_gaps_lists_short_roles_of_upcoming_events_soonest_first(office: str) -> None:
    soon, later, far, full = event("Soon", 2), event("Later", 9), event("Far", 30), event("Full", 3)
    amos, beth = person("Amos", "0722000001"), person("Beth", "0722000002")
    run_json("events", "needs", str(later), "Stagehand=3")
    run_json("events", "needs", str(soon), "Sound Engineer=2", "Stagehand=1")
    run_json("events", "needs", str(far), "Stagehand=1")
    run_json("events", "needs", str(full), "Stagehand=1")
    set_status(office, assign(full, amos, "Stagehand"), "confirmed")
    set_status(office, assign(soon, beth, "Stagehand"), "confirmed")
    assign(soon, amos, "Sound Engineer")  # invited, not answered yet

    doc = run_json("crew", "gaps")
    assert [(e["name"], roles_of(e)) for e in doc["events"]] == [
        ("Soon", {"Sound Engineer": (2, 0, 1, 2)}),  # Stagehand is filled: not listed
        ("Later", {"Stagehand": (3, 0, 0, 3)}),
    ]
    assert doc["counts"] == {"events": 2, "roles": 2, "missing": 5, "unanswered": 1}
    assert 24 < doc["events"][0]["starts_in_hours"] < 72
    assert [e["name"] for e in run_json("crew", "gaps", "--days", "60")["events"]] == [
        "Soon", "Later", "Far",
    ]  # fmt: skip

    result = run("crew", "gaps")
    assert result.exit_code == 0
    last = unstamped(result.stdout.splitlines()[-1])
    assert last == ("Gaps: 5 people missing in 2 roles of 2 events in the next 14 days;"
                    " 1 invitation not answered.")  # fmt: skip
    assert "Sound Engineer" in result.stdout and " days" in result.stdout
    csv = run("crew", "gaps", "--csv").stdout.splitlines()
    assert csv[0] == ("event_id,event,date,time,starts_in_hours,role,needed,confirmed,invited,"
                      "missing")  # fmt: skip
    assert len(csv) == 3


def test_gaps_skip_cancelled_and_finished_events_and_say_none() -> None:
    gala = event("Gala", 4)
    run_json("events", "needs", str(gala), "Stagehand=2")
    run("events", "cancel", str(gala), "--quiet")
    run_json("events", "add", "--name", "Old", "--date", day(-3), "--location", "X", "--past")
    result = run("crew", "gaps")
    assert result.exit_code == 0
    assert "No gaps: every role is filled for the next 14 days." in result.stdout
    assert unstamped(result.stdout.splitlines()[-1]) == "Gaps: none in the next 14 days."
    assert run_json("crew", "gaps")["events"] == []


def test_declined_and_removed_crew_do_not_fill_a_role(office: str) -> None:
    gala = event("Gala", 4)
    amos, beth = person("Amos", "0722000001"), person("Beth", "0722000002")
    run_json("events", "needs", str(gala), "Stagehand=2")
    set_status(office, assign(gala, amos, "Stagehand"), "declined")
    run("crew", "remove", str(assign(gala, beth, "Stagehand")), "--quiet")
    assert roles_of(run_json("crew", "gaps")["events"][0]) == {"Stagehand": (2, 0, 0, 2)}


# -- crew suggest ------------------------------------------------------------------------------


def test_suggest_ranks_free_people_by_the_role_then_reliability(office: str) -> None:
    gala = event("Gala", 5)
    clash = event("Same night", 5)
    names = ["Amos", "Beth", "Cate", "Dan", "Eve", "Fay"]
    ids = {n: person(n, f"07220000{i:02d}") for i, n in enumerate(names, 1)}
    # the record: past events worked (completed) or not turned up to (no_show)
    for i, (who, role, status) in enumerate([
        ("Beth", "Sound Engineer", "completed"), ("Beth", "Sound Engineer", "completed"),
        ("Cate", "Sound Engineer", "completed"), ("Cate", "Sound Engineer", "no_show"),
        ("Dan", "Sound Engineer", "completed"), ("Eve", "Stagehand", "completed"),
        ("Fay", "Sound Engineer", "completed"),
    ]):  # fmt: skip
        past = run_json("events", "add", "--name", f"Past {i}", "--date", day(-30 - i),
                        "--location", "X", "--past")["id"]  # fmt: skip
        set_status(office, assign(past, ids[who], role, "--past"), status)
    run("people", "archive", str(ids["Fay"]))  # her record stays, but she is never suggested
    set_status(office, assign(clash, ids["Dan"], "Stagehand"), "confirmed")  # busy that night
    assign(clash, ids["Eve"], "Stagehand")  # invited elsewhere: still free, but noted
    assign(gala, ids["Amos"], "Stagehand")  # already on the event

    docs = run_json("crew", "suggest", "--event", str(gala), "--role", "sound engineer")
    assert [d["name"] for d in docs] == ["Beth", "Cate", "Eve"]
    assert [(d["in_role"], d["completed"], d["no_shows"], d["reliability"]) for d in docs] == [
        (2, 2, 0, 1.0), (1, 1, 1, 0.5), (0, 1, 0, 1.0),
    ]  # fmt: skip
    assert docs[2]["invited_elsewhere"] == [{"event_id": clash, "name": "Same night"}]
    text = run("crew", "suggest", "--event", str(gala), "--role", "Sound Engineer").stdout
    assert "0722 000 002" in text and "invited to Same night" in text
    assert "Fay" not in text and "Dan" not in text and "Amos" not in text
    one = run_json("crew", "suggest", "--event", str(gala), "--role", "X", "--limit", "1")
    assert len(one) == 1


def test_suggest_for_a_missing_or_cancelled_event_is_refused() -> None:
    assert run("crew", "suggest", "--event", "9", "--role", "Stagehand").exit_code == 5
    gala = event("Gala", 5)
    run("events", "cancel", str(gala), "--quiet")
    assert run("crew", "suggest", "--event", str(gala), "--role", "Stagehand").exit_code == 6


# -- attendance --------------------------------------------------------------------------------


def checked_in(url: str, assignment_id: int) -> None:
    """A check-in as `crew checkin` records it during the event (its window has its own test)."""
    db = Database(url)
    try:
        with db.write() as session:
            crew = session.get(EventCrew, assignment_id)
            assert crew is not None
            crew.checked_in_at = datetime.now(NAIROBI) - timedelta(days=2)
            session.add(crew)
    finally:
        db.close()


def past_crew(names: list[str]) -> tuple[int, list[int]]:
    old = run_json("events", "add", "--name", "Expo", "--date", day(-2), "--location", "X",
                   "--past")["id"]  # fmt: skip
    ids = [assign(old, person(n, f"07220001{sum(map(ord, n)) % 100:02d}"), "Stagehand",
                  "--past") for n in names]  # fmt: skip
    return old, ids


def test_complete_counts_those_who_checked_in_and_offers_the_rest(office: str) -> None:
    event_id, (amos, beth, cate) = past_crew(["Amos", "Beth", "Cate"])
    checked_in(office, amos)

    result = run("crew", "complete", "--event", str(event_id))
    assert result.exit_code == 0
    assert result.stdout.strip() == "1 crew member marked completed."
    assert (
        "2 confirmed crew did not check in: Beth (2), Cate (3). Mark them with "
        f"`sfcrm crew complete --event {event_id} --no-show 2 3`, or count them as there with "
        "`--all`."
    ) in " ".join(result.stderr.split())
    statuses = {r["id"]: r["status"] for r in run_json("crew", "list", "--event", str(event_id))}
    assert statuses == {amos: "completed", beth: "confirmed", cate: "confirmed"}

    named = run_json("crew", "complete", "--event", str(event_id), "--no-show", str(beth))
    assert [(r["id"], r["status"]) for r in named] == [(beth, "no_show")]
    everyone = run_json("crew", "complete", "--event", str(event_id), "--all")
    assert [(r["id"], r["status"]) for r in everyone] == [(cate, "completed")]
    view = run_json(
        "crew", "assignments", "--person", str(run_json("crew", "list")[1]["person_id"])
    )
    assert [r["event"] for r in view["no_show"]] == ["Expo"]
    entries = [e["action"] for e in run_json("history", "--event", str(event_id))]
    assert "assignment.no_show" in entries


def test_without_check_ins_every_confirmed_one_not_named_is_completed(office: str) -> None:
    event_id, (amos, beth) = past_crew(["Amos", "Beth"])
    done = run_json("crew", "complete", "--event", str(event_id), "--no-show", f"{beth}")
    assert sorted((r["id"], r["status"]) for r in done) == [(amos, "completed"), (beth, "no_show")]


@pytest.mark.parametrize("bad", ["x", "0", "2,,3"])
def test_a_bad_no_show_id_is_a_usage_error(bad: str) -> None:
    event_id, _ = past_crew(["Amos"])
    result = run("crew", "complete", "--event", str(event_id), "--no-show", bad)
    assert result.exit_code == 2 and "not an assignment id" in result.stderr


def test_a_no_show_must_be_confirmed_crew_of_that_event(office: str) -> None:
    event_id, (amos,) = past_crew(["Amos"])
    _other, (beth,) = past_crew(["Beth"])
    result = run("crew", "complete", "--event", str(event_id), "--no-show", str(beth))
    assert result.exit_code == 5 and f"assignment {beth} is not on Expo" in result.stderr
    run("crew", "complete", "--event", str(event_id))
    again = run("crew", "complete", "--event", str(event_id), "--no-show", str(amos))
    assert again.exit_code == 6 and "is completed" in again.stderr
    assert run_json("crew", "list", "--event", str(event_id))[0]["status"] == "completed"


@pytest.mark.parametrize("days", ["0", "367", "x"])
def test_gaps_days_out_of_range_is_a_usage_error(days: str) -> None:
    result = run("crew", "gaps", "--days", days)
    assert result.exit_code == 2 and "--days" in result.stderr
