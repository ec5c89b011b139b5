"""Each crew member's own page: one personal link, ``<SFCRM_PUBLIC_URL>/crew/me/<token>``,
showing every event they are on, with Confirm and Decline, and their calendar feed.

A token is ``<person id>.<signature>``: an HMAC-SHA256 under SFCRM_SECRET_KEY of the person's
id and of their link key, a random value kept on the person and never reused. ``crew link
--reset`` gives the person a new key, and every link made with the old one dies at once. A
person whose id is taken by someone new (SQLite reuses a deleted row's id) has a new key, so an
old link never opens another person's page. Anyone holding the link sees that person's events
and can answer for them; nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sfcrm import audit
from sfcrm.config import SECRET_RECIPE
from sfcrm.errors import ConfigError, ConflictError, NotFoundError, ValidationError

log = logging.getLogger("sfcrm.portal")

PAGE_PREFIX = "/crew/me/"
FEED_NAME = "calendar.ics"
MAX_TOKEN = 120
# The "I'm here" button shows from this long before the call time to the event's end.
CHECKIN_OPENS = timedelta(hours=2)


class InvalidToken(Exception):
    """Forged, altered, made with a key since reset, or for a person archived."""


def new_key() -> str:
    return secrets.token_urlsafe(18)


def _signature(secret: str, person_id: int, link_key: str) -> str:
    payload = f"{person_id}.{link_key}".encode()
    digest = hmac.new(secret.encode(), b"sfcrm-crew-page:" + payload, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode("ascii")


def make_token(secret: str, person_id: int, link_key: str) -> str:
    return f"{person_id}.{_signature(secret, person_id, link_key)}"


def parse_token(token: str) -> tuple[int, str]:
    """The person id and signature of a well-formed token; InvalidToken otherwise."""
    person, dot, signature = token.partition(".")
    if (
        not dot
        or len(token) > MAX_TOKEN
        or not (person.isascii() and person.isdigit() and len(person) <= 18)
        or not signature
    ):
        raise InvalidToken("malformed")
    return int(person), signature


def verify(secret: str, person_id: int, signature: str, link_key: str | None) -> None:
    if link_key is None:
        raise InvalidToken("no link made for this person")
    wanted = _signature(secret, person_id, link_key).encode()
    if not hmac.compare_digest(wanted, signature.encode("utf-8", "replace")):
        raise InvalidToken("bad signature")


def page_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}{PAGE_PREFIX}{token}"


def feed_url(public_url: str, token: str) -> str:
    return f"{page_url(public_url, token)}/{FEED_NAME}"


def webcal_url(https_url: str) -> str:
    """The ``webcal://`` form of a feed's address, which phones open in their calendar app."""
    scheme, _, rest = https_url.partition("://")
    return f"webcal://{rest}" if scheme in ("http", "https") else https_url


@dataclass(frozen=True)
class Links:
    """A person's own page and calendar feed."""

    person_id: int
    name: str
    email: str | None
    page: str
    feed: str

    def json(self) -> dict[str, Any]:
        return {
            "person_id": self.person_id,
            "name": self.name,
            "page": self.page,
            "feed": self.feed,
            "webcal": webcal_url(self.feed),
        }


@dataclass
class LinkKeys:
    """Makes and checks personal links; loads a person's key from the database.

    ``public_url`` and ``secret`` are SFCRM_PUBLIC_URL and SFCRM_SECRET_KEY; without both no
    link can be made (:meth:`require` says which is missing).
    """

    db: Any
    clock: Callable[[], datetime]
    public_url: str | None
    secret: str | None

    @property
    def enabled(self) -> bool:
        return bool(self.public_url and self.secret)

    def require(self) -> tuple[str, str]:
        if not self.public_url:
            raise ConfigError(
                "SFCRM_PUBLIC_URL is not set: crew pages need the listener's public address",
                hint="set SFCRM_PUBLIC_URL (and SFCRM_SECRET_KEY), see `sfcrm doctor`",
            )
        if not self.secret:
            raise ConfigError(
                "SFCRM_SECRET_KEY is not set: crew page links are signed with it",
                hint=f"make one with `{SECRET_RECIPE}`",
            )
        return self.public_url, self.secret

    def links_for(self, person_id: int, name: str, email: str | None, key: str) -> Links:
        public, secret = self.require()
        token = make_token(secret, person_id, key)
        return Links(person_id, name, email, page_url(public, token), feed_url(public, token))

    def ensure_key(self, session: Any, person_id: int) -> str:
        """The person's link key, made now (in the caller's write transaction) if they have
        none yet; an email that carries the link is written in the same transaction."""
        from sfcrm.models import Person

        person = session.get(Person, person_id)
        if person is None:
            raise NotFoundError("no such person", value=str(person_id))
        if person.link_key is None:  # lock only to make one: two writers make the same one
            session.refresh(person, with_for_update=True)
        if person.link_key is None:
            person.link_key = new_key()
            session.add(person)
            session.flush()
        key: str = person.link_key
        return key

    def link(
        self,
        person_ref: str,
        *,
        reset: bool = False,
        reason: str | None = None,
        need_email: bool = False,
    ) -> Links:
        """The person's page and feed links; ``reset`` first gives them a new key, so every
        link made before stops working at once (an audit entry ``person.link_reset``).
        ``need_email``: refused, changing nothing, when they have no email address."""
        from sfcrm.people import find_person

        self.require()
        with self.db.write() as session:
            person = find_person(session, person_ref)
            session.refresh(person, with_for_update=True)
            if person.archived_at is not None:
                raise ConflictError(
                    f"{person.name} is archived: their page is closed",
                    value=f"person {person.id}",
                    hint=f"`sfcrm people unarchive {person.id}` first, if they are back",
                )
            assert person.id is not None
            if need_email and not person.email:
                raise ValidationError(
                    f"{person.name} has no email address",
                    value=f"person {person.id}",
                    hint=f"`sfcrm people edit {person.id} --email ADDRESS`, or give them the link",
                )
            if reset or person.link_key is None:
                had = person.link_key is not None
                person.link_key = new_key()
                session.add(person)
                session.flush()
                if had:
                    audit.record(
                        session, "person.link_reset", now=self.clock(), reason=reason,
                        person_id=person.id,
                    )  # fmt: skip
                    log.info("person %s: page link reset", person.id)
            return self.links_for(person.id, person.name, person.email, person.link_key)

    def person_for(self, token: str) -> Any:
        """The person a genuine link was made for (with their current key); InvalidToken
        otherwise, also for an archived person."""
        from sfcrm.models import Person

        if not self.secret:
            raise InvalidToken("no secret key")
        person_id, signature = parse_token(token)
        with self.db.read() as session:
            person = session.get(Person, person_id)
        if person is None:
            raise InvalidToken("no such person")
        verify(self.secret, person_id, signature, person.link_key)
        if person.archived_at is not None:
            raise InvalidToken("archived")
        return person


# The page's groups, in order, with their headings.
GROUPS = {
    "pending": "Waiting for your answer",
    "confirmed": "Confirmed",
    "completed": "Completed",
    "declined": "Declined",
    "cancelled": "Cancelled",
}


@dataclass(frozen=True)
class Card:
    """One assignment on the person's page, and what they may do with it now."""

    row: Any  # sfcrm.crew.CrewRow
    group: str
    can_confirm: bool
    can_decline: bool
    can_check_in: bool
    roster: list[dict[str, Any]]  # the confirmed crew of an upcoming confirmed event

    def context(self, org: Any) -> dict[str, Any]:
        from sfcrm.crew import template_context

        return template_context(
            org, self.row, id=self.row.crew.id, group=self.group, status=self.row.crew.status,
            can_confirm=self.can_confirm, can_decline=self.can_decline,
            can_check_in=self.can_check_in, roster=self.roster,
            checked_in_at=self.row.crew.checked_in_at,
            cancelled=self.row.event.cancelled_at is not None,
            removed=self.row.crew.status == "removed",
        )  # fmt: skip


def group_of(row: Any, now: datetime) -> str | None:
    """Where an assignment shows on its person's page; None: not shown (an invitation never
    answered for an event now over)."""
    from sfcrm.status import CrewStatus

    status, event = row.crew.status, row.event
    if event.cancelled_at is not None or status in CrewStatus.CLOSED:
        return "cancelled"
    if status == CrewStatus.INVITED:
        return "pending" if event.ends_at > now else None
    if status == CrewStatus.NO_SHOW:
        return "completed"
    return str(status) if status in GROUPS else None


def cards_for(session: Any, person_id: int, now: datetime, *, show_phones: bool) -> list[Card]:
    """Every assignment of the person as their page shows it, in date order (past ones
    newest first)."""
    from sqlmodel import col

    from sfcrm.crew import answer_refusal, crew_rows, crew_select
    from sfcrm.models import Event, EventCrew
    from sfcrm.status import CrewStatus

    rows = crew_rows(
        session,
        crew_select()
        .where(EventCrew.person_id == person_id)
        .order_by(col(Event.starts_at), col(EventCrew.id)),
    )
    confirmed_events = [
        r.event.id
        for r in rows
        if r.crew.status == CrewStatus.CONFIRMED
        and r.event.ends_at > now
        and r.event.cancelled_at is None
    ]
    rosters: dict[int, list[dict[str, Any]]] = {}
    if confirmed_events:
        for mate in crew_rows(
            session,
            crew_select()
            .where(col(EventCrew.event_id).in_(confirmed_events))
            .where(EventCrew.status == CrewStatus.CONFIRMED)
            .order_by(col(EventCrew.role), col(EventCrew.id)),
        ):
            rosters.setdefault(mate.event.id or 0, []).append(
                {"name": mate.person.name, "role": mate.crew.role,
                 "phone": mate.person.phone if show_phones else None,
                 "you": mate.person.id == person_id}
            )  # fmt: skip
    cards = []
    for row in rows:
        group = group_of(row, now)
        if group is None:
            continue
        open_ = answer_refusal(row.crew, row.event) is None and row.event.ends_at > now
        status = row.crew.status
        check_in_window = row.event.starts_at - CHECKIN_OPENS <= now < row.event.ends_at
        cards.append(
            Card(
                row,
                group,
                can_confirm=open_ and status in (CrewStatus.INVITED, CrewStatus.DECLINED),
                can_decline=open_ and status in (CrewStatus.INVITED, CrewStatus.CONFIRMED),
                can_check_in=open_
                and status == CrewStatus.CONFIRMED
                and check_in_window
                and row.crew.checked_in_at is None,
                roster=rosters.get(row.event.id or 0, []) if group == "confirmed" else [],
            )
        )
    past = [c for c in cards if c.row.event.ends_at <= now]
    upcoming = [c for c in cards if c.row.event.ends_at > now]
    return upcoming + past[::-1]


def email_link(db: Any, mailer: Any, renderer: Any, org: Any, links: Links, *, reset: bool) -> Any:
    """Email a crew member their own page link (kind ``crew_link``): written to the mail log,
    then sent; the mail report. Refused when they have no email address."""
    from sfcrm.crew import PAGE_LINK

    if not links.email:
        raise ValidationError(
            f"{links.name} has no email address",
            value=f"person {links.person_id}",
            hint=f"`sfcrm people edit {links.person_id} --email ADDRESS`, or give them the link",
        )
    mailer.check()
    context = {
        "person": {"name": links.name},
        "org": {"name": org.name, "phone": org.phone, "email": org.email},
        "page_url": links.page,
        "feed_url": links.feed,
        "webcal_url": webcal_url(links.feed),
        "reset": reset,
        "replies": mailer.replies_reach_the_office,
    }
    text = renderer.render(f"{PAGE_LINK}.txt.j2", **context)
    html = renderer.render(f"{PAGE_LINK}.html.j2", **context)
    with db.write() as session:
        email_id = mailer.queue(
            session, recipient=links.email, notification_type=PAGE_LINK,
            subject=f"Your page with {org.name}", text=text, html=html,
            person_id=links.person_id,
        )  # fmt: skip
    return mailer.send([email_id])
