"""KES amounts: exact cents in, two decimals out, and the STK Push amount rule."""

from __future__ import annotations

from decimal import Decimal

import pytest

from sfcrm.errors import ExitCode, ValidationError
from sfcrm.money import MAX_STK_AMOUNT, format_cents, format_kes, parse_kes, parse_stk_amount


@pytest.mark.parametrize(
    ("text", "cents"),
    [
        ("1500", 150000),
        ("1500.5", 150050),
        ("1500.50", 150050),
        ("1,500.00", 150000),
        ("0.01", 1),
        ("0", 0),
        ("-20.25", -2025),
        (" 12 ", 1200),
        (1500, 150000),
        (Decimal("1500.75"), 150075),
        ("0.10", 10),
        ("250000", 25000000),
    ],
)
def test_parse_kes_gives_exact_cents(text: str | int | Decimal, cents: int) -> None:
    result = parse_kes(text)

    assert result == cents
    assert type(result) is int


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "amount must be a number"),
        ("", "amount must be a number"),
        ("12abc", "amount must be a number"),
        ("NaN", "amount must be a number"),
        ("sNaN", "amount must be a number"),
        ("inf", "amount must be a number"),
        ("-Infinity", "amount must be a number"),
        ("1.005", "more than two decimals"),
        ("0.001", "more than two decimals"),
        ("1" + "0" * 13, "too large"),
        # Scientific notation and underscores are numbers to Decimal, not amounts to a person
        # (a huge exponent once raised decimal.Overflow instead of ValidationError).
        ("1e3", "plain digits"),
        ("1E3", "plain digits"),
        ("1e13", "plain digits"),
        ("1e1000000", "plain digits"),
        ("-1e1000000", "plain digits"),
        ("1_000", "plain digits"),
        ("1_000.50", "plain digits"),
    ],
)
def test_parse_kes_refuses_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_kes(text)

    assert message in caught.value.message
    assert caught.value.value == text
    assert caught.value.exit_code == ExitCode.INVALID


def test_parse_kes_names_what_was_being_parsed() -> None:
    with pytest.raises(ValidationError, match="fee must be a number"):
        parse_kes("free", what="fee")


@pytest.mark.parametrize(
    ("cents", "text"),
    [
        (150050, "1500.50"),
        (150000, "1500.00"),
        (100, "1.00"),
        (5, "0.05"),
        (0, "0.00"),
        (-5, "-0.05"),
        (-100, "-1.00"),
        (-150050, "-1500.50"),
        (25_000_000, "250000.00"),
    ],
)
def test_format_cents_shows_two_decimals_and_the_sign(cents: int, text: str) -> None:
    assert format_cents(cents) == text


@pytest.mark.parametrize("text", ["1500.50", "0.05", "-0.05", "-1500.00", "250000.00"])
def test_format_cents_round_trips_through_parse_kes(text: str) -> None:
    assert format_cents(parse_kes(text)) == text


def test_format_kes_shows_whole_shillings_with_two_decimals() -> None:
    assert format_kes(500) == "500.00"
    assert format_kes(-3) == "-3.00"


@pytest.mark.parametrize(
    ("amount", "shillings"),
    [
        (500, 500),
        ("500", 500),
        ("500.00", 500),
        (Decimal("500"), 500),
        (Decimal("500.00"), 500),
        ("1,500", 1500),
        (1, 1),
        (MAX_STK_AMOUNT, 250_000),
        ("250000.00", 250_000),
    ],
)
def test_parse_stk_amount_accepts_whole_shillings(
    amount: str | int | Decimal, shillings: int
) -> None:
    result = parse_stk_amount(amount)

    assert result == shillings
    assert type(result) is int


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        (0, "at least 1"),
        ("0.00", "at least 1"),
        (-5, "at least 1"),
        ("-500", "at least 1"),
        (500.5, "whole shillings"),
        ("500.50", "whole shillings"),
        ("0.50", "whole shillings"),
        (250001, "250,000"),
        ("1000000", "250,000"),
        ("abc", "must be a number"),
        ("NaN", "must be a number"),
        ("inf", "must be a number"),
        ("", "must be a number"),
        # Regression: a huge exponent raised decimal.Overflow instead of ValidationError.
        ("1e1000000", "plain digits"),
        ("5e2", "plain digits"),
        ("5_00", "plain digits"),
    ],
)
def test_parse_stk_amount_refuses_with_a_clear_message(
    amount: str | int | float, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_stk_amount(amount)  # type: ignore[arg-type]

    assert message in caught.value.message
    assert caught.value.value == str(amount)
    assert caught.value.exit_code == ExitCode.INVALID


def test_parse_stk_amount_limit_is_mpesas_per_transaction_maximum() -> None:
    assert MAX_STK_AMOUNT == 250_000
