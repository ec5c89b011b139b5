"""Kenyan phone numbers as Daraja wants them: 12 digits, ``2547XXXXXXXX`` or ``2541XXXXXXXX``."""

from __future__ import annotations

import re

from sfcrm.errors import ValidationError

_SEPARATORS = re.compile(r"[\s\-]")
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


def display(phone: str) -> str:
    """A stored number as people read it: ``254722111002`` is ``0722 111 002``."""
    if len(phone) == 12 and phone.startswith("254") and phone.isdigit():
        local = "0" + phone[3:]
        return f"{local[:4]} {local[4:7]} {local[7:]}"
    return phone
