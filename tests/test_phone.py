"""Kenyan phone numbers: what people type, and the 12 digits Daraja wants."""

from __future__ import annotations

import pytest

from sfcrm.errors import ExitCode, ValidationError
from sfcrm.phone import display, is_safaricom, normalise_phone, tel_uri


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("0712345678", "254712345678"),
        ("+254 712 345 678", "254712345678"),
        ("712345678", "254712345678"),
        ("254-712-345-678", "254712345678"),
        ("254712345678", "254712345678"),
        ("+254712345678", "254712345678"),
        ("0112345678", "254112345678"),
        ("112345678", "254112345678"),
        ("254112345678", "254112345678"),
        ("0708 374 149", "254708374149"),
        ("  0712345678\n", "254712345678"),
        ("0712\t345\u00a0678", "254712345678"),
    ],
)
def test_normalise_phone_gives_twelve_digits(typed: str, expected: str) -> None:
    assert normalise_phone(typed) == expected


@pytest.mark.parametrize(
    "typed",
    [
        "2547123",  # too short
        "71234567",  # 8 digits
        "255712345678",  # Tanzania
        "+255 712 345 678",
        "07123456789",  # 11 digits
        "2540712345678",  # 254 and the leading 0 both
        "9990712345678",  # never "the last 9 digits"
        "0712345678 0722000000",  # two numbers
        "07123abcde",
        "phone",
        "",
        "   ",
        "+",
        "0812345678",  # neither 07 nor 01
        "0212345678",  # a Nairobi landline
        "812345678",
        "612345678",
        "254812345678",
        "254012345678",
        "０７１２３４５６７８",  # fullwidth digits
        "٠٧١٢٣٤٥٦٧٨",  # Arabic-Indic digits
        "०७१२३४५६७८",  # Devanagari digits
        "0712.345.678",
        "(0712) 345678",
    ],
)
def test_normalise_phone_refuses_what_is_not_a_kenyan_mobile(typed: str) -> None:
    with pytest.raises(ValidationError) as caught:
        normalise_phone(typed)

    assert caught.value.exit_code == ExitCode.INVALID
    assert caught.value.value == typed
    assert caught.value.message


def test_normalise_phone_error_says_what_a_good_number_looks_like() -> None:
    with pytest.raises(ValidationError) as caught:
        normalise_phone("07123abcde")

    assert "0712345678" in str(caught.value)
    assert "07123abcde" in str(caught.value)


def test_normalise_phone_names_the_allowed_prefixes() -> None:
    with pytest.raises(ValidationError, match=r"07\.\. or 01\.\."):
        normalise_phone("0812345678")


# Safaricom's prefixes as shared/daraja.md lists them: 070x-072x, 0740-0743, 0745, 0746, 0748,
# 0757-0759, 0768, 0769, 079x and 0110-0115.
SAFARICOM_PREFIXES = (
    {f"07{n:02d}" for n in range(0, 30)}
    | {"0740", "0741", "0742", "0743", "0745", "0746", "0748"}
    | {"0757", "0758", "0759", "0768", "0769"}
    | {f"079{n}" for n in range(10)}
    | {f"011{n}" for n in range(6)}
)


@pytest.mark.parametrize(
    ("phone", "expected"),
    [
        ("254712345678", True),
        ("254700000000", True),
        ("254729999999", True),
        ("254110345678", True),
        ("254115345678", True),
        ("254116345678", False),
        ("254730345678", False),  # Airtel
        ("254733345678", False),
        ("254744345678", False),
        ("254747345678", False),
        ("254748345678", True),
        ("254757345678", True),
        ("254756345678", False),
        ("254768345678", True),
        ("254767345678", False),
        ("254790345678", True),
        ("254100345678", False),  # Airtel 0100
    ],
)
def test_is_safaricom_on_known_prefixes(phone: str, expected: bool) -> None:
    assert is_safaricom(phone) is expected


def test_is_safaricom_agrees_with_the_documented_prefix_list() -> None:
    disagreements = []
    for first in ("7", "1"):
        for rest in range(1000):
            phone = f"254{first}{rest:03d}00000"
            documented = f"0{first}{rest:03d}"[:4] in SAFARICOM_PREFIXES
            if is_safaricom(phone) != documented:
                disagreements.append(f"0{first}{rest:03d}")

    assert disagreements == []


def test_is_safaricom_works_on_normalised_numbers() -> None:
    assert is_safaricom(normalise_phone("0712 345 678"))
    assert is_safaricom(normalise_phone("0110345678"))
    assert not is_safaricom(normalise_phone("0733345678"))


@pytest.mark.parametrize(
    ("phone", "shown", "tel"),
    [
        ("254722111002", "0722 111 002", "tel:+254722111002"),
        ("254110123456", "0110 123 456", "tel:+254110123456"),
        ("0711000111", "0711 000 111", "tel:+254711000111"),
        ("+254 711 000 111", "0711 000 111", "tel:+254711000111"),
        ("020 2345678", "020 2345678", "tel:0202345678"),  # a landline: as given
        ("+44 20 7946 0000", "+44 20 7946 0000", "tel:+442079460000"),
        ("0711 000111 / 0722 000222", "0711 000111 / 0722 000222", None),  # two: no link
        ("ask for Achieng", "ask for Achieng", None),
    ],
)
def test_phones_show_as_people_write_them_and_dial_in_full(
    phone: str, shown: str, tel: str | None
) -> None:
    assert display(phone) == shown
    assert tel_uri(phone) == tel
