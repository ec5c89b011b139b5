"""The Daraja emulator, exercised over real HTTP on loopback."""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from sfcrm.emulator import (
    SANDBOX_PASSKEY,
    SANDBOX_PHONE,
    SANDBOX_SHORTCODE,
    TEST_PHONES,
    DarajaEmulator,
    EmulatorSettings,
    _password,
)

NAIROBI = timezone(timedelta(hours=3))
TOKEN_PATH = "/oauth/v1/generate?grant_type=client_credentials"
PUSH_PATH = "/mpesa/stkpush/v1/processrequest"
QUERY_PATH = "/mpesa/stkpushquery/v1/query"
TIMEOUT = 5

CANCELLED_PHONE = "254700000032"
UNREACHABLE_PHONE = "254700001037"
LOCKED_PHONE = "254700000500"


# -- test doubles ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CallbackSink:
    """A callback receiver on loopback that records every body posted to it."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []  # (Content-Type, body)
        self.lock = threading.Lock()
        self.arrived = threading.Event()
        # Cleared by a test to keep the emulator's callback POST hanging.
        self.answer_allowed = threading.Event()
        self.answer_allowed.set()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length), parse_float=Decimal)
                with sink.lock:
                    sink.received.append((self.headers.get("Content-Type", ""), body))
                sink.arrived.set()
                sink.answer_allowed.wait(TIMEOUT)
                payload = b'{"ResultCode": 0, "ResultDesc": "Accepted"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/callback/s3cret"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [body for _, body in self.received]

    def wait_for(self, count: int, timeout: float = 3.0) -> list[dict[str, Any]]:
        wait_until(lambda: len(self.bodies()) >= count, timeout)
        return self.bodies()


def wait_until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def callback_sink() -> Iterator[CallbackSink]:
    sink = CallbackSink()
    sink.thread.start()
    yield sink
    sink.answer_allowed.set()
    sink.server.shutdown()
    sink.server.server_close()


@pytest.fixture
def start_emulator() -> Iterator[Callable[..., DarajaEmulator]]:
    started: list[DarajaEmulator] = []

    def start(
        settings: EmulatorSettings | None = None, clock: Callable[[], float] = time.monotonic
    ) -> DarajaEmulator:
        emulator = DarajaEmulator(settings, clock=clock).start()
        started.append(emulator)
        return emulator

    yield start
    for emulator in started:
        emulator.stop()


@pytest.fixture
def daraja(start_emulator: Callable[..., DarajaEmulator]) -> DarajaEmulator:
    return start_emulator(EmulatorSettings(callback_delay=0))


@pytest.fixture
def token(daraja: DarajaEmulator) -> str:
    return get_token(daraja)


# -- helpers -----------------------------------------------------------------------------------


def basic(key: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode()


def get_token(emulator: DarajaEmulator, key: str = "key", secret: str = "secret") -> str:
    response = requests.get(
        emulator.url + TOKEN_PATH, headers={"Authorization": basic(key, secret)}, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def nairobi_timestamp() -> str:
    return datetime.now(NAIROBI).strftime("%Y%m%d%H%M%S")


def push_body(callback_url: str = "https://example.invalid/cb", **fields: Any) -> dict[str, Any]:
    timestamp = nairobi_timestamp()
    body: dict[str, Any] = {
        "BusinessShortCode": SANDBOX_SHORTCODE,
        "Password": base64.b64encode(
            (SANDBOX_SHORTCODE + SANDBOX_PASSKEY + timestamp).encode()
        ).decode(),
        "Timestamp": timestamp,
        "TransactionType": "CustomerPayBillOnline",
        "Amount": 500,
        "PartyA": SANDBOX_PHONE,
        "PartyB": SANDBOX_SHORTCODE,
        "PhoneNumber": SANDBOX_PHONE,
        "CallBackURL": callback_url,
        "AccountReference": "SF-TICKET-12",
        "TransactionDesc": "Gate fee",
    }
    body.update(fields)
    return body


def for_phone(phone: str, callback_url: str = "https://example.invalid/cb") -> dict[str, Any]:
    return push_body(callback_url, PartyA=phone, PhoneNumber=phone)


def post(emulator: DarajaEmulator, path: str, token: str, body: Any) -> requests.Response:
    return requests.post(
        emulator.url + path,
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=TIMEOUT,
    )


def push(emulator: DarajaEmulator, token: str, body: dict[str, Any]) -> requests.Response:
    return post(emulator, PUSH_PATH, token, body)


def accepted_push(emulator: DarajaEmulator, token: str, body: dict[str, Any]) -> str:
    response = push(emulator, token, body)
    assert response.status_code == 200, response.text
    return str(response.json()["CheckoutRequestID"])


def query(
    emulator: DarajaEmulator, token: str, checkout_id: str, passkey: str = SANDBOX_PASSKEY
) -> requests.Response:
    timestamp = nairobi_timestamp()
    body = {
        "BusinessShortCode": SANDBOX_SHORTCODE,
        "Password": base64.b64encode((SANDBOX_SHORTCODE + passkey + timestamp).encode()).decode(),
        "Timestamp": timestamp,
        "CheckoutRequestID": checkout_id,
    }
    return post(emulator, QUERY_PATH, token, body)


def assert_error(response: requests.Response, status: int, code: str, message: str) -> None:
    assert response.status_code == status, response.text
    doc = response.json()
    assert doc["errorCode"] == code
    assert doc["errorMessage"] == message
    assert isinstance(doc["requestId"], str) and doc["requestId"]


def stk_callback(body: dict[str, Any]) -> dict[str, Any]:
    callback = body["Body"]["stkCallback"]
    assert isinstance(callback, dict)
    return callback


def items_by_name(callback: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["Name"]: item for item in callback["CallbackMetadata"]["Item"]}


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- token -------------------------------------------------------------------------------------


def test_token_is_issued_with_lifetime_as_string(daraja: DarajaEmulator) -> None:
    response = requests.get(
        daraja.url + TOKEN_PATH, headers={"Authorization": basic("k", "s")}, timeout=TIMEOUT
    )

    assert response.status_code == 200
    doc = response.json()
    assert doc["expires_in"] == "3599"
    assert isinstance(doc["access_token"], str) and len(doc["access_token"]) >= 20
    assert daraja.token_requests == 1


def test_new_token_invalidates_the_previous_one(daraja: DarajaEmulator) -> None:
    first = get_token(daraja)
    second = get_token(daraja)

    assert first != second
    assert_error(push(daraja, first, push_body()), 404, "404.001.03", "Invalid Access Token")
    assert push(daraja, second, push_body()).status_code == 200
    assert daraja.token_requests == 2


def test_expired_token_is_refused(start_emulator: Callable[..., DarajaEmulator]) -> None:
    clock = FakeClock()
    daraja = start_emulator(EmulatorSettings(callback_delay=0, token_lifetime=100), clock)
    token = get_token(daraja)
    clock.advance(99)
    assert push(daraja, token, push_body()).status_code == 200

    clock.advance(1)

    assert_error(push(daraja, token, push_body()), 404, "404.001.03", "Invalid Access Token")


def test_wrong_consumer_secret_gets_400_with_empty_body(
    start_emulator: Callable[..., DarajaEmulator],
) -> None:
    daraja = start_emulator(EmulatorSettings(consumer_key="key", consumer_secret="secret"))

    wrong = requests.get(
        daraja.url + TOKEN_PATH, headers={"Authorization": basic("key", "nope")}, timeout=TIMEOUT
    )

    assert wrong.status_code == 400
    assert wrong.content == b""
    assert get_token(daraja, "key", "secret")
    assert daraja.token_requests == 1


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Basic",
        "Basic !!!not-base64!!!",
        "Bearer abc",
        "Basic " + base64.b64encode(b"x").decode(),
    ],
)
def test_missing_or_malformed_basic_header_gets_400_with_empty_body(
    daraja: DarajaEmulator, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}

    response = requests.get(daraja.url + TOKEN_PATH, headers=headers, timeout=TIMEOUT)

    assert response.status_code == 400
    assert response.content == b""


def test_token_request_without_grant_type_is_refused(daraja: DarajaEmulator) -> None:
    response = requests.get(
        daraja.url + "/oauth/v1/generate",
        headers={"Authorization": basic("k", "s")},
        timeout=TIMEOUT,
    )

    assert_error(response, 400, "400.008.02", "Invalid grant type passed")


# -- push validation ---------------------------------------------------------------------------


def test_push_without_token_is_refused(daraja: DarajaEmulator) -> None:
    response = requests.post(daraja.url + PUSH_PATH, json=push_body(), timeout=TIMEOUT)

    assert_error(response, 404, "404.001.03", "Invalid Access Token")


@pytest.mark.parametrize("amount", [500.5, "500.5", 500.0, "500.00"])
def test_push_with_decimal_amount_is_refused(
    daraja: DarajaEmulator, token: str, amount: object
) -> None:
    response = push(daraja, token, push_body(Amount=amount))

    assert_error(response, 400, "400.002.02", "Bad Request - Invalid Amount")
    assert daraja.pushes == []


@pytest.mark.parametrize("amount", [0, -5, 250_001, "abc", "", True, None, "1e3"])
def test_push_with_amount_outside_1_to_250000_is_refused(
    daraja: DarajaEmulator, token: str, amount: object
) -> None:
    response = push(daraja, token, push_body(Amount=amount))

    assert_error(response, 400, "400.002.02", "Bad Request - Invalid Amount")


@pytest.mark.parametrize("amount", [1, 250_000, "750"])
def test_push_with_whole_amount_is_accepted(
    daraja: DarajaEmulator, token: str, amount: object
) -> None:
    assert push(daraja, token, push_body(Amount=amount)).status_code == 200


def test_push_with_long_account_reference_is_refused(daraja: DarajaEmulator, token: str) -> None:
    response = push(daraja, token, push_body(AccountReference="SF-TICKET-123"))

    assert_error(response, 400, "400.002.02", "Bad Request - Invalid AccountReference")


@pytest.mark.parametrize(
    "phone", ["0712345678", "+254712345678", "25471234567", "254612345678", 712345678, ""]
)
def test_push_with_bad_phone_is_refused(daraja: DarajaEmulator, token: str, phone: object) -> None:
    response = push(daraja, token, push_body(PhoneNumber=phone))

    assert_error(response, 400, "400.002.02", "Bad Request - Invalid PhoneNumber")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("BusinessShortCode", "600000"),
        ("BusinessShortCode", None),
        ("Password", ""),
        ("Timestamp", "2024-06-28 09:24"),
        ("Timestamp", "20241328092408"),
        ("TransactionType", "CustomerSendMoney"),
        ("PartyA", "0712345678"),
        ("PartyB", "600000"),
        ("CallBackURL", "ftp://example.invalid/cb"),
        ("CallBackURL", "https://example.invalid/call back"),
        ("CallBackURL", None),
        ("AccountReference", "INV#12"),
        ("AccountReference", ""),
        ("TransactionDesc", "Gate fee today"),
        ("TransactionDesc", "pay & go"),
    ],
)
def test_push_with_malformed_field_names_that_field(
    daraja: DarajaEmulator, token: str, field: str, value: object
) -> None:
    body = push_body()
    body[field] = value

    response = push(daraja, token, body)

    assert_error(response, 400, "400.002.02", f"Bad Request - Invalid {field}")


def test_push_names_only_the_first_bad_field(daraja: DarajaEmulator, token: str) -> None:
    response = push(daraja, token, push_body(Amount="x", TransactionDesc="&&&"))

    assert_error(response, 400, "400.002.02", "Bad Request - Invalid Amount")


def test_push_with_wrong_password_gets_wrong_credentials(
    daraja: DarajaEmulator, token: str
) -> None:
    body = push_body()
    body["Password"] = base64.b64encode(
        (SANDBOX_SHORTCODE + "another-passkey" + body["Timestamp"]).encode()
    ).decode()

    assert_error(push(daraja, token, body), 500, "500.001.1001", "Wrong credentials")


def test_push_with_password_of_another_timestamp_gets_wrong_credentials(
    daraja: DarajaEmulator, token: str
) -> None:
    body = push_body(Timestamp="20210628092408")

    assert_error(push(daraja, token, body), 500, "500.001.1001", "Wrong credentials")


def test_form_encoded_push_is_refused_as_invalid_shortcode(
    daraja: DarajaEmulator, token: str
) -> None:
    response = requests.post(
        daraja.url + PUSH_PATH,
        data=push_body(),
        headers={"Authorization": f"Bearer {token}"},
        timeout=TIMEOUT,
    )

    assert_error(response, 400, "400.002.02", "Bad Request - Invalid BusinessShortCode")


@pytest.mark.parametrize(
    "raw", [b"not json", b"[1, 2]", b"\xff\xfe\x00", b"[" * 100_000, b'{"Amount": 1e999999}', b""]
)
def test_garbage_push_body_is_refused_and_server_keeps_serving(
    daraja: DarajaEmulator, token: str, raw: bytes
) -> None:
    response = requests.post(
        daraja.url + PUSH_PATH,
        data=raw,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=TIMEOUT,
    )

    assert_error(response, 400, "400.002.02", "Bad Request - Invalid BusinessShortCode")
    assert push(daraja, token, push_body()).status_code == 200


def test_push_with_numbers_as_json_numbers_is_accepted(daraja: DarajaEmulator, token: str) -> None:
    # Safaricom's own sample sends shortcode, amount and phones as numbers.
    body = push_body(
        BusinessShortCode=int(SANDBOX_SHORTCODE),
        Amount=1,
        PartyA=int(SANDBOX_PHONE),
        PartyB=int(SANDBOX_SHORTCODE),
        PhoneNumber=int(SANDBOX_PHONE),
    )

    assert push(daraja, token, body).status_code == 200


def test_buy_goods_push_may_name_any_till_as_party_b(daraja: DarajaEmulator, token: str) -> None:
    body = push_body(TransactionType="CustomerBuyGoodsOnline", PartyB="5277331")

    assert push(daraja, token, body).status_code == 200


def test_push_to_locked_phone_is_refused(daraja: DarajaEmulator, token: str) -> None:
    response = push(daraja, token, for_phone(LOCKED_PHONE))

    assert_error(
        response,
        500,
        "500.001.1001",
        "Unable to lock subscriber, a transaction is already in process for the current subscriber",
    )
    assert daraja.pushes == []


# -- accepted push and callbacks ---------------------------------------------------------------


def test_accepted_push_answers_with_string_ids(daraja: DarajaEmulator, token: str) -> None:
    body = push_body()

    response = push(daraja, token, body)

    assert response.status_code == 200
    doc = response.json()
    assert set(doc) == {
        "MerchantRequestID",
        "CheckoutRequestID",
        "ResponseCode",
        "ResponseDescription",
        "CustomerMessage",
    }
    assert all(isinstance(value, str) for value in doc.values())
    assert doc["ResponseCode"] == "0"
    assert re.fullmatch(r"ws_CO_[0-9]{20,}", doc["CheckoutRequestID"])
    assert daraja.pushes == [body]


def test_paid_phone_gets_callback_with_metadata(
    daraja: DarajaEmulator, token: str, callback_sink: CallbackSink
) -> None:
    accepted = push(daraja, token, push_body(callback_sink.url, Amount=1500)).json()

    [body] = callback_sink.wait_for(1)

    assert callback_sink.received[0][0] == "application/json"
    callback = stk_callback(body)
    assert callback["MerchantRequestID"] == accepted["MerchantRequestID"]
    assert callback["CheckoutRequestID"] == accepted["CheckoutRequestID"]
    assert callback["ResultCode"] == 0
    assert callback["ResultDesc"] == TEST_PHONES[SANDBOX_PHONE][1]
    items = items_by_name(callback)
    assert set(items) == {
        "Amount",
        "MpesaReceiptNumber",
        "Balance",
        "TransactionDate",
        "PhoneNumber",
    }
    assert items["Amount"]["Value"] == 1500
    assert re.fullmatch(r"[A-Z0-9]{10}", items["MpesaReceiptNumber"]["Value"])
    assert "Value" not in items["Balance"]
    assert items["PhoneNumber"]["Value"] == int(SANDBOX_PHONE)
    paid_at = datetime.strptime(str(items["TransactionDate"]["Value"]), "%Y%m%d%H%M%S")
    nairobi_now = datetime.now(NAIROBI).replace(tzinfo=None)
    assert abs(nairobi_now - paid_at) < timedelta(minutes=1)


def test_unlisted_phone_pays(
    daraja: DarajaEmulator, token: str, callback_sink: CallbackSink
) -> None:
    accepted_push(daraja, token, for_phone("254712345678", callback_sink.url))

    [body] = callback_sink.wait_for(1)

    assert stk_callback(body)["ResultCode"] == 0
    assert items_by_name(stk_callback(body))["PhoneNumber"]["Value"] == 254712345678


@pytest.mark.parametrize(
    "phone",
    [phone for phone, (code, _) in TEST_PHONES.items() if code not in (None, 0, 1037)],
)
def test_failing_phone_gets_callback_without_metadata(
    daraja: DarajaEmulator, token: str, callback_sink: CallbackSink, phone: str
) -> None:
    accepted_push(daraja, token, for_phone(phone, callback_sink.url))

    [body] = callback_sink.wait_for(1)

    callback = stk_callback(body)
    assert (callback["ResultCode"], callback["ResultDesc"]) == TEST_PHONES[phone]
    assert "CallbackMetadata" not in callback


def test_cancelled_phone_gets_1032_callback(
    daraja: DarajaEmulator, token: str, callback_sink: CallbackSink
) -> None:
    accepted_push(daraja, token, for_phone(CANCELLED_PHONE, callback_sink.url))

    [body] = callback_sink.wait_for(1)

    assert stk_callback(body)["ResultCode"] == 1032
    wait_until(lambda: daraja.callbacks_sent == [body])


def test_callbacks_can_be_withheld_and_query_still_settles(
    start_emulator: Callable[..., DarajaEmulator], callback_sink: CallbackSink
) -> None:
    daraja = start_emulator(EmulatorSettings(callback_delay=0, send_callbacks=False))
    token = get_token(daraja)
    checkout_id = accepted_push(daraja, token, push_body(callback_sink.url))

    wait_until(lambda: query(daraja, token, checkout_id).status_code == 200)

    assert query(daraja, token, checkout_id).json()["ResultCode"] == "0"
    assert daraja.callbacks_sent == []
    assert callback_sink.bodies() == []


def test_undeliverable_callback_is_dropped_and_server_keeps_serving(
    daraja: DarajaEmulator, token: str
) -> None:
    dead_url = f"http://127.0.0.1:{closed_port()}/callback"
    checkout_id = accepted_push(daraja, token, push_body(dead_url))

    wait_until(lambda: len(daraja.callbacks_sent) == 1)

    response = query(daraja, token, checkout_id)
    assert response.status_code == 200
    assert response.json()["ResultCode"] == "0"


def test_server_answers_while_a_callback_is_in_flight(
    daraja: DarajaEmulator, token: str, callback_sink: CallbackSink
) -> None:
    callback_sink.answer_allowed.clear()
    accepted_push(daraja, token, push_body(callback_sink.url))
    assert callback_sink.arrived.wait(TIMEOUT)

    assert get_token(daraja)
    assert daraja.callbacks_sent == []  # the POST is still waiting for its answer

    callback_sink.answer_allowed.set()
    wait_until(lambda: len(daraja.callbacks_sent) == 1)


# -- query -------------------------------------------------------------------------------------


def test_query_says_being_processed_until_the_callback_then_gives_result(
    start_emulator: Callable[..., DarajaEmulator], callback_sink: CallbackSink
) -> None:
    daraja = start_emulator(EmulatorSettings(callback_delay=0.3))
    token = get_token(daraja)
    accepted = push(daraja, token, push_body(callback_sink.url)).json()
    checkout_id = accepted["CheckoutRequestID"]

    pending = query(daraja, token, checkout_id)
    assert_error(pending, 500, "500.001.1001", "The transaction is being processed")

    callback_sink.wait_for(1)
    final = query(daraja, token, checkout_id)
    assert final.status_code == 200
    assert final.json() == {
        "ResponseCode": "0",
        "ResponseDescription": "The service request has been accepted successsfully",
        "MerchantRequestID": accepted["MerchantRequestID"],
        "CheckoutRequestID": checkout_id,
        "ResultCode": "0",
        "ResultDesc": "The service request is processed successfully.",
    }


def test_query_reports_cancellation_as_string_code(
    daraja: DarajaEmulator, token: str, callback_sink: CallbackSink
) -> None:
    checkout_id = accepted_push(daraja, token, for_phone(CANCELLED_PHONE, callback_sink.url))
    callback_sink.wait_for(1)

    doc = query(daraja, token, checkout_id).json()

    assert (doc["ResultCode"], doc["ResultDesc"]) == ("1032", "Request cancelled by user")


def test_pending_query_can_answer_4999(start_emulator: Callable[..., DarajaEmulator]) -> None:
    daraja = start_emulator(EmulatorSettings(callback_delay=5, pending_as_4999=True))
    token = get_token(daraja)
    checkout_id = accepted_push(daraja, token, push_body())

    response = query(daraja, token, checkout_id)

    assert response.status_code == 200
    doc = response.json()
    assert (doc["ResponseCode"], doc["ResultCode"]) == ("0", "4999")
    assert doc["CheckoutRequestID"] == checkout_id


def test_query_for_unknown_checkout_id_is_refused(daraja: DarajaEmulator, token: str) -> None:
    response = query(daraja, token, "ws_CO_000000000000000000")

    assert_error(response, 400, "400.002.02", "Bad Request - Invalid CheckoutRequestID")


def test_query_with_wrong_password_gets_wrong_credentials(
    daraja: DarajaEmulator, token: str
) -> None:
    checkout_id = accepted_push(daraja, token, push_body())

    response = query(daraja, token, checkout_id, passkey="another-passkey")

    assert_error(response, 500, "500.001.1001", "Wrong credentials")


def test_query_without_token_is_refused(daraja: DarajaEmulator, token: str) -> None:
    checkout_id = accepted_push(daraja, token, push_body())

    response = query(daraja, "not-a-token", checkout_id)

    assert_error(response, 404, "404.001.03", "Invalid Access Token")


def test_unreachable_phone_sends_no_callback_and_query_answers_1037_after_prompt(
    start_emulator: Callable[..., DarajaEmulator], callback_sink: CallbackSink
) -> None:
    clock = FakeClock()
    daraja = start_emulator(EmulatorSettings(callback_delay=0, prompt_seconds=60), clock)
    token = get_token(daraja)
    checkout_id = accepted_push(daraja, token, for_phone(UNREACHABLE_PHONE, callback_sink.url))

    clock.advance(59.9)
    pending = query(daraja, token, checkout_id)
    assert_error(pending, 500, "500.001.1001", "The transaction is being processed")

    clock.advance(0.1)
    doc = query(daraja, token, checkout_id).json()
    assert (doc["ResultCode"], doc["ResultDesc"]) == ("1037", "DS timeout user cannot be reached")

    # A later paid push's callback arrives alone: none was ever scheduled for the first.
    accepted_push(daraja, token, push_body(callback_sink.url))
    [body] = callback_sink.wait_for(1)
    assert stk_callback(body)["ResultCode"] == 0
    wait_until(lambda: len(daraja.callbacks_sent) == 1)


# -- robustness and lifecycle ------------------------------------------------------------------


def test_unknown_path_gets_404_envelope(daraja: DarajaEmulator) -> None:
    response = requests.get(daraja.url + "/mpesa/b2c/v1/paymentrequest", timeout=TIMEOUT)

    assert_error(response, 404, "404.001.01", "Resource not found")


def test_wrong_method_on_known_path_gets_404_envelope(daraja: DarajaEmulator) -> None:
    response = requests.get(daraja.url + PUSH_PATH, timeout=TIMEOUT)

    assert_error(response, 404, "404.001.01", "Resource not found")


def test_handler_exception_becomes_500_envelope(
    daraja: DarajaEmulator, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(daraja, "_push", explode)

    response = push(daraja, token, push_body())

    assert_error(response, 500, "500.003.1001", "Internal Server Error")
    assert get_token(daraja)


def test_unreadable_content_length_is_refused(daraja: DarajaEmulator) -> None:
    host, port = daraja.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as conn:
        conn.sendall(
            f"POST {PUSH_PATH} HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".encode()
        )
        answer = conn.recv(4096)

    assert answer.startswith(b"HTTP/1.0 400")
    assert get_token(daraja)


def test_stop_is_idempotent_and_closes_the_port() -> None:
    with DarajaEmulator(EmulatorSettings(callback_delay=0)) as daraja:
        assert get_token(daraja)
    daraja.stop()

    with pytest.raises(requests.ConnectionError):
        requests.get(daraja.url + TOKEN_PATH, timeout=TIMEOUT)
    with pytest.raises(RuntimeError):
        daraja.start()


def test_stop_without_start_closes_the_socket() -> None:
    daraja = DarajaEmulator()

    daraja.stop()

    with pytest.raises(requests.ConnectionError):
        requests.get(daraja.url + TOKEN_PATH, timeout=TIMEOUT)


def test_serve_forever_returns_when_stopped_from_another_thread() -> None:
    daraja = DarajaEmulator()
    server = threading.Thread(target=daraja.serve_forever, daemon=True)
    server.start()
    wait_until(lambda: _answers(daraja))

    daraja.stop()

    server.join(timeout=3)
    assert not server.is_alive()


def _answers(daraja: DarajaEmulator) -> bool:
    try:
        get_token(daraja)
    except requests.ConnectionError:
        return False
    return True


def test_password_helper_matches_safaricom_sample() -> None:
    assert _password(SANDBOX_SHORTCODE, SANDBOX_PASSKEY, "20210628092408") == (
        "MTc0Mzc5YmZiMjc5ZjlhYTliZGJjZjE1OGU5N2RkNzFhNDY3Y2QyZTBjODkzMDU5YjEwZjc4ZTZiNzJh"
        "ZGExZWQyYzkxOTIwMjEwNjI4MDkyNDA4"
    )


def test_settings_repr_hides_secrets() -> None:
    settings = EmulatorSettings(consumer_key="ck", consumer_secret="very-secret")

    assert SANDBOX_PASSKEY not in repr(settings)
    assert "very-secret" not in repr(settings)


def test_test_phone_table_covers_the_documented_outcomes() -> None:
    assert TEST_PHONES[SANDBOX_PHONE][0] == 0
    assert {code for code, _ in TEST_PHONES.values()} == {0, 1032, 1, 2001, 1037, None}
