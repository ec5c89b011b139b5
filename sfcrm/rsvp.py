"""Personal confirm/decline links for crew invitations.

A token is ``<assignment id>.<expiry, unix seconds>.<signature>``: an HMAC-SHA256 under
SFCRM_SECRET_KEY of those two parts and of what the assignment was when the link was made
(its event, its person and the microsecond it was created: see :func:`binding`). It dies when
the event ends. Anyone holding the link can answer for that one assignment and nothing else.

The id alone is not enough: SQLite hands the id of a deleted row to the next one, so a link
signed over the id only would answer for whoever got the id next. A link whose binding does
not match the row now at its id is refused.

Links of the first kind, signed over the id and expiry only, went out in invitations before
this. They are still honoured where they cannot be misused: the page accepts one only when the
invitation the mail log holds for the assignment now at that id carries that very link, which
an assignment created after this change never has.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

MAX_LIFETIME = timedelta(days=120)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class InvalidToken(Exception):
    """Forged, tampered with, made for another assignment, or expired."""


@dataclass(frozen=True)
class Link:
    """A token taken apart; nothing in it is to be trusted before :func:`verify`."""

    assignment_id: int
    expiry: int  # unix seconds
    signature: str


def binding(event_id: int, person_id: int, created_at: datetime) -> str:
    """What a link is bound to besides the assignment's id: never the same for two
    assignments, even when one gets the id of another that was deleted."""
    micros = (created_at - _EPOCH) // timedelta(microseconds=1)  # exact: no float
    return f"{event_id}.{person_id}.{micros}"


def _signature(secret: str, domain: bytes, payload: str) -> str:
    digest = hmac.new(secret.encode(), domain + payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode("ascii")


def _bound_signature(secret: str, assignment_id: int, expiry: int, bound_to: str) -> str:
    return _signature(secret, b"sfcrm-rsvp-2:", f"{assignment_id}.{expiry}.{bound_to}")


def _unbound_signature(secret: str, assignment_id: int, expiry: int) -> str:
    return _signature(secret, b"sfcrm-rsvp:", f"{assignment_id}.{expiry}")


def make_token(
    secret: str, assignment_id: int, bound_to: str, expires: datetime, now: datetime
) -> str:
    """A link token for the assignment whose :func:`binding` is ``bound_to``."""
    expiry = int(min(expires, now + MAX_LIFETIME).timestamp())
    return f"{assignment_id}.{expiry}.{_bound_signature(secret, assignment_id, expiry, bound_to)}"


def parse_token(token: str) -> Link:
    """The parts of a well-formed token; InvalidToken otherwise."""
    parts = token.split(".")
    if len(parts) != 3 or len(token) > 100:
        raise InvalidToken("malformed")
    assignment, expiry, signature = parts
    if not (
        assignment.isascii() and assignment.isdigit() and expiry.isascii() and expiry.isdigit()
    ):
        raise InvalidToken("malformed")
    return Link(int(assignment), int(expiry), signature)


def verify(secret: str, link: Link, bound_to: str, now: datetime) -> Literal["bound", "unbound"]:
    """Check a link against the assignment now at its id (``bound_to`` is its binding).

    "bound": signed for this very assignment. "unbound": of the first kind, signed over the id
    only; the caller must make sure it went out for this assignment. Anything else raises
    InvalidToken ("expired" only for a link that is genuine).
    """
    given = link.signature.encode("utf-8", "replace")
    bound = _bound_signature(secret, link.assignment_id, link.expiry, bound_to)
    if hmac.compare_digest(bound.encode(), given):
        kind: Literal["bound", "unbound"] = "bound"
    elif hmac.compare_digest(
        _unbound_signature(secret, link.assignment_id, link.expiry).encode(), given
    ):
        kind = "unbound"
    else:
        raise InvalidToken("bad signature")
    if datetime.fromtimestamp(link.expiry, UTC) <= now:
        raise InvalidToken("expired")
    return kind


def rsvp_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/crew/rsvp/{token}"
