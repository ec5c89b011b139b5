"""DarajaClient against `responses` (no internet), and parse_stk_callback on Daraja's samples.

The sample payloads are copied verbatim from ``shared/daraja-samples/`` so the tests do not
depend on a file outside the repository; their formatting (``1.00``) matters for Decimal.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from http.client import RemoteDisconnected
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import requests
import responses
import urllib3
from responses import matchers

from sfcrm.daraja import (
    BUY_GOODS,
    DarajaClient,
    MemoryTokenCache,
    PushAccepted,
    QueryResult,
    StkResult,
    clean_reference,
    nairobi_timestamp,
    parse_stk_callback,
    stk_password,
)
from sfcrm.errors import (
    CallbackFormatError,
    DarajaAuthError,
    DarajaBusyError,
    DarajaCredentialsError,
    DarajaError,
    DarajaRequestError,
    DarajaTimeoutError,
    DarajaTokenError,
    DarajaUnreachableError,
    ExitCode,
)

BASE = "https://sandbox.safaricom.co.ke"
TOKEN_URL = f"{BASE}/oauth/v1/generate"
PUSH_URL = f"{BASE}/mpesa/stkpush/v1/processrequest"
QUERY_URL = f"{BASE}/mpesa/stkpushquery/v1/query"

SHORTCODE = "174379"
SANDBOX_PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
# Safaricom's documented Password for 174379 + the sandbox passkey + 20210628092408.
SAMPLE_PASSWORD = (
    "MTc0Mzc5YmZiMjc5ZjlhYTliZGJjZjE1OGU5N2RkNzFhNDY3Y2QyZTBjODkzMDU5YjEwZjc4ZTZiNzJhZGExZWQy"
    "YzkxOTIwMjEwNjI4MDkyNDA4"
)
SAMPLE_TIMESTAMP = "20210628092408"
# 06:24:08 UTC is 09:24:08 in Nairobi: the moment of Safaricom's sample.
SAMPLE_NOW = datetime(2021, 6, 28, 6, 24, 8, tzinfo=UTC)
NAIROBI_OFFSET = timedelta(hours=3)

# Canary secrets: easy to spot if they leak into a repr or an error message.
CONSUMER_KEY = "ck-CANARY-key-5f1d"
CONSUMER_SECRET = "cs-CANARY-secret-9b7e"
CANARY_PASSKEY = "pk-CANARY-passkey-3a2c"
CALLBACK_URL = "https://pay.soundfusion.example/cb/q8W2-secret-path"
PHONE = "254708374149"

TOKEN_JSON = {"access_token": "c9SQxWWhmdVRlyh0zh8gZDTkubVF", "expires_in": "3599"}
PUSH_ACCEPTED = {
    "MerchantRequestID": "2654-4b64-97ff-b827b542881d3130",
    "CheckoutRequestID": "ws_CO_1007202409152617172396192",
    "ResponseCode": "0",
    "ResponseDescription": "Success. Request accepted for processing",
    "CustomerMessage": "Success. Request accepted for processing",
}
INVALID_TOKEN = {
    "requestId": "11728-2929992-1",
    "errorCode": "404.001.03",
    "errorMessage": "Invalid Access Token",
}
INVALID_AMOUNT = {
    "requestId": "1c5b-4ba8-815c-ac45c57a3db01495926",
    "errorCode": "400.002.02",
    "errorMessage": "Bad Request - Invalid Amount",
}
QUERY_PAID = {
    "ResponseCode": "0",
    "ResponseDescription": "The service request has been accepted successsfully",
    "MerchantRequestID": "22205-34066-1",
    "CheckoutRequestID": "ws_CO_13012021093521236557",
    "ResultCode": "0",
    "ResultDesc": "The service request is processed successfully.",
}
QUERY_CANCELLED = {**QUERY_PAID, "ResultCode": "1032", "ResultDesc": "Request cancelled by user"}
QUERY_PENDING_4999 = {
    **QUERY_PAID,
    "ResultCode": "4999",
    "ResultDesc": "The transaction is still under processing",
}
QUERY_PENDING_500 = {
    "requestId": "ws_CO_20022018230142206",
    "errorCode": "500.001.1001",
    "errorMessage": "The transaction is being processed",
}
CHECKOUT_ID = "ws_CO_13012021093521236557"

CALLBACK_SUCCESS = b"""{
  "Body": {
    "stkCallback": {
      "MerchantRequestID": "29115-34620561-1",
      "CheckoutRequestID": "ws_CO_191220191020363925",
      "ResultCode": 0,
      "ResultDesc": "The service request is processed successfully.",
      "CallbackMetadata": {
        "Item": [
          {"Name": "Amount", "Value": 1.00},
          {"Name": "MpesaReceiptNumber", "Value": "NLJ7RT61SV"},
          {"Name": "Balance"},
          {"Name": "TransactionDate", "Value": 20191219102115},
          {"Name": "PhoneNumber", "Value": 254708374149}
        ]
      }
    }
  }
}
"""
CALLBACK_SUCCESS_REORDERED = b"""{
  "Body": {
    "stkCallback": {
      "MerchantRequestID": "7071-4170-a0e4-8345632bad442139",
      "CheckoutRequestID": "ws_CO_05082025135929114669533",
      "ResultCode": 0,
      "ResultDesc": "The service request is processed successfully.",
      "CallbackMetadata": {
        "Item": [
          {"Name": "PhoneNumber", "Value": 254114669532},
          {"Name": "Amount", "Value": 500},
          {"Name": "Balance", "Value": "{Amount={CurrencyCode=KES, MinimumAmount=8900, BasicAmount=89.00}}"},
          {"Name": "TransactionDate", "Value": 20250803135929},
          {"Name": "MpesaReceiptNumber", "Value": "TH3AB7XY9K"}
        ]
      }
    }
  }
}
"""  # noqa: E501
CALLBACK_STRING_CODE = b"""{
  "Body": {
    "stkCallback": {
      "MerchantRequestID": "7071-4170-a0e4-8345632bad442138",
      "CheckoutRequestID": "ws_CO_05082025135929114669532",
      "ResultCode": "SFC_IC0003",
      "ResultDesc": "The operator does not exist."
    }
  }
}
"""
CALLBACK_CANCELLED = b"""{
  "Body": {
    "stkCallback": {
      "MerchantRequestID": "f1e2-4b95-a71d-b30d3cdbb7a7942864",
      "CheckoutRequestID": "ws_CO_21072024125243250722943992",
      "ResultCode": 1032,
      "ResultDesc": "Request cancelled by user"
    }
  }
}
"""


# -- fixtures and helpers --------------------------------------------------------------------


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock(SAMPLE_NOW)


@pytest.fixture
def daraja() -> Iterator[responses.RequestsMock]:
    """Every HTTP request of the test goes to this mock; an unregistered URL is an error."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def make_client(clock: Callable[[], datetime], **kwargs: Any) -> DarajaClient:
    args: dict[str, Any] = {
        "base_url": BASE,
        "consumer_key": CONSUMER_KEY,
        "consumer_secret": CONSUMER_SECRET,
        "shortcode": SHORTCODE,
        "passkey": SANDBOX_PASSKEY,
        "session": requests.Session(),
        "timeout": 12.5,
        "clock": clock,
    }
    args.update(kwargs)
    return DarajaClient(
        args.pop("base_url"),
        args.pop("consumer_key"),
        args.pop("consumer_secret"),
        args.pop("shortcode"),
        args.pop("passkey"),
        **args,
    )


@pytest.fixture
def client(clock: Clock) -> DarajaClient:
    return make_client(clock)


def basic_auth(key: str = CONSUMER_KEY, secret: str = CONSUMER_SECRET) -> str:
    return "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()


def add_token(
    rsps: responses.RequestsMock,
    token: str = "tok-1",
    expires_in: Any = "3599",
    *,
    key: str = CONSUMER_KEY,
    secret: str = CONSUMER_SECRET,
) -> responses.BaseResponse:
    return rsps.get(
        TOKEN_URL,
        json={"access_token": token, "expires_in": expires_in},
        match=[
            matchers.query_param_matcher({"grant_type": "client_credentials"}),
            matchers.header_matcher({"Authorization": basic_auth(key, secret)}),
        ],
    )


@pytest.fixture
def daraja_token_ok(daraja: responses.RequestsMock) -> responses.BaseResponse:
    return add_token(daraja)


def push(client: DarajaClient, **kwargs: Any) -> PushAccepted:
    args: dict[str, Any] = {
        "phone": PHONE,
        "amount": 500,
        "callback_url": CALLBACK_URL,
        "account_reference": "INV-0042",
        "transaction_desc": "Ticket",
    }
    args.update(kwargs)
    return client.stk_push(**args)


def sent_json(call: Any) -> dict[str, Any]:
    body = call.request.body
    return json.loads(body.decode() if isinstance(body, bytes) else body)


def token_calls(rsps: responses.RequestsMock) -> int:
    return sum(1 for call in rsps.calls if call.request.url.startswith(TOKEN_URL))


def push_calls(rsps: responses.RequestsMock) -> int:
    return sum(1 for call in rsps.calls if call.request.url == PUSH_URL)


# -- password and timestamp ------------------------------------------------------------------


def test_stk_password_matches_safaricoms_documented_sample() -> None:
    assert stk_password(SHORTCODE, SANDBOX_PASSKEY, SAMPLE_TIMESTAMP) == SAMPLE_PASSWORD


def test_stk_password_is_plain_concatenation_of_shortcode_passkey_and_timestamp() -> None:
    decoded = base64.b64decode(stk_password("600000", "abc", "20240101000000")).decode()
    assert decoded == "600000abc20240101000000"


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (SAMPLE_NOW, SAMPLE_TIMESTAMP),
        # 22:30 UTC is already the next day in Nairobi
        (datetime(2021, 6, 28, 22, 30, 0, tzinfo=UTC), "20210629013000"),
        # and the next year on New Year's Eve
        (datetime(2021, 12, 31, 21, 0, 0, tzinfo=UTC), "20220101000000"),
        # a host in New York (EDT, UTC-4) gets Nairobi time too
        (datetime(2021, 6, 28, 2, 24, 8, tzinfo=ZoneInfo("America/New_York")), SAMPLE_TIMESTAMP),
        # already Nairobi time stays as it is
        (datetime(2021, 6, 28, 9, 24, 8, tzinfo=ZoneInfo("Africa/Nairobi")), SAMPLE_TIMESTAMP),
    ],
)
def test_nairobi_timestamp_gives_nairobi_wall_clock(moment: datetime, expected: str) -> None:
    assert nairobi_timestamp(moment) == expected


def test_nairobi_timestamp_refuses_naive_datetime() -> None:
    with pytest.raises(ValueError, match="aware"):
        nairobi_timestamp(datetime(2021, 6, 28, 9, 24, 8))


# -- the push body ---------------------------------------------------------------------------


def test_push_sends_exactly_the_documented_fields(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    expected = {
        "BusinessShortCode": SHORTCODE,
        "Password": SAMPLE_PASSWORD,
        "Timestamp": SAMPLE_TIMESTAMP,
        "TransactionType": "CustomerPayBillOnline",
        "Amount": 500,
        "PartyA": PHONE,
        "PartyB": SHORTCODE,
        "PhoneNumber": PHONE,
        "CallBackURL": CALLBACK_URL,
        "AccountReference": "INV-0042",
        "TransactionDesc": "Ticket",
    }
    daraja.post(
        PUSH_URL,
        json=PUSH_ACCEPTED,
        match=[
            matchers.json_params_matcher(expected),
            matchers.header_matcher(
                {"Authorization": "Bearer tok-1", "Content-Type": "application/json"}
            ),
        ],
    )

    accepted = push(client)

    assert accepted == PushAccepted(
        merchant_request_id="2654-4b64-97ff-b827b542881d3130",
        checkout_request_id="ws_CO_1007202409152617172396192",
        customer_message="Success. Request accepted for processing",
    )
    assert sent_json(daraja.calls[-1]) == expected


def test_push_password_embeds_the_same_timestamp_it_sends(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    daraja.post(PUSH_URL, json=PUSH_ACCEPTED)

    push(client)

    body = sent_json(daraja.calls[-1])
    assert base64.b64decode(body["Password"]).decode().endswith(body["Timestamp"])
    assert body["Password"] == stk_password(SHORTCODE, SANDBOX_PASSKEY, body["Timestamp"])


def test_push_sends_amount_as_a_json_integer(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    daraja.post(PUSH_URL, json=PUSH_ACCEPTED)

    push(client, amount=1500)

    amount = sent_json(daraja.calls[-1])["Amount"]
    # json_params_matcher would accept 1500.0 too (1500 == 1500.0), so check the type.
    assert type(amount) is int
    assert amount == 1500


def test_push_sends_json_not_form_encoding(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    daraja.post(PUSH_URL, json=PUSH_ACCEPTED)

    push(client)

    request = daraja.calls[-1].request
    assert request.headers["Content-Type"] == "application/json"
    assert isinstance(sent_json(daraja.calls[-1]), dict)


def test_push_for_a_till_sends_the_till_number_as_party_b(
    clock: Clock, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    till = make_client(clock, transaction_type=BUY_GOODS, till_number="5123456")
    daraja.post(
        PUSH_URL,
        json=PUSH_ACCEPTED,
        match=[
            matchers.json_params_matcher(
                {
                    "BusinessShortCode": SHORTCODE,
                    "TransactionType": "CustomerBuyGoodsOnline",
                    "PartyA": PHONE,
                    "PartyB": "5123456",
                    "PhoneNumber": PHONE,
                },
                strict_match=False,
            )
        ],
    )

    push(till)

    assert sent_json(daraja.calls[-1])["PartyB"] == "5123456"


def test_push_cuts_reference_to_12_and_description_to_13_without_disallowed_chars(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    daraja.post(PUSH_URL, json=PUSH_ACCEPTED)

    push(client, account_reference="INV#42@SF&Co-2024", transaction_desc="Gate&Ticket@KICC#1")

    body = sent_json(daraja.calls[-1])
    reference, desc = body["AccountReference"], body["TransactionDesc"]
    assert len(reference) <= 12
    assert len(desc) <= 13
    for text in (reference, desc):
        assert not set(text) & set("@#&")
        assert text == text.strip()
    assert reference == "INV 42 SF Co"
    assert desc == "Gate Ticket K"


@pytest.mark.parametrize(
    ("text", "limit", "expected"),
    [
        ("Sound Fusion Launch Party", 12, "Sound Fusion"),
        ("a_b.c-d e", 12, "a_b.c-d e"),
        ("x@y#z&w", 13, "x y z w"),
        ("@#&", 12, "FALLBACK"),
        ("", 13, "FALLBACK"),
        ("   ", 13, "FALLBACK"),
        ("Ticket: Café!", 13, "Ticket Caf"),
        ("multi\n\tline   text", 13, "multi line te"),
    ],
)
def test_clean_reference_keeps_only_allowed_characters_within_limit(
    text: str, limit: int, expected: str
) -> None:
    assert clean_reference(text, limit, "FALLBACK") == expected


# -- the token -------------------------------------------------------------------------------


def test_token_request_sends_basic_auth_of_key_and_secret(
    client: DarajaClient, daraja: responses.RequestsMock
) -> None:
    route = daraja.get(
        TOKEN_URL,
        json=TOKEN_JSON,
        match=[
            matchers.query_param_matcher({"grant_type": "client_credentials"}),
            matchers.header_matcher({"Authorization": basic_auth()}),
        ],
    )

    assert client.token() == "c9SQxWWhmdVRlyh0zh8gZDTkubVF"
    assert route.call_count == 1
    assert daraja.calls[0].request.method == "GET"


def test_token_is_cached_across_pushes(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    daraja.post(PUSH_URL, json=PUSH_ACCEPTED)

    push(client)
    push(client)

    assert token_calls(daraja) == 1
    assert push_calls(daraja) == 2


@pytest.mark.parametrize("expires_in", ["3599", 3599], ids=["string", "number"])
def test_token_is_reused_until_a_minute_before_expiry(
    expires_in: Any, client: DarajaClient, clock: Clock, daraja: responses.RequestsMock
) -> None:
    add_token(daraja, "tok-1", expires_in)
    assert client.token() == "tok-1"

    clock.advance(3599 - 60 - 1)  # 61 s left: still good
    assert client.token() == "tok-1"
    assert token_calls(daraja) == 1


@pytest.mark.parametrize("expires_in", ["3599", 3599], ids=["string", "number"])
def test_token_is_refreshed_within_60_seconds_of_expiry(
    expires_in: Any, client: DarajaClient, clock: Clock, daraja: responses.RequestsMock
) -> None:
    add_token(daraja, "tok-1", expires_in)
    add_token(daraja, "tok-2", expires_in)
    assert client.token() == "tok-1"

    clock.advance(3599 - 60)  # 60 s left: refresh now
    assert client.token() == "tok-2"
    assert token_calls(daraja) == 2


def test_a_short_lived_token_is_used_for_most_of_its_life(
    client: DarajaClient, clock: Clock, daraja: responses.RequestsMock
) -> None:
    add_token(daraja, "tok-1", "5")
    add_token(daraja, "tok-2", "5")
    assert client.token() == "tok-1"
    clock.advance(4.4)  # a tenth of its life (0.5 s) is the early margin
    assert client.token() == "tok-1"
    clock.advance(0.2)
    assert client.token() == "tok-2"
    assert token_calls(daraja) == 2


def test_shared_token_cache_spares_the_second_client_a_token_request(
    clock: Clock, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    cache = MemoryTokenCache()
    first = make_client(clock, token_cache=cache)
    second = make_client(clock, token_cache=cache)

    assert first.token() == "tok-1"
    assert second.token() == "tok-1"
    assert token_calls(daraja) == 1


def test_shared_token_cache_keeps_tokens_of_other_consumer_keys_apart(
    clock: Clock, daraja: responses.RequestsMock
) -> None:
    add_token(daraja, "tok-a")
    add_token(daraja, "tok-b", key="other-key", secret="other-secret")
    cache = MemoryTokenCache()
    first = make_client(clock, token_cache=cache)
    second = make_client(
        clock, token_cache=cache, consumer_key="other-key", consumer_secret="other-secret"
    )

    assert first.token() == "tok-a"
    assert second.token() == "tok-b"
    assert token_calls(daraja) == 2


def test_token_refused_with_empty_400_is_an_auth_error_naming_the_key_variable(
    client: DarajaClient, daraja: responses.RequestsMock
) -> None:
    daraja.get(TOKEN_URL, status=400, body="")

    with pytest.raises(DarajaAuthError) as caught:
        client.token()

    assert caught.value.http_status == 400
    assert caught.value.exit_code == ExitCode.DARAJA
    assert "MPESA_CONSUMER_KEY" in (caught.value.hint or "")
    assert "400" in str(caught.value)


def test_push_with_refused_keys_sends_no_push(
    client: DarajaClient, daraja: responses.RequestsMock
) -> None:
    daraja.get(TOKEN_URL, status=400, body="")
    daraja.post(PUSH_URL, json=PUSH_ACCEPTED)

    with pytest.raises(DarajaAuthError):
        push(client)

    assert push_calls(daraja) == 0


@pytest.mark.parametrize(
    "answer",
    [
        {"expires_in": "3599"},
        {"access_token": "", "expires_in": "3599"},
        {"access_token": "tok", "expires_in": "soon"},
        {"access_token": "tok", "expires_in": "0"},
        ["tok"],
    ],
)
def test_unreadable_token_answer_is_a_daraja_error(
    answer: Any, client: DarajaClient, daraja: responses.RequestsMock
) -> None:
    daraja.get(TOKEN_URL, json=answer)

    with pytest.raises(DarajaError, match="token answer could not be read"):
        client.token()


# -- 404.001.03 invalid access token ---------------------------------------------------------


def test_push_retries_once_after_invalid_token(
    client: DarajaClient, daraja: responses.RequestsMock
) -> None:
    add_token(daraja, "tok-1")
    add_token(daraja, "tok-2")
    daraja.post(
        PUSH_URL,
        status=404,
        json=INVALID_TOKEN,
        match=[matchers.header_matcher({"Authorization": "Bearer tok-1"})],
    )
    daraja.post(
        PUSH_URL,
        json=PUSH_ACCEPTED,
        match=[matchers.header_matcher({"Authorization": "Bearer tok-2"})],
    )

    accepted = push(client)

    assert accepted.checkout_request_id == PUSH_ACCEPTED["CheckoutRequestID"]
    assert token_calls(daraja) == 2
    assert push_calls(daraja) == 2
    # the retry is the same push: same timestamp and password
    first, second = (sent_json(c) for c in daraja.calls if c.request.url == PUSH_URL)
    assert first == second


def test_persistent_invalid_token_stops_after_one_retry(
    client: DarajaClient, daraja: responses.RequestsMock
) -> None:
    add_token(daraja, "tok-1")
    add_token(daraja, "tok-2")
    daraja.post(PUSH_URL, status=404, json=INVALID_TOKEN)

    with pytest.raises(DarajaTokenError) as caught:
        push(client)

    assert push_calls(daraja) == 2
    assert token_calls(daraja) == 2
    assert caught.value.error_code == "404.001.03"
    assert caught.value.http_status == 404
    assert "MPESA_ENVIRONMENT" in (caught.value.hint or "")


def test_query_retries_once_after_invalid_token(
    client: DarajaClient, daraja: responses.RequestsMock
) -> None:
    add_token(daraja, "tok-1")
    add_token(daraja, "tok-2")
    daraja.post(
        QUERY_URL,
        status=404,
        json=INVALID_TOKEN,
        match=[matchers.header_matcher({"Authorization": "Bearer tok-1"})],
    )
    daraja.post(
        QUERY_URL,
        json=QUERY_PAID,
        match=[matchers.header_matcher({"Authorization": "Bearer tok-2"})],
    )

    assert client.stk_query(CHECKOUT_ID).result_code == "0"
    assert token_calls(daraja) == 2


# -- Daraja's error envelope -----------------------------------------------------------------


def envelope(code: str, message: str) -> dict[str, str]:
    return {"requestId": "req-77", "errorCode": code, "errorMessage": message}


@pytest.mark.parametrize(
    ("status", "body", "error_class", "hint_part"),
    [
        (400, INVALID_AMOUNT, DarajaRequestError, "whole shillings"),
        (
            400,
            envelope("400.002.02", "Bad Request - Invalid PhoneNumber"),
            DarajaRequestError,
            "2547XXXXXXXX",
        ),
        (
            400,
            envelope("400.002.02", "Bad Request - Invalid CallBackURL"),
            DarajaRequestError,
            "MPESA_CALLBACK_URL",
        ),
        (
            400,
            envelope("400.002.02", "Bad Request - Invalid Timestamp"),
            DarajaRequestError,
            "clock",
        ),
        (
            500,
            envelope("500.001.1001", "Wrong credentials"),
            DarajaCredentialsError,
            "MPESA_PASS_KEY",
        ),
        (
            500,
            envelope("500.001.1001", "Merchant does not exist"),
            DarajaCredentialsError,
            "MPESA_BUSINESS_SHORT_CODE",
        ),
        (
            500,
            envelope(
                "500.001.1001",
                "Unable to lock subscriber, a transaction is already in process for the current "
                "subscriber",
            ),
            DarajaBusyError,
            "wait a minute",
        ),
        (500, envelope("500.003.02", "Spike arrest violation"), DarajaBusyError, "back off"),
        (500, envelope("500.003.03", "Quota violation"), DarajaBusyError, "back off"),
        (500, envelope("500.003.1001", "Internal Server Error"), DarajaBusyError, "try later"),
    ],
    ids=[
        "invalid-amount",
        "invalid-phone",
        "invalid-callback",
        "invalid-timestamp",
        "wrong-credentials",
        "merchant-does-not-exist",
        "subscriber-locked",
        "spike-arrest",
        "quota",
        "internal-error",
    ],
)
def test_push_error_maps_to_its_class_and_hint(
    status: int,
    body: dict[str, str],
    error_class: type[DarajaError],
    hint_part: str,
    client: DarajaClient,
    daraja: responses.RequestsMock,
    daraja_token_ok: Any,
) -> None:
    daraja.post(PUSH_URL, status=status, json=body)

    with pytest.raises(DarajaError) as caught:
        push(client)

    error = caught.value
    assert type(error) is error_class
    assert hint_part in (error.hint or "")
    assert error.error_code == body["errorCode"]
    assert error.http_status == status
    assert error.exit_code == ExitCode.DARAJA
    assert push_calls(daraja) == 1  # a refused push is never sent again


def test_error_envelope_fields_are_copied_onto_the_error(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    daraja.post(PUSH_URL, status=400, json=INVALID_AMOUNT)

    with pytest.raises(DarajaRequestError) as caught:
        push(client)

    error = caught.value
    assert error.error_code == "400.002.02"
    assert error.request_id == "1c5b-4ba8-815c-ac45c57a3db01495926"
    assert error.http_status == 400
    assert error.code == "400.002.02"
    assert "Invalid Amount" in str(error)


GATEWAY_FAULT = {
    "fault": {
        "faultstring": "The Service is temporarily unavailable",
        "detail": {"errorcode": "messaging.adaptors.http.flow.ServiceUnavailable"},
    }
}
HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body>Bad Gateway</body></html>"


@pytest.mark.parametrize(
    ("status", "kwargs"),
    [
        (503, {"json": GATEWAY_FAULT}),
        (500, {"json": GATEWAY_FAULT}),
        (502, {"body": HTML_502, "content_type": "text/html"}),
    ],
    ids=["fault-503", "fault-500", "html-502"],
)
def test_gateway_answer_to_push_is_an_unknown_outcome(
    status: int,
    kwargs: dict[str, Any],
    client: DarajaClient,
    daraja: responses.RequestsMock,
    daraja_token_ok: Any,
) -> None:
    # A gateway page does not prove the push was not processed: the prompt may be on the phone.
    daraja.post(PUSH_URL, status=status, **kwargs)

    with pytest.raises(DarajaTimeoutError) as caught:
        push(client)

    assert caught.value.http_status == status
    assert str(status) in str(caught.value)
    assert "reconcile" in (caught.value.hint or "")
    assert caught.value.exit_code == ExitCode.NETWORK
    assert push_calls(daraja) == 1


def test_html_4xx_page_on_push_is_a_daraja_error_showing_the_status(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    daraja.post(
        PUSH_URL,
        status=403,
        body="<html><body><h1>403 Forbidden</h1>Request blocked.</body></html>",
        content_type="text/html",
    )

    with pytest.raises(DarajaError) as caught:
        push(client)

    error = caught.value
    assert type(error) is DarajaError
    assert error.http_status == 403
    assert error.error_code is None
    assert "HTTP 403" in str(error)
    assert "Forbidden" in str(error)


def test_fault_envelope_on_query_shows_status_and_faultstring(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    daraja.post(QUERY_URL, status=503, json=GATEWAY_FAULT)

    with pytest.raises(DarajaError) as caught:
        client.stk_query(CHECKOUT_ID)

    assert not isinstance(caught.value, DarajaTimeoutError)
    assert caught.value.http_status == 503
    assert "HTTP 503" in str(caught.value)
    assert "temporarily unavailable" in str(caught.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"body": "<html>OK</html>", "content_type": "text/html"},
        {"json": {"ResponseCode": "1", "ResponseDescription": "Rejected"}},
        {"json": {"ResponseCode": "0"}},
    ],
    ids=["html-200", "non-zero-response-code", "no-checkout-id"],
)
def test_unreadable_200_answer_to_push_is_an_unknown_outcome(
    kwargs: dict[str, Any],
    client: DarajaClient,
    daraja: responses.RequestsMock,
    daraja_token_ok: Any,
) -> None:
    daraja.post(PUSH_URL, status=200, **kwargs)

    with pytest.raises(DarajaTimeoutError):
        push(client)

    assert push_calls(daraja) == 1


# -- transport failures ----------------------------------------------------------------------


def connection_refused() -> requests.ConnectionError:
    return requests.ConnectionError(
        urllib3.exceptions.NewConnectionError(
            None,  # type: ignore[arg-type]
            "Failed to establish a new connection: [Errno 111] Connection refused",
        )
    )


def connection_refused_as_requests_raises_it() -> requests.ConnectionError:
    reason = urllib3.exceptions.NewConnectionError(
        None,  # type: ignore[arg-type]
        "Failed to establish a new connection: [Errno 111] Connection refused",
    )
    return requests.ConnectionError(
        urllib3.exceptions.MaxRetryError(None, "/oauth/v1/generate", reason)  # type: ignore[arg-type]
    )


def name_not_resolved() -> requests.ConnectionError:
    import socket

    reason = urllib3.exceptions.NameResolutionError(
        "sandbox.safaricom.co.ke",
        None,  # type: ignore[arg-type]
        socket.gaierror(-2, "Name or service not known"),
    )
    return requests.ConnectionError(
        urllib3.exceptions.MaxRetryError(None, "/oauth/v1/generate", reason)  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    "failure",
    [
        connection_refused,
        connection_refused_as_requests_raises_it,
        name_not_resolved,
        lambda: requests.ConnectTimeout("connect timed out"),
    ],
    ids=["refused", "refused-in-max-retry", "dns", "connect-timeout"],
)
def test_token_request_that_never_connected_is_unreachable(
    failure: Callable[[], Exception], client: DarajaClient, daraja: responses.RequestsMock
) -> None:
    daraja.get(TOKEN_URL, body=failure())

    with pytest.raises(DarajaUnreachableError) as caught:
        client.token()

    assert caught.value.exit_code == ExitCode.NETWORK
    assert BASE in str(caught.value)


def test_push_refused_connection_is_unreachable_and_sent_once(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    daraja.post(PUSH_URL, body=connection_refused())

    with pytest.raises(DarajaUnreachableError) as caught:
        push(client)

    assert caught.value.exit_code == ExitCode.NETWORK
    assert push_calls(daraja) == 1


def test_push_read_timeout_is_unknown_outcome_and_never_retried(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    daraja.post(PUSH_URL, body=requests.ReadTimeout("read timed out"))

    with pytest.raises(DarajaTimeoutError) as caught:
        push(client)

    assert not isinstance(caught.value, DarajaUnreachableError)
    assert caught.value.exit_code == ExitCode.NETWORK
    assert "do not push again" in (caught.value.hint or "")
    assert push_calls(daraja) == 1


def test_push_connection_dropped_after_sending_is_unknown_outcome(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    dropped = requests.ConnectionError(
        urllib3.exceptions.ProtocolError(
            "Connection aborted.", RemoteDisconnected("Remote end closed connection")
        )
    )
    daraja.post(PUSH_URL, body=dropped)

    with pytest.raises(DarajaTimeoutError):
        push(client)

    assert push_calls(daraja) == 1


def test_query_read_timeout_is_a_timeout_error(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    daraja.post(QUERY_URL, body=requests.ReadTimeout("read timed out"))

    with pytest.raises(DarajaTimeoutError) as caught:
        client.stk_query(CHECKOUT_ID)

    assert "try again" in (caught.value.hint or "")


def test_every_request_carries_the_configured_timeout(
    clock: Clock, daraja: responses.RequestsMock
) -> None:
    client = make_client(clock, timeout=7.5)
    add_token(daraja)
    daraja.post(PUSH_URL, json=PUSH_ACCEPTED)
    daraja.post(QUERY_URL, json=QUERY_PAID)

    push(client)
    client.stk_query(CHECKOUT_ID)

    assert len(daraja.calls) == 3
    assert [call.request.req_kwargs["timeout"] for call in daraja.calls] == [7.5, 7.5, 7.5]


# -- STK push query --------------------------------------------------------------------------


def test_query_sends_shortcode_password_timestamp_and_checkout_id(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    daraja.post(
        QUERY_URL,
        json=QUERY_PAID,
        match=[
            matchers.json_params_matcher(
                {
                    "BusinessShortCode": SHORTCODE,
                    "Password": SAMPLE_PASSWORD,
                    "Timestamp": SAMPLE_TIMESTAMP,
                    "CheckoutRequestID": CHECKOUT_ID,
                }
            ),
            matchers.header_matcher(
                {"Authorization": "Bearer tok-1", "Content-Type": "application/json"}
            ),
        ],
    )

    client.stk_query(CHECKOUT_ID)

    assert sent_json(daraja.calls[-1])["CheckoutRequestID"] == CHECKOUT_ID


@pytest.mark.parametrize(
    ("status", "answer", "expected_code"),
    [
        (200, QUERY_PAID, "0"),
        (200, QUERY_CANCELLED, "1032"),
        (200, QUERY_PENDING_4999, None),
        (500, QUERY_PENDING_500, None),
    ],
    ids=["paid", "cancelled", "pending-4999", "pending-http-500"],
)
def test_query_reports_the_result_code_or_still_processing(
    status: int,
    answer: dict[str, str],
    expected_code: str | None,
    client: DarajaClient,
    daraja: responses.RequestsMock,
    daraja_token_ok: Any,
) -> None:
    daraja.post(QUERY_URL, status=status, json=answer)

    result = client.stk_query(CHECKOUT_ID)

    assert isinstance(result, QueryResult)
    assert result.checkout_request_id == CHECKOUT_ID
    assert result.result_code == expected_code
    assert result.processing is (expected_code is None)
    assert result.result_desc


def test_query_numeric_result_code_is_compared_as_string(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    daraja.post(QUERY_URL, json={**QUERY_CANCELLED, "ResultCode": 1032})

    assert client.stk_query(CHECKOUT_ID).result_code == "1032"


def test_query_still_processing_is_retried_by_nobody(
    client: DarajaClient, daraja: responses.RequestsMock, daraja_token_ok: Any
) -> None:
    daraja.post(QUERY_URL, status=500, json=QUERY_PENDING_500)

    client.stk_query(CHECKOUT_ID)

    assert sum(1 for call in daraja.calls if call.request.url == QUERY_URL) == 1


# -- no secret leaks -------------------------------------------------------------------------


def canary_client(clock: Clock) -> DarajaClient:
    return make_client(clock, passkey=CANARY_PASSKEY)


def canary_secrets() -> list[str]:
    basic = base64.b64encode(f"{CONSUMER_KEY}:{CONSUMER_SECRET}".encode()).decode()
    return [
        CONSUMER_KEY,
        CONSUMER_SECRET,
        CANARY_PASSKEY,
        basic,
        stk_password(SHORTCODE, CANARY_PASSKEY, SAMPLE_TIMESTAMP),
        "CANARY",
    ]


def test_client_repr_holds_no_secret(clock: Clock) -> None:
    text = repr(canary_client(clock))

    for secret in canary_secrets():
        assert secret not in text


def _token_400(rsps: responses.RequestsMock) -> None:
    rsps.get(TOKEN_URL, status=400, body="")


def _token_refused_connection(rsps: responses.RequestsMock) -> None:
    rsps.get(TOKEN_URL, body=connection_refused())


def _push_status(status: int, **kwargs: Any) -> Callable[[responses.RequestsMock], None]:
    def setup(rsps: responses.RequestsMock) -> None:
        add_token(rsps)
        rsps.post(PUSH_URL, status=status, **kwargs)

    return setup


def _push_raises(exc: Exception) -> Callable[[responses.RequestsMock], None]:
    def setup(rsps: responses.RequestsMock) -> None:
        add_token(rsps)
        rsps.post(PUSH_URL, body=exc)

    return setup


@pytest.mark.parametrize(
    "setup",
    [
        _token_400,
        _token_refused_connection,
        _push_status(404, json=INVALID_TOKEN),
        _push_status(400, json=INVALID_AMOUNT),
        _push_status(500, json=envelope("500.001.1001", "Wrong credentials")),
        _push_status(500, json=envelope("500.001.1001", "Merchant does not exist")),
        _push_status(500, json=envelope("500.001.1001", "Unable to lock subscriber")),
        _push_status(500, json=envelope("500.003.02", "Spike arrest violation")),
        _push_status(503, json=GATEWAY_FAULT),
        _push_status(502, body=HTML_502, content_type="text/html"),
        _push_status(403, body="<html>Forbidden</html>", content_type="text/html"),
        _push_status(200, body="<html>OK</html>", content_type="text/html"),
        _push_raises(connection_refused()),
        _push_raises(requests.ReadTimeout("read timed out")),
    ],
    ids=[
        "token-400",
        "token-refused",
        "invalid-token",
        "invalid-amount",
        "wrong-credentials",
        "merchant",
        "subscriber-locked",
        "spike-arrest",
        "fault",
        "html-502",
        "html-403",
        "html-200",
        "push-refused",
        "push-read-timeout",
    ],
)
def test_no_secret_in_any_daraja_error(
    setup: Callable[[responses.RequestsMock], None], clock: Clock
) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        setup(rsps)
        with pytest.raises(DarajaError) as caught:
            push(canary_client(clock))

    error = caught.value
    shown = " | ".join([str(error), repr(error), error.hint or "", error.value or ""])
    for secret in canary_secrets():
        assert secret not in shown


# -- callbacks -------------------------------------------------------------------------------


def test_callback_success_sample_is_parsed_exactly() -> None:
    result = parse_stk_callback(CALLBACK_SUCCESS)

    assert result == StkResult(
        checkout_request_id="ws_CO_191220191020363925",
        result_code="0",
        result_desc="The service request is processed successfully.",
        merchant_request_id="29115-34620561-1",
        amount=Decimal("1.00"),
        receipt_number="NLJ7RT61SV",
        transaction_date=datetime(2019, 12, 19, 10, 21, 15, tzinfo=timezone(NAIROBI_OFFSET)),
        phone="254708374149",
    )
    assert result.paid
    assert isinstance(result.amount, Decimal)
    assert str(result.amount) == "1.00"  # parsed as a decimal, never through float


def test_callback_transaction_date_is_nairobi_wall_clock() -> None:
    date = parse_stk_callback(CALLBACK_SUCCESS).transaction_date

    assert date is not None
    assert date.utcoffset() == NAIROBI_OFFSET
    assert date.isoformat() == "2019-12-19T10:21:15+03:00"
    assert date.astimezone(UTC) == datetime(2019, 12, 19, 7, 21, 15, tzinfo=UTC)


def test_callback_items_are_found_by_name_in_any_order() -> None:
    result = parse_stk_callback(CALLBACK_SUCCESS_REORDERED)

    assert result.paid
    assert result.checkout_request_id == "ws_CO_05082025135929114669533"
    assert result.amount == Decimal(500)
    assert isinstance(result.amount, Decimal)
    assert result.receipt_number == "TH3AB7XY9K"
    assert result.transaction_date == datetime(
        2025, 8, 3, 13, 59, 29, tzinfo=timezone(NAIROBI_OFFSET)
    )
    assert result.phone == "254114669532"


def test_callback_string_result_code_is_kept_as_string() -> None:
    result = parse_stk_callback(CALLBACK_STRING_CODE)

    assert result.result_code == "SFC_IC0003"
    assert not result.paid
    assert result.checkout_request_id == "ws_CO_05082025135929114669532"
    assert result.amount is None


def test_callback_cancelled_without_metadata_has_no_payment_details() -> None:
    result = parse_stk_callback(CALLBACK_CANCELLED)

    assert result == StkResult(
        checkout_request_id="ws_CO_21072024125243250722943992",
        result_code="1032",
        result_desc="Request cancelled by user",
        merchant_request_id="f1e2-4b95-a71d-b30d3cdbb7a7942864",
    )
    assert not result.paid


def callback_with_items(items: str, *, result_code: str = "0") -> bytes:
    return (
        '{"Body": {"stkCallback": {"MerchantRequestID": "m-1", '
        '"CheckoutRequestID": "ws_CO_1", "ResultCode": ' + result_code + ", "
        '"ResultDesc": "ok", "CallbackMetadata": {"Item": ' + items + "}}}}"
    ).encode()


def callback_with_amount(value: str) -> bytes:
    return callback_with_items('[{"Name": "Amount", "Value": ' + value + "}]")


@pytest.mark.parametrize("value", ["500", "500.0", '"500.00"', "500.00", '"500"'])
def test_callback_amount_forms_all_give_a_decimal_equal_to_500(value: str) -> None:
    amount = parse_stk_callback(callback_with_amount(value)).amount

    assert isinstance(amount, Decimal)
    assert amount == Decimal(500)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe\x00{}",
        b'{"Body": {"stkCallback": \xc3\x28}}',
        CALLBACK_SUCCESS[:120],
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": NaN}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": Infinity}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": -Infinity}}}',
        callback_with_amount("NaN"),
        b"[" * 10_000 + b"]" * 10_000,
        b'{"Body": ' + b'{"a": ' * 10_000 + b"0" + b"}" * 10_000 + b"}",
        b"[" + CALLBACK_SUCCESS + b"]",
        b"[]",
        b"null",
        b'"Body"',
        b"42",
        b'{"body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": 0}}}',
        b'{"Body": {"StkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": 0}}}',
        b'{"Body": [{"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": 0}}]}',
        b'{"Body": {"stkCallback": "ws_CO_1"}}',
        b'{"Body": {"stkCallback": {"ResultCode": 0}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": 12345, "ResultCode": 0}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": null, "ResultCode": 0}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": ["ws_CO_1"], "ResultCode": 0}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "", "ResultCode": 0}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "   ", "ResultCode": 0}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "'
        + b"w" * 1000
        + b'", "ResultCode": 0}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1"}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": true}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": false}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": [0]}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": {}}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": null}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": ""}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": 0.5}}}',
    ],
    ids=[
        "empty",
        "invalid-utf8-bom",
        "invalid-utf8-inside",
        "truncated",
        "nan",
        "infinity",
        "minus-infinity",
        "nan-amount",
        "10000-deep-array",
        "10000-deep-object",
        "top-level-array-of-callback",
        "top-level-empty-array",
        "null",
        "string",
        "number",
        "body-wrong-case",
        "stkcallback-wrong-case",
        "body-is-list",
        "stkcallback-is-string",
        "no-checkout-id",
        "checkout-id-number",
        "checkout-id-null",
        "checkout-id-list",
        "checkout-id-empty",
        "checkout-id-blank",
        "checkout-id-1000-chars",
        "no-result-code",
        "result-code-true",
        "result-code-false",
        "result-code-list",
        "result-code-object",
        "result-code-null",
        "result-code-empty",
        "result-code-fraction",
    ],
)
def test_malformed_callback_is_a_callback_format_error(body: bytes) -> None:
    with pytest.raises(CallbackFormatError) as caught:
        parse_stk_callback(body)

    assert caught.value.exit_code == ExitCode.INVALID


@pytest.mark.parametrize(
    ("items", "missing"),
    [
        ('[{"Name": "MpesaReceiptNumber", "Value": {"id": "NLJ7RT61SV"}}]', "receipt_number"),
        ('[{"Name": "MpesaReceiptNumber", "Value": ""}]', "receipt_number"),
        ('[{"Name": "TransactionDate", "Value": "yesterday"}]', "transaction_date"),
        ('[{"Name": "TransactionDate", "Value": 20191319102115}]', "transaction_date"),
        ('[{"Name": "TransactionDate", "Value": 2019121910.5}]', "transaction_date"),
        (
            '[{"Name": "TransactionDate", "Value": "２０１９１２１９１０２１１５"}]',
            "transaction_date",
        ),
        ('[{"Name": "TransactionDate", "Value": "20\u0662\u06640101120000"}]', "transaction_date"),
        ('[{"Name": "TransactionDate", "Value": 20190230102115}]', "transaction_date"),
        ('[{"Name": "TransactionDate", "Value": 20191219246000}]', "transaction_date"),
        ('[{"Name": "PhoneNumber", "Value": false}]', "phone"),
        ('[{"Name": "PhoneNumber", "Value": ["254708374149"]}]', "phone"),
        ('[{"Name": 7, "Value": 500}, "Amount", null, 3]', "amount"),
    ],
)
def test_callback_metadata_item_with_wrong_type_is_ignored_not_fatal(
    items: str, missing: str
) -> None:
    result = parse_stk_callback(callback_with_items(items))

    assert result.result_code == "0"
    assert result.checkout_request_id == "ws_CO_1"
    assert getattr(result, missing) is None


def test_callback_wrong_typed_item_does_not_hide_the_good_ones() -> None:
    items = (
        '[{"Name": "Amount", "Value": 500}, {"Name": "MpesaReceiptNumber", "Value": {}}, '
        '{"Name": "PhoneNumber", "Value": 254708374149}]'
    )

    result = parse_stk_callback(callback_with_items(items))

    assert result.amount == Decimal(500)
    assert result.receipt_number is None
    assert result.phone == "254708374149"


@pytest.mark.parametrize(
    "items",
    [
        '[{"Name": "Amount", "Value": {"KES": 500}}]',
        '[{"Name": "Amount", "Value": true}]',
        '[{"Name": "Amount", "Value": [500]}]',
        '[{"Name": "Amount", "Value": null}]',
        '[{"Name": "Amount", "Value": "five hundred"}]',
        '[{"Name": "Amount", "Value": "Infinity"}]',
        '{"Name": "Amount", "Value": 500}',
        '"Amount=500"',
    ],
)
def test_paid_callback_with_an_unreadable_amount_is_refused(items: str) -> None:
    # Skipping the amount check would let any "paid" reduce a balance: refuse the body.
    with pytest.raises(CallbackFormatError):
        parse_stk_callback(callback_with_items(items))


@pytest.mark.parametrize("value", ["1e1000000", '"1e1000000"', '"-1e1000000"', "1e999999"])
def test_callback_amount_with_huge_exponent_is_refused_not_a_crash(value: str) -> None:
    # Regression: abs() on such a Decimal raised decimal.Overflow out of parse_stk_callback.
    with pytest.raises(CallbackFormatError):
        parse_stk_callback(callback_with_amount(value))


def test_callback_metadata_of_wrong_type_is_refused() -> None:
    body = (
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": 0, '
        b'"CallbackMetadata": ["Amount", 500]}}}'
    )
    with pytest.raises(CallbackFormatError):
        parse_stk_callback(body)


def test_callback_with_a_key_twice_is_refused() -> None:
    body = (
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": 1032, '
        b'"ResultCode": 0}}}'
    )
    with pytest.raises(CallbackFormatError):
        parse_stk_callback(body)
