"""Each crew member's own page, ``/crew/me/<token>``, and their calendar feed,
``/crew/me/<token>/calendar.ics`` (see :mod:`sfcrm.portal`).

GET shows the page and changes nothing (mail scanners and link previews open links). A button
POSTs the assignment and the answer; the answer is recorded with the same rules as the RSVP
link's (overlap refused with the clash named, nothing after the event ends, completed is final)
and the browser is sent back to the page (303), so a reload never answers twice.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from sfcrm.portal import FEED_NAME, GROUPS, PAGE_PREFIX

if TYPE_CHECKING:
    from datetime import datetime
    from wsgiref.types import StartResponse

    from sfcrm.crew import Crew
    from sfcrm.portal import LinkKeys
    from sfcrm.render import Renderer

log = logging.getLogger("sfcrm.listener")

PAGE_MAX_BODY = 1024
ANSWERS = {"confirm": "confirmed", "decline": "declined", "checkin": "checked in"}


def page_headers(
    body: bytes, *, nonce: str | None = None, kind: str = "text/html"
) -> list[tuple[str, str]]:
    """The headers of every page a crew member opens: never cached, indexed, framed or
    referred, and (HTML) nothing loaded or run but the page's own inline style."""
    headers = [
        ("Content-Type", f"{kind}; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("X-Robots-Tag", "noindex"),
        ("Referrer-Policy", "no-referrer"),
        ("X-Frame-Options", "DENY"),
        ("X-Content-Type-Options", "nosniff"),
    ]
    if kind == "text/html":
        style = f"'nonce-{nonce}'" if nonce else "'none'"
        headers.append(
            (
                "Content-Security-Policy",
                f"default-src 'none'; style-src {style}; img-src 'self'; form-action 'self'; "
                "frame-ancestors 'none'; base-uri 'none'",
            )
        )
    return headers


def org_context(org: Any) -> dict[str, Any]:
    """The office's contact, as the page templates show it (``_office.html.j2``)."""
    return {"name": org.name, "phone": org.phone, "email": org.email}


class CrewPages:
    """``/crew/me/<token>`` and its calendar feed."""

    def __init__(
        self,
        crew: Crew,
        keys: LinkKeys,
        renderer: Renderer,
        *,
        clock: Callable[[], datetime],
        show_phones: bool = False,
    ) -> None:
        self.crew = crew
        self.keys = keys
        self.renderer = renderer
        self.clock = clock
        self.show_phones = show_phones

    def __call__(
        self, environ: dict[str, Any], start_response: StartResponse, rest: str
    ) -> Iterable[bytes]:
        from sfcrm.portal import InvalidToken

        token, _, sub = rest.partition("/")
        method = environ.get("REQUEST_METHOD")
        try:
            person = self.keys.person_for(token)
        except InvalidToken:
            return self._denied(start_response, "403 Forbidden", "This link is not valid.")
        if sub == FEED_NAME:
            if method not in ("GET", "HEAD"):
                return self._denied(start_response, "405 Method Not Allowed", "GET only.")
            return self._feed(start_response, person)
        if sub:
            return self._denied(start_response, "404 Not Found", "There is no such page.")
        if method in ("GET", "HEAD"):
            query = parse_qs(environ.get("QUERY_STRING") or "")
            done = query.get("done", [""])[0]
            return self._page(start_response, "200 OK", person, token, done=done)
        if method != "POST":
            return self._denied(
                start_response, "405 Method Not Allowed", "Use the buttons on your page."
            )
        return self._post(environ, start_response, person, token)

    # -- answering -------------------------------------------------------------------------

    def _post(
        self, environ: dict[str, Any], start_response: StartResponse, person: Any, token: str
    ) -> Iterable[bytes]:
        from sfcrm.errors import ClashError, ConflictError, NotFoundError, ValidationError

        form = self._form(environ)
        answer = form.get("answer")
        try:
            assignment_id = int(form.get("assignment") or "")
        except ValueError:
            assignment_id = 0
        if answer not in ANSWERS or assignment_id <= 0:
            return self._page(start_response, "400 Bad Request", person, token,
                              problem="Please use the buttons on this page.")  # fmt: skip
        try:
            row = self.crew.get(assignment_id)
            if row.crew.person_id != person.id:
                raise NotFoundError("no such assignment", value=str(assignment_id))
            if answer == "checkin":
                self.crew.check_in(assignment_id, via="crew page", bound_to=row.binding)
            else:
                self.crew.respond(assignment_id, answer or "", via="crew page",
                                  bound_to=row.binding)  # fmt: skip
        except NotFoundError:
            return self._page(start_response, "404 Not Found", person, token,
                              problem="That event is not on your page any more.")  # fmt: skip
        except ValidationError:
            return self._page(start_response, "400 Bad Request", person, token,
                              problem="Please use the buttons on this page.")  # fmt: skip
        except ClashError as exc:
            other = exc.other or {}
            when = " ".join(str(other[k]) for k in ("date", "time") if other.get(k))
            return self._page(
                start_response, "409 Conflict", person, token,
                problem=f"You are already on {other.get('name', 'another event')} ({when}) at "
                f"that time, so {row.event.name} cannot be confirmed here. Please call the "
                "office.",
            )  # fmt: skip
        except ConflictError as exc:
            return self._page(start_response, "409 Conflict", person, token,
                              problem=f"{exc.message[:1].upper()}{exc.message[1:]}.")  # fmt: skip
        log.info("assignment %s: %s on the crew page", assignment_id, ANSWERS[answer or ""])
        location = f"{PAGE_PREFIX}{token}?done={answer}-{assignment_id}"
        start_response("303 See Other", [*page_headers(b""), ("Location", location)])
        return [b""]

    def _form(self, environ: dict[str, Any]) -> dict[str, str]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return {}
        if length <= 0 or length > PAGE_MAX_BODY:
            return {}
        body = environ["wsgi.input"].read(length)
        values = parse_qs(body.decode("utf-8", "replace"))
        return {k: v[0] for k, v in values.items() if len(v) == 1}

    # -- pages -----------------------------------------------------------------------------

    def _page(
        self,
        start_response: StartResponse,
        http_status: str,
        person: Any,
        token: str,
        *,
        done: str = "",
        problem: str | None = None,
    ) -> list[bytes]:
        from sfcrm.portal import cards_for, feed_url, webcal_url

        now = self.clock()
        with self.crew.db.read() as session:
            cards = cards_for(session, person.id, now, show_phones=self.show_phones)
        by_group: dict[str, list[dict[str, Any]]] = {group: [] for group in GROUPS}
        for card in cards:
            shown = card.context(self.crew.org)
            arrived = card.row.crew.checked_in_at
            if arrived is not None:
                shown["checked_in_text"] = arrived.astimezone(self.crew.tz).strftime("%H:%M")
            by_group[card.group].append(shown)
        message, ok = problem, False
        if problem is None and done:
            answer, _, wanted = done.partition("-")
            for card in cards:
                if str(card.row.crew.id) == wanted and answer in ANSWERS:
                    message, ok = f"{card.row.event.name}: {ANSWERS[answer]}. Thank you.", True
        public = self.keys.public_url or ""
        feed = feed_url(public, token)
        nonce = secrets.token_urlsafe(12)
        body = self.renderer.render(
            "crew_page.html.j2", person={"name": person.name}, groups=GROUPS, by_group=by_group,
            org=org_context(self.crew.org), message=message, message_ok=ok, feed=feed,
            webcal=webcal_url(feed), nonce=nonce,
        ).encode("utf-8")  # fmt: skip
        start_response(http_status, page_headers(body, nonce=nonce))
        return [body]

    def _denied(self, start_response: StartResponse, http_status: str, reason: str) -> list[bytes]:
        nonce = secrets.token_urlsafe(12)
        body = self.renderer.render(
            "rsvp_denied.html.j2", org=org_context(self.crew.org), reason=reason, nonce=nonce
        ).encode("utf-8")
        start_response(http_status, page_headers(body, nonce=nonce))
        return [body]

    def _feed(self, start_response: StartResponse, person: Any) -> list[bytes]:
        from sfcrm.feed import person_feed

        with self.crew.db.read() as session:
            body = person_feed(session, person, self.crew.org, self.clock())
        start_response("200 OK", page_headers(body, kind="text/calendar"))
        return [body]
