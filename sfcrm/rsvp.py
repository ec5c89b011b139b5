"""Personal confirm/decline links for crew invitations.

A token is ``<assignment id>.<expiry, unix seconds>.<signature>``: an HMAC-SHA256 of the first
two parts under SFCRM_SECRET_KEY. It is bound to one assignment and dies when the event ends.
Anyone holding the link can answer for that one assignment and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta

MAX_LIFETIME = timedelta(days=120)


class InvalidToken(Exception):
    """Forged, tampered with, or expired."""


def _signature(secret: str, payload: str) -> str:
    digest = hmac.new(secret.encode(), b"sfcrm-rsvp:" + payload.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode("ascii")


def make_token(secret: str, assignment_id: int, expires: datetime, now: datetime) -> str:
    expires = min(expires, now + MAX_LIFETIME)
    payload = f"{assignment_id}.{int(expires.timestamp())}"
    return f"{payload}.{_signature(secret, payload)}"


def read_token(secret: str, token: str, now: datetime) -> int:
    """The assignment id a valid token is for; InvalidToken otherwise."""
    parts = token.split(".")
    if len(parts) != 3 or len(token) > 100:
        raise InvalidToken("malformed")
    assignment, expiry, signature = parts
    if not (
        assignment.isascii() and assignment.isdigit() and expiry.isascii() and expiry.isdigit()
    ):
        raise InvalidToken("malformed")
    expected = _signature(secret, f"{assignment}.{expiry}")
    if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "replace")):
        raise InvalidToken("bad signature")
    if datetime.fromtimestamp(int(expiry), UTC) <= now:
        raise InvalidToken("expired")
    return int(assignment)


def rsvp_url(public_url: str, token: str) -> str:
    return f"{public_url.rstrip('/')}/crew/rsvp/{token}"
