"""The composition root: sfcrm's services built from its settings, each on first use.

The command line, the callback listener, the demo and the tests all build their services
here, so each is wired once. Nothing is built (and nothing heavy imported) until it is asked
for: a command that only reads the settings loads no database library.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from sfcrm.audit import History
    from sfcrm.config import Settings
    from sfcrm.crew import Crew
    from sfcrm.crewmail import CrewMail, Org
    from sfcrm.daraja import DarajaClient
    from sfcrm.db import Database
    from sfcrm.events import Events
    from sfcrm.mail import Mailer
    from sfcrm.payments import Payments
    from sfcrm.people import People
    from sfcrm.portal import LinkKeys
    from sfcrm.render import Renderer
    from sfcrm.server import CallbackApp, ConnectionLimits, CrewPages, RsvpPages
    from sfcrm.staffing import Staffing


def utcnow() -> datetime:
    return datetime.now(UTC)


class Services:
    """Everything sfcrm runs, from one set of settings.

    ``clock`` is the time every service reads; ``notify`` takes the messages a payment has for
    the person at the terminal. ``database`` and ``daraja_client`` are open ones to use instead
    of those the settings name (a test's own). Close the services when done: that closes the
    database, when they opened it.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], datetime] = utcnow,
        notify: Callable[[str], None] | None = None,
        database: Database | None = None,
        daraja_client: DarajaClient | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.notify = notify
        self._given_db = database
        self._given_client = daraja_client

    @cached_property
    def db(self) -> Database:
        if self._given_db is not None:
            return self._given_db
        from sfcrm.db import Database

        return Database(self.settings.database)

    @cached_property
    def tz(self) -> ZoneInfo:
        from zoneinfo import ZoneInfo

        return ZoneInfo(self.settings.timezone)

    @cached_property
    def people(self) -> People:
        from sfcrm.people import People

        return People(self.db, self.clock)

    @cached_property
    def daraja_client(self) -> DarajaClient:
        """The configured Daraja's client (its token cached in the database); a missing
        credential is a ConfigError here, before any call."""
        if self._given_client is not None:
            return self._given_client
        from sfcrm.payments import build_daraja_client

        return build_daraja_client(self.settings, self.db, self.clock)

    @cached_property
    def payments(self) -> Payments:
        from sfcrm.payments import Payments

        return Payments(
            self.db,
            callback_url=self.settings.mpesa_callback_url,
            clock=self.clock,
            client_factory=lambda: self.daraja_client,
            confirm_by_query=self.settings.mpesa_confirm_by_query,
            notify=self.notify,
        )

    @cached_property
    def history(self) -> History:
        from sfcrm.audit import History

        return History(self.db, self.clock)

    @cached_property
    def events(self) -> Events:
        from sfcrm.events import Events

        return Events(self.db, self.clock, self.tz)

    @cached_property
    def staffing(self) -> Staffing:
        from sfcrm.staffing import Staffing

        return Staffing(self.db, self.clock, self.tz)

    @cached_property
    def renderer(self) -> Renderer:
        from sfcrm.render import Renderer

        return Renderer(self.settings.templates_dir)

    @cached_property
    def mailer(self) -> Mailer:
        from sfcrm.crew import KINDS
        from sfcrm.mail import Mailer, backend_from_settings

        return Mailer(
            self.db,
            lambda: backend_from_settings(self.settings),
            sender=self.settings.default_from_email,
            clock=self.clock,
            reply_to=self.settings.org_email,  # replies go to the office
            kinds=KINDS,
        )

    @cached_property
    def org(self) -> Org:
        from sfcrm.crewmail import Org

        settings = self.settings
        return Org(settings.org_name, settings.org_phone, settings.org_email)

    @cached_property
    def crew(self) -> Crew:
        from sfcrm.crew import Crew

        return Crew(self.db, clock=self.clock, tz=self.tz, org=self.org)

    @cached_property
    def crew_mail(self) -> CrewMail:
        """Invitations, reminders and briefings; loads no ORM (cron runs these often)."""
        from sfcrm.crewmail import CrewMail

        return CrewMail(
            self.db,
            clock=self.clock,
            mailer=lambda: self.mailer,
            renderer=lambda: self.renderer,
            org=self.org,
            rsvp=self.rsvp_link,
            page=self.page_link,
            tz=self.tz,
        )

    def page_link(self, session: Any, person_id: int, make: bool) -> str | None:
        """A crew member's own page link for an email written in ``session``, when links are
        on; their link key is made in that transaction when they have none (``make``), so the
        email never carries a link that was not stored."""
        keys = self.link_keys
        if not keys.enabled:
            return None
        from sfcrm.models import Person

        if make:
            key: str | None = keys.ensure_key(session, person_id)
        else:
            person = session.get(Person, person_id)
            key = person.link_key if person is not None else None
        if key is None:
            return None
        return keys.links_for(person_id, "", None, key).page

    def rsvp_link(self, assignment_id: int, bound_to: str, expires: datetime) -> str | None:
        """The personal confirm/decline link, when SFCRM_PUBLIC_URL and the key are set."""
        from sfcrm.rsvp import make_token, rsvp_url

        public, key = self.settings.public_url, self.settings.secret_key
        if not public or not key:
            return None
        return rsvp_url(public, make_token(key, assignment_id, bound_to, expires, self.clock()))

    # -- the listener ------------------------------------------------------------------------

    @cached_property
    def rsvp_pages(self) -> RsvpPages | None:
        """The crew's confirm/decline pages, when SFCRM_SECRET_KEY is set."""
        key = self.settings.secret_key
        if not key:
            return None
        from sfcrm.server import RsvpPages

        return RsvpPages(self.crew, self.renderer, secret_key=key, clock=self.clock)

    @cached_property
    def link_keys(self) -> LinkKeys:
        """Each crew member's own page link (SFCRM_PUBLIC_URL, signed with SFCRM_SECRET_KEY)."""
        from sfcrm.portal import LinkKeys

        return LinkKeys(self.db, self.clock, self.settings.public_url, self.settings.secret_key)

    @cached_property
    def crew_pages(self) -> CrewPages | None:
        """Each crew member's own page and calendar feed, when SFCRM_SECRET_KEY is set."""
        if not self.settings.secret_key:
            return None
        from sfcrm.server import CrewPages

        return CrewPages(
            self.crew, self.link_keys, self.renderer, clock=self.clock,
            show_phones=bool(self.settings.show_crew_phones),
        )  # fmt: skip

    def callback_app(self) -> CallbackApp:
        """The listener's WSGI app: the path of MPESA_CALLBACK_URL, and the RSVP pages."""
        from sfcrm.config import allowlist
        from sfcrm.server import CallbackApp, PageRate

        settings = self.settings
        return CallbackApp(
            self.payments,
            callback_path=settings.callback_path,
            max_body=settings.listener_max_body,
            allowlist=allowlist(settings),
            trusted_proxies=settings.listener_trusted_proxies or (),
            rsvp=self.rsvp_pages,
            crew_pages=self.crew_pages,
            page_rate=PageRate(settings.listener_page_rate),
        )

    def listener_limits(self) -> ConnectionLimits:
        """What the listener allows each client. A proxy's connections carry everyone's
        requests, and Daraja's must never be refused: neither is held to the cap of
        connections per address."""
        from sfcrm.config import allowlist
        from sfcrm.server import LOOPBACK, ConnectionLimits

        settings = self.settings
        return ConnectionLimits(
            request_seconds=settings.listener_request_timeout,
            per_address=settings.listener_connections_per_address,
            total=settings.listener_max_connections,
            uncapped=(
                *LOOPBACK,
                *(settings.listener_trusted_proxies or ()),
                *sorted(allowlist(settings) or ()),
            ),
        )

    def close(self) -> None:
        """Close the database, when these services opened it."""
        if "db" in self.__dict__ and self._given_db is None:
            self.db.close()
