"""Money: KES amounts as exact integers of cents, shown with two decimals."""

from __future__ import annotations

import re
from decimal import Decimal

from sfcrm.errors import ValidationError

MAX_STK_AMOUNT = 250_000
# thousands separators only where they belong: 1,500 or 1,500.50, never 1,5,0,0
_GROUPED = re.compile(r"-?\d{1,3}(,\d{3})+(\.\d+)?")
# digits and one decimal point: Decimal would also read 1e3, 1_000, NaN and Infinity
_PLAIN = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_DIGITS_WRITTEN_OTHERWISE = re.compile(r"[+-]?[\d_.]*\d[\d_.]*([eE][+-]?\d+)?")


def parse_kes(text: str | int | Decimal, *, what: str = "amount") -> int:
    """Parse a KES amount (``1500``, ``1500.5``, ``"1,500.00"``) into cents."""
    raw = str(text).strip()
    if not raw.isascii() or ("," in raw and not _GROUPED.fullmatch(raw)):
        raise ValidationError(f"{what} must be a number", value=str(text))
    plain = raw.replace(",", "")
    if not _PLAIN.fullmatch(plain):
        if _DIGITS_WRITTEN_OTHERWISE.fullmatch(plain):
            raise ValidationError(
                f"{what} must be written in plain digits, like 1500 or 1,500.50", value=str(text)
            )
        raise ValidationError(f"{what} must be a number", value=str(text))
    value = Decimal(plain)
    if value.copy_abs() >= Decimal(10) ** 13:
        raise ValidationError(f"{what} is too large", value=str(text))
    cents = value * 100
    if cents != cents.to_integral_value():
        raise ValidationError(f"{what} has more than two decimals", value=str(text))
    if abs(cents) >= Decimal(10) ** 15:
        raise ValidationError(f"{what} is too large", value=str(text))
    return int(cents)


def parse_stk_amount(text: str | int | Decimal) -> int:
    """Parse an STK Push amount: whole shillings from 1 to 250,000."""
    cents = parse_kes(text)
    if cents % 100:
        raise ValidationError(
            "amount must be whole shillings (M-Pesa takes no cents)", value=str(text)
        )
    shillings = cents // 100
    if shillings <= 0:
        raise ValidationError("amount must be at least 1", value=str(text))
    if shillings > MAX_STK_AMOUNT:
        raise ValidationError("amount is over M-Pesa's 250,000 limit per payment", value=str(text))
    return shillings


def format_cents(cents: int) -> str:
    """``150050`` -> ``"1500.50"``."""
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(cents), 100)
    return f"{sign}{whole}.{part:02d}"


def format_kes(shillings: int) -> str:
    return format_cents(shillings * 100)


def balance_words(cents: int) -> str:
    """A balance as people read it: ``"1500.00"`` owed, or ``"in credit KES 200.00"`` when
    they paid more than they owed (a negative balance). JSON keeps the number as it is."""
    if cents < 0:
        return f"in credit KES {format_cents(-cents)}"
    return format_cents(cents)


def owes_words(cents: int) -> str:
    """``"owes KES 1500.00"``, ``"owes nothing"`` or ``"is in credit KES 200.00"``."""
    if cents < 0:
        return f"is {balance_words(cents)}"
    return f"owes KES {format_cents(cents)}" if cents else "owes nothing"
