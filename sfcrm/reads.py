"""Looking a person up by id, phone or email, in plain SQL."""

from __future__ import annotations

import sqlite3
from typing import Any

from sfcrm.errors import NotFoundError, ValidationError
from sfcrm.phone import normalise_phone

# -- people ------------------------------------------------------------------------------------


def resolve_person_id(conn: sqlite3.Connection, ref: str) -> int:
    """REF is an id, a phone number in any accepted form, or an email address."""
    text = ref.strip()
    found: Any = None
    phone: str | None = None
    if "@" in text:
        found = conn.execute("SELECT id FROM person WHERE email = ?", (text.lower(),)).fetchone()
    else:
        try:
            phone = normalise_phone(text)
        except ValidationError:
            phone = None
        if phone:
            found = conn.execute("SELECT id FROM person WHERE phone = ?", (phone,)).fetchone()
        if found is None and text.isdigit() and len(text) < 10:
            found = conn.execute("SELECT id FROM person WHERE id = ?", (int(text),)).fetchone()
        if found is None and phone is None and not text.isdigit():
            raise NotFoundError(
                "no such person", value=ref, hint="give an id, a phone number or an email"
            )
    if found is None:
        raise NotFoundError("no such person", value=ref, hint="see `sfcrm people list`")
    return int(found[0])
