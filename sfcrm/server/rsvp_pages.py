"""The crew's RSVP pages behind the personal links in their invitations."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datetime import datetime
    from wsgiref.types import StartResponse
    from zoneinfo import ZoneInfo

    from sfcrm.crew import Crew, CrewRow
    from sfcrm.render import Renderer

log = logging.getLogger("sfcrm.listener")

RSVP_PREFIX = "/crew/rsvp/"
RSVP_MAX_BODY = 1024


class RsvpPages:
    """The crew member's confirm/decline page behind the personal link in an invitation.

    GET shows the event and two buttons and changes nothing (mail scanners open links);
    POST from that page records the answer. A forged, tampered or expired link gets 403, and
    so does one made for an assignment whose id another assignment now has.
    """

    def __init__(
        self,
        crew: Crew,
        renderer: Renderer,
        *,
        secret_key: str,
        clock: Callable[[], datetime],
    ) -> None:
        self.crew = crew
        self.renderer = renderer
        self._secret = secret_key
        self.clock = clock

    def __call__(
        self, environ: dict[str, Any], start_response: StartResponse, token: str
    ) -> Iterable[bytes]:
        from sfcrm.errors import ClashError, ConflictError, NotFoundError, ValidationError
        from sfcrm.rsvp import InvalidToken

        org = {
            "name": self.crew.org.name,
            "phone": self.crew.org.phone,
            "email": self.crew.org.email,
        }
        not_valid = "This link is not a valid invitation link."
        try:
            row = self._assignment(token)
        except (InvalidToken, NotFoundError) as exc:
            reason = (
                "This link has expired: the event is over." if str(exc) == "expired" else not_valid
            )
            return self._page(
                start_response, "403 Forbidden", "rsvp_denied.html.j2", org=org, reason=reason
            )
        context = self.crew.context(row)
        method = environ.get("REQUEST_METHOD")
        if _closed(row):
            return self._closed_page(start_response, row, method)
        if method in ("GET", "HEAD"):
            return self._page(
                start_response, "200 OK", "rsvp_page.html.j2", status=row.crew.status,
                answer=answer_words(row, self.crew.tz), **context,
            )  # fmt: skip
        if method != "POST":
            return self._page(
                start_response, "405 Method Not Allowed", "rsvp_denied.html.j2", org=org,
                reason="Use the buttons on the invitation page.",
            )  # fmt: skip
        answer = self._answer(environ)
        assignment_id = row.crew.id
        assert assignment_id is not None
        try:
            row = self.crew.respond(
                assignment_id, answer or "", via="rsvp link", bound_to=row.binding
            )
        except NotFoundError:  # deleted, or its id taken by another, since it was read above
            return self._page(
                start_response, "403 Forbidden", "rsvp_denied.html.j2", org=org, reason=not_valid
            )
        except ValidationError:
            return self._page(
                start_response, "400 Bad Request", "rsvp_denied.html.j2", org=org,
                reason="Please use the Confirm or Decline button.",
            )  # fmt: skip
        except ClashError as exc:  # declined, then booked elsewhere at that time
            return self._page(
                start_response, "409 Conflict", "rsvp_clash.html.j2", other=exc.other,
                **self.crew.context(row),
            )  # fmt: skip
        except ConflictError as exc:
            row = self.crew.get(assignment_id)
            if _closed(row):  # cancelled or removed since it was read above
                return self._closed_page(start_response, row, method)
            return self._page(
                start_response, "409 Conflict", "rsvp_denied.html.j2", org=org, reason=exc.message
            )
        log.info("assignment %s answered %s by link", assignment_id, row.crew.status)
        return self._page(
            start_response,
            "200 OK",
            "rsvp_done.html.j2",
            status=row.crew.status,
            **self.crew.context(row),
        )

    def _closed_page(
        self, start_response: StartResponse, row: CrewRow, method: str | None
    ) -> list[bytes]:
        """The event was cancelled, or the crew member taken off it: nothing to answer."""
        from sfcrm.status import CrewStatus

        cancelled = row.event.cancelled_at is not None or row.crew.status == CrewStatus.CANCELLED
        http_status = "200 OK" if method in ("GET", "HEAD") else "409 Conflict"
        return self._page(
            start_response, http_status, "rsvp_closed.html.j2", cancelled=cancelled,
            **self.crew.context(row),
        )  # fmt: skip

    def _assignment(self, token: str) -> CrewRow:
        """The assignment a genuine, unexpired link was made for: InvalidToken or
        NotFoundError otherwise, also when the row now at its id is another assignment."""
        from sfcrm.rsvp import InvalidToken, parse_token, verify

        link = parse_token(token)
        row = self.crew.get(link.assignment_id)
        kind = verify(self._secret, link, row.binding, self.clock())
        if kind == "unbound" and not self.crew.invitation_carries(
            link.assignment_id, RSVP_PREFIX + token
        ):
            raise InvalidToken("not sent for this assignment")
        return row

    def _answer(self, environ: dict[str, Any]) -> str | None:
        from urllib.parse import parse_qs

        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return None
        if length <= 0 or length > RSVP_MAX_BODY:
            return None
        body = environ["wsgi.input"].read(length)
        values = parse_qs(body.decode("utf-8", "replace")).get("answer", [])
        return values[0] if len(values) == 1 else None

    def _page(
        self, start_response: StartResponse, http_status: str, template: str, /, **context: Any
    ) -> list[bytes]:
        import secrets

        from sfcrm.server.crew_pages import page_headers

        nonce = secrets.token_urlsafe(12)
        body = self.renderer.render(template, nonce=nonce, **context).encode("utf-8")
        start_response(http_status, page_headers(body, nonce=nonce))
        return [body]


def answer_words(row: CrewRow, tz: ZoneInfo) -> str:
    """The crew member's answer so far, as they would say it: "You have not answered yet.",
    "You confirmed on Tuesday 01 December 2026." (the day in SFCRM_TIMEZONE)."""
    from sfcrm.status import CrewStatus

    status, when = row.crew.status, row.crew.responded_at
    on = f" on {when.astimezone(tz).strftime('%A %d %B %Y')}" if when is not None else ""
    if status == CrewStatus.CONFIRMED:
        return f"You confirmed{on}." if on else "You are confirmed."
    if status == CrewStatus.DECLINED:
        return f"You declined{on}."
    if status == CrewStatus.COMPLETED:
        return "You worked this event."
    return "You have not answered yet."


def _closed(row: CrewRow) -> bool:
    from sfcrm.crew import answer_refusal

    return answer_refusal(row.crew, row.event) is not None
