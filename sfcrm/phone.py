"""Kenyan phone numbers as Daraja wants them: 12 digits, ``2547XXXXXXXX`` or ``2541XXXXXXXX``."""

from __future__ import annotations

import re

from sfcrm.errors import ValidationError

_SEPARATORS = re.compile(r"[\s\-]")
_ONE_NUMBER = re.compile(r"^\+?[0-9][0-9 ()\-]*$")
# Safaricom's prefixes; numbers port between networks, so others only earn a warning.
_SAFARICOM = re.compile(r"^254(7[0-2]\d|74[0-35-68]|75[7-9]|76[89]|79\d|11[0-5])")


def normalise_phone(text: str) -> str:
    """Return the 12-digit form of a Kenyan mobile number or raise ValidationError.

    Accepts ``0712345678``, ``712345678``, ``+254 712 345 678``, ``254-712-345-678`` and the
    ``01..`` range the same way. Never guesses by keeping "the last 9 digits".
    """
    cleaned = _SEPARATORS.sub("", text.strip()).removeprefix("+")
    if not cleaned.isascii() or not cleaned.isdigit():
        raise ValidationError("phone number must be digits, e.g. 0712345678", value=text)
    if len(cleaned) == 10 and cleaned.startswith("0"):
        digits = "254" + cleaned[1:]
    elif len(cleaned) == 9 and cleaned[0] in "71":
        digits = "254" + cleaned
    elif len(cleaned) == 12 and cleaned.startswith("254"):
        digits = cleaned
    else:
        raise ValidationError("not a Kenyan mobile number", value=text)
    if digits[3] not in "71":
        raise ValidationError("not a Kenyan mobile number (must be 07.. or 01..)", value=text)
    return digits


def is_safaricom(phone: str) -> bool:
    """True when a normalised number carries a Safaricom prefix."""
    return bool(_SAFARICOM.match(phone))


def display(phone: str | None) -> str:
    """A phone as people read it: ``254722111002`` is ``0722 111 002``. Any form of a Kenyan
    mobile is shown that way; anything else (an office landline) as it was given."""
    if not phone:
        return ""
    digits = _kenyan_mobile(phone)
    if digits is None:
        return phone.strip()
    return f"0{digits[3:6]} {digits[6:9]} {digits[9:]}"


def tel_uri(phone: str) -> str | None:
    """The ``tel:`` link that dials ``phone`` from a phone: ``tel:+254722111002`` for a Kenyan
    mobile, else its digits (and a leading ``+``) as given; None for text that is not one
    number (``0711 000111 / 0722 000222``, ``ask for Achieng``)."""
    digits = _kenyan_mobile(phone)
    if digits is not None:
        return f"tel:+{digits}"
    text = phone.strip()
    kept = "".join(c for c in text if c.isascii() and c.isdigit())
    if not kept or not _ONE_NUMBER.match(text):
        return None
    return f"tel:{'+' if text.startswith('+') else ''}{kept}"


def _kenyan_mobile(phone: str) -> str | None:
    try:
        return normalise_phone(phone)
    except ValidationError:
        return None
