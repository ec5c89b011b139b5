"""A local stand-in for Safaricom's Daraja API: OAuth token, STK Push and STK Push Query.

The emulator is an HTTP server on this machine that answers the way Daraja does (status
codes, error envelopes, string-typed fields, a callback of the real shape), so office staff
can train, demos can run and end-to-end tests can pass without Safaricom access. It never
talks to the internet: the only outgoing requests are the callbacks, POSTed to the
CallBackURL each push names.

Endpoints: ``GET /oauth/v1/generate?grant_type=client_credentials``,
``POST /mpesa/stkpush/v1/processrequest`` and ``POST /mpesa/stkpushquery/v1/query``.
Any other path answers 404 with a JSON error envelope.

Test phones
-----------
The PhoneNumber of a push decides what the "customer" does:

| PhoneNumber           | the customer…        | ResultCode | callback      | STK Push Query       |
|-----------------------|----------------------|------------|---------------|----------------------|
| 254708374149 sandbox  | pays                 | 0          | with metadata | pending, then 0      |
| any number not listed | pays                 | 0          | with metadata | pending, then 0      |
| 254700000032          | cancels the prompt   | 1032       | no metadata   | pending, then 1032   |
| 254700000001          | has too little money | 1          | no metadata   | pending, then 1      |
| 254700002001          | types a wrong PIN    | 2001       | no metadata   | pending, then 2001   |
| 254700001037          | never answers        | 1037       | none, ever    | pending *, then 1037 |
| 254700000500          | has a prompt open    | –          | none          | push refused **      |

"pending" is HTTP 500 500.001.1001 "The transaction is being processed" (or, with
``pending_as_4999``, HTTP 200 with ResultCode "4999"); it lasts until the callback is sent,
``callback_delay`` after the push; * for 254700001037 it lasts ``prompt_seconds`` after the
push, and no callback is ever sent. The metadata of a paid callback holds Amount,
MpesaReceiptNumber, Balance (no Value), TransactionDate and PhoneNumber. ** A push to
254700000500 gets no CheckoutRequestID: it is answered HTTP 500, 500.001.1001 "Unable to lock
subscriber, a transaction is already in process for the current subscriber".

``TEST_PHONES`` holds the same table as data: phone -> (ResultCode, ResultDesc). A code of
``None`` means the push itself is refused and the text is its errorMessage; the code 1037
means no callback is ever sent.

Timing
------
``callback_delay`` is real time (a thread waits it out). Token lifetime and
``prompt_seconds`` are measured with the injected ``clock``, so tests can jump over them.
An outcome becomes visible to the query at the moment its callback is sent (or would have
been sent, with ``send_callbacks=False``). With ``callback_delay=0`` the callback can reach
the receiver before the push's own HTTP answer does, which also happens with the real Daraja.

A callback that cannot be delivered (connection refused, error status, no answer within five
seconds) is logged and dropped, never retried, as Daraja does. Callbacks still waiting when
the emulator stops are dropped.

Example::

    with DarajaEmulator(EmulatorSettings(callback_delay=0)) as daraja:
        client = DarajaClient(daraja.url, ...)
"""

from __future__ import annotations

import base64
import binascii
import copy
import hmac
import http.client
import json
import logging
import re
import secrets
import string
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import TCPServer
from types import TracebackType
from typing import IO, Any, Final, Self, cast
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "NO_CALLBACK_CODE",
    "PAID_DESC",
    "SANDBOX_PASSKEY",
    "SANDBOX_PHONE",
    "SANDBOX_SHORTCODE",
    "TEST_PHONES",
    "DarajaEmulator",
    "EmulatorSettings",
]

logger = logging.getLogger("sfcrm.emulator")

SANDBOX_SHORTCODE: Final = "174379"
SANDBOX_PASSKEY: Final = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
SANDBOX_PHONE: Final = "254708374149"

PAID_DESC: Final = "The service request is processed successfully."
NO_CALLBACK_CODE: Final = 1037

TEST_PHONES: Final[dict[str, tuple[int | None, str]]] = {
    SANDBOX_PHONE: (0, PAID_DESC),
    "254700000032": (1032, "Request cancelled by user"),
    "254700000001": (1, "The balance is insufficient for the transaction"),
    "254700002001": (2001, "The initiator information is invalid"),
    "254700001037": (NO_CALLBACK_CODE, "DS timeout user cannot be reached"),
    "254700000500": (
        None,
        "Unable to lock subscriber, a transaction is already in process for the current subscriber",
    ),
}

_TOKEN_PATH: Final = "/oauth/v1/generate"
_PUSH_PATH: Final = "/mpesa/stkpush/v1/processrequest"
_QUERY_PATH: Final = "/mpesa/stkpushquery/v1/query"

_NAIROBI: Final = timezone(timedelta(hours=3), "EAT")
_MAX_BODY: Final = 1024 * 1024
_CALLBACK_TIMEOUT: Final = 5.0
# How quickly serve_forever notices stop(); short so tests don't wait on teardown.
_POLL_INTERVAL: Final = 0.05
_ACCEPTED: Final = "Success. Request accepted for processing"
_QUERY_ACCEPTED: Final = "The service request has been accepted successsfully"  # sic, as Daraja
_PAYBILL: Final = "CustomerPayBillOnline"
_BUY_GOODS: Final = "CustomerBuyGoodsOnline"

_DIGITS = re.compile(r"[0-9]+")
_TIMESTAMP = re.compile(r"[0-9]{14}")
_PHONE = re.compile(r"254[71][0-9]{8}")
_LABEL = re.compile(r"[A-Za-z0-9 ._-]+")
_ALNUM: Final = string.ascii_uppercase + string.digits


@dataclass
class EmulatorSettings:
    """How the emulated Daraja behaves. The defaults are Safaricom's sandbox credentials."""

    shortcode: str = SANDBOX_SHORTCODE
    passkey: str = SANDBOX_PASSKEY
    consumer_key: str | None = None  # None: any key/secret gets a token
    consumer_secret: str | None = None
    token_lifetime: int = 3599
    callback_delay: float = 1.0
    prompt_seconds: float = 60.0
    send_callbacks: bool = True
    pending_as_4999: bool = False  # answer a pending query with 200/"4999" instead of 500

    def __post_init__(self) -> None:
        if self.token_lifetime <= 0:
            raise ValueError("token_lifetime must be positive")
        if self.callback_delay < 0 or self.prompt_seconds < 0:
            raise ValueError("callback_delay and prompt_seconds cannot be negative")

    def __repr__(self) -> str:
        # The passkey and consumer secret must not end up in logs or tracebacks.
        return (
            f"EmulatorSettings(shortcode={self.shortcode!r}, token_lifetime={self.token_lifetime}, "
            f"callback_delay={self.callback_delay}, prompt_seconds={self.prompt_seconds}, "
            f"send_callbacks={self.send_callbacks}, pending_as_4999={self.pending_as_4999})"
        )


@dataclass(frozen=True)
class _Reply:
    status: int
    body: dict[str, object] | None  # None: an empty body, as Daraja's credential refusal
    reason: str | None = None


@dataclass(frozen=True)
class _Token:
    value: str
    expires_at: float


@dataclass(frozen=True)
class _PushRequest:
    password: str
    timestamp: str
    amount: int
    phone: str
    callback_url: str


@dataclass
class _Push:
    merchant_request_id: str
    checkout_request_id: str
    amount: int
    phone: str
    callback_url: str
    result_code: int
    result_desc: str
    accepted_at: float
    settled: bool = False


class DarajaEmulator:
    """An emulated Daraja on ``host:port`` (port 0 picks a free one).

    The socket is bound at construction, so ``url`` is known before serving starts. Use it as
    a context manager (``with DarajaEmulator() as daraja:``), or ``start()`` / ``stop()``, or
    ``serve_forever()`` in the foreground. An emulator serves once: after ``stop()`` make a
    new one.
    """

    def __init__(
        self,
        settings: EmulatorSettings | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings if settings is not None else EmulatorSettings()
        self._clock = clock
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._token: _Token | None = None
        self._token_requests = 0
        self._pushes: list[dict[str, object]] = []
        self._callbacks_sent: list[dict[str, object]] = []
        self._by_checkout_id: dict[str, _Push] = {}
        self._callback_threads: list[threading.Thread] = []
        self._serve_thread: threading.Thread | None = None
        self._serving = False
        self._stopped = False
        self._server = _Server((host, port), self)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self._server.server_name}:{self._server.server_port}"

    @property
    def settings(self) -> EmulatorSettings:
        return self._settings

    def start(self) -> Self:
        """Serve from a daemon thread and return at once."""
        with self._lock:
            self._claim_serving()
            thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": _POLL_INTERVAL},
                name="daraja-emulator",
                daemon=True,
            )
            self._serve_thread = thread
            thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until ``stop()`` is called elsewhere or an exception
        (Ctrl-C's KeyboardInterrupt) arrives; either way the emulator is stopped on return."""
        with self._lock:
            self._claim_serving()
        try:
            self._server.serve_forever(poll_interval=_POLL_INTERVAL)
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop serving, drop callbacks not yet sent, wait for threads, close the socket."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._stopping.set()
            serving = self._serving
            callback_threads = list(self._callback_threads)
        # shutdown() waits for a serve loop; without one it would wait forever.
        if serving:
            self._server.shutdown()
        if self._serve_thread is not None:
            self._serve_thread.join()
        for thread in callback_threads:
            if thread is not threading.current_thread():
                thread.join(timeout=_CALLBACK_TIMEOUT + 1)
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _claim_serving(self) -> None:
        # Caller holds the lock, so stop() sees either "never served" or "serving".
        if self._stopped:
            raise RuntimeError("this emulator was stopped; create a new one")
        if self._serving:
            raise RuntimeError("this emulator is already serving")
        self._serving = True

    # -- observability -----------------------------------------------------------------------

    @property
    def token_requests(self) -> int:
        """How many tokens were issued."""
        with self._lock:
            return self._token_requests

    @property
    def pushes(self) -> list[dict[str, object]]:
        """Every accepted push body, in order (a copy)."""
        with self._lock:
            return copy.deepcopy(self._pushes)

    @property
    def callbacks_sent(self) -> list[dict[str, object]]:
        """Every callback body POSTed, appended once its delivery attempt finished, whether
        the receiver took it or not (a copy)."""
        with self._lock:
            return copy.deepcopy(self._callbacks_sent)

    # -- protocol ----------------------------------------------------------------------------

    def _answer(
        self,
        method: str,
        target: str,
        authorization: str | None,
        content_type: str | None,
        body: bytes,
    ) -> _Reply:
        path, _, query = target.partition("?")
        if method == "GET" and path == _TOKEN_PATH:
            return self._issue_token(query, authorization)
        if method == "POST" and path == _PUSH_PATH:
            return self._push(authorization, content_type, body)
        if method == "POST" and path == _QUERY_PATH:
            return self._query(authorization, content_type, body)
        return _error(404, "404.001.01", "Resource not found")

    def _issue_token(self, query: str, authorization: str | None) -> _Reply:
        credentials = _basic_credentials(authorization)
        if credentials is None or not self._credentials_match(*credentials):
            return _Reply(400, None, "Bad Request: Invalid Credentials")
        if parse_qs(query).get("grant_type") != ["client_credentials"]:
            return _error(400, "400.008.02", "Invalid grant type passed")
        token = _Token(
            value="".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(28)),
            expires_at=self._clock() + self._settings.token_lifetime,
        )
        with self._lock:
            # Daraja keeps one live token per app: a new one kills the old.
            self._token = token
            self._token_requests += 1
        return _Reply(
            200, {"access_token": token.value, "expires_in": str(self._settings.token_lifetime)}
        )

    def _credentials_match(self, key: str, secret: str) -> bool:
        wanted = self._settings
        key_ok = wanted.consumer_key is None or _same(key, wanted.consumer_key)
        secret_ok = wanted.consumer_secret is None or _same(secret, wanted.consumer_secret)
        return key_ok and secret_ok

    def _token_valid(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, presented = authorization.strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            return False
        with self._lock:
            current = self._token
        return (
            current is not None
            and _same(presented, current.value)
            and self._clock() < current.expires_at
        )

    def _push(self, authorization: str | None, content_type: str | None, raw: bytes) -> _Reply:
        if not self._token_valid(authorization):
            return _invalid_token()
        body = _json_object(content_type, raw)
        if body is None:
            # Form encoding and garbage both fail on the first field Daraja reads.
            return _invalid("BusinessShortCode")
        request = self._parse_push(body)
        if isinstance(request, str):
            return _invalid(request)
        if not self._password_ok(request.password, request.timestamp):
            return _error(500, "500.001.1001", "Wrong credentials")
        result_code, result_desc = TEST_PHONES.get(request.phone, (0, PAID_DESC))
        if result_code is None:
            return _error(500, "500.001.1001", result_desc)

        now = _nairobi_now()
        push = _Push(
            merchant_request_id=_request_id(),
            checkout_request_id="",
            amount=request.amount,
            phone=request.phone,
            callback_url=request.callback_url,
            result_code=result_code,
            result_desc=result_desc,
            accepted_at=self._clock(),
        )
        with self._lock:
            push.checkout_request_id = _unused_checkout_id(now, self._by_checkout_id)
            self._by_checkout_id[push.checkout_request_id] = push
            self._pushes.append(copy.deepcopy(body))
            if result_code != NO_CALLBACK_CODE:
                self._schedule_callback(push)
        logger.info(
            "push %s accepted (KES %d), outcome %s",
            push.checkout_request_id,
            push.amount,
            result_code,
        )
        return _Reply(
            200,
            {
                "MerchantRequestID": push.merchant_request_id,
                "CheckoutRequestID": push.checkout_request_id,
                "ResponseCode": "0",
                "ResponseDescription": _ACCEPTED,
                "CustomerMessage": _ACCEPTED,
            },
        )

    def _parse_push(self, body: dict[str, Any]) -> _PushRequest | str:
        """The validated push, or the name of the first field Daraja would call invalid."""
        shortcode = self._settings.shortcode
        if _digits(body.get("BusinessShortCode")) != shortcode:
            return "BusinessShortCode"
        password = body.get("Password")
        if not isinstance(password, str) or not password:
            return "Password"
        timestamp = _timestamp(body.get("Timestamp"))
        if timestamp is None:
            return "Timestamp"
        transaction_type = body.get("TransactionType")
        if transaction_type not in (_PAYBILL, _BUY_GOODS):
            return "TransactionType"
        amount = _whole_amount(body.get("Amount"))
        if amount is None:
            return "Amount"
        if _phone(body.get("PartyA")) is None:
            return "PartyA"
        party_b = _digits(body.get("PartyB"))
        if party_b is None or (transaction_type == _PAYBILL and party_b != shortcode):
            return "PartyB"
        phone = _phone(body.get("PhoneNumber"))
        if phone is None:
            return "PhoneNumber"
        callback_url = body.get("CallBackURL")
        if not _callback_url_ok(callback_url):
            return "CallBackURL"
        if not _label_ok(body.get("AccountReference"), 12):
            return "AccountReference"
        if not _label_ok(body.get("TransactionDesc"), 13):
            return "TransactionDesc"
        return _PushRequest(password, timestamp, amount, phone, cast(str, callback_url))

    def _password_ok(self, password: str, timestamp: str) -> bool:
        expected = _password(self._settings.shortcode, self._settings.passkey, timestamp)
        return _same(password, expected)

    def _query(self, authorization: str | None, content_type: str | None, raw: bytes) -> _Reply:
        if not self._token_valid(authorization):
            return _invalid_token()
        body = _json_object(content_type, raw)
        if body is None or _digits(body.get("BusinessShortCode")) != self._settings.shortcode:
            return _invalid("BusinessShortCode")
        password = body.get("Password")
        if not isinstance(password, str) or not password:
            return _invalid("Password")
        timestamp = _timestamp(body.get("Timestamp"))
        if timestamp is None:
            return _invalid("Timestamp")
        checkout_id = body.get("CheckoutRequestID")
        with self._lock:
            push = self._by_checkout_id.get(checkout_id) if isinstance(checkout_id, str) else None
            settled = push is not None and self._settled(push)
        if push is None:
            return _invalid("CheckoutRequestID")
        if not self._password_ok(password, timestamp):
            return _error(500, "500.001.1001", "Wrong credentials")
        if settled:
            return self._query_answer(push, str(push.result_code), push.result_desc)
        if self._settings.pending_as_4999:
            return self._query_answer(push, "4999", "The transaction is still under processing")
        return _error(
            500,
            "500.001.1001",
            "The transaction is being processed",
            request_id=push.checkout_request_id,
        )

    def _settled(self, push: _Push) -> bool:
        # Caller holds the lock.
        if push.result_code == NO_CALLBACK_CODE:
            return self._clock() - push.accepted_at >= self._settings.prompt_seconds
        return push.settled

    @staticmethod
    def _query_answer(push: _Push, result_code: str, result_desc: str) -> _Reply:
        return _Reply(
            200,
            {
                "ResponseCode": "0",
                "ResponseDescription": _QUERY_ACCEPTED,
                "MerchantRequestID": push.merchant_request_id,
                "CheckoutRequestID": push.checkout_request_id,
                "ResultCode": result_code,
                "ResultDesc": result_desc,
            },
        )

    # -- callbacks ---------------------------------------------------------------------------

    def _schedule_callback(self, push: _Push) -> None:
        # Caller holds the lock; checking _stopping under it means stop() joins every thread
        # that was ever started, and never one that has not started yet.
        if self._stopping.is_set():
            return
        self._callback_threads = [t for t in self._callback_threads if t.is_alive()]
        thread = threading.Thread(
            target=self._finish_push,
            args=(push,),
            name=f"daraja-callback-{push.checkout_request_id}",
            daemon=True,
        )
        self._callback_threads.append(thread)
        thread.start()

    def _finish_push(self, push: _Push) -> None:
        try:
            if self._stopping.wait(self._settings.callback_delay):
                return
            body = _callback_body(push, _nairobi_now())
            with self._lock:
                push.settled = True
            if not self._settings.send_callbacks:
                logger.info(
                    "callback for %s withheld (send_callbacks=False)", push.checkout_request_id
                )
                return
            _post_callback(push.callback_url, body, push.checkout_request_id)
            with self._lock:
                self._callbacks_sent.append(body)
        except Exception:
            logger.exception("callback thread for %s failed", push.checkout_request_id)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], emulator: DarajaEmulator) -> None:
        self.emulator = emulator
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind does a reverse DNS lookup (getfqdn), which can stall on a
        # machine without network; the emulator never needs the name.
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("error while serving %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    server_version = "sfcrm-daraja-emulator"
    sys_version = ""
    # A client that stalls mid-request must not pin a thread forever.
    timeout = 10

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)

    def _dispatch(self) -> None:
        emulator = cast(_Server, self.server).emulator
        try:
            body = self._read_body()
            if body is None:
                reply = _invalid("BusinessShortCode")
            else:
                reply = emulator._answer(
                    self.command,
                    self.path,
                    self.headers.get("Authorization"),
                    self.headers.get("Content-Type"),
                    body,
                )
        except Exception:
            logger.exception("emulator failed on %s %s", self.command, _redact(self.path))
            reply = _error(500, "500.003.1001", "Internal Server Error")
        self._send(reply)

    def _read_body(self) -> bytes | None:
        """The request body, or None when its length is missing-but-needed, bad or huge."""
        declared = self.headers.get("Content-Length")
        if declared is None:
            return b""
        try:
            length = int(declared)
        except ValueError:
            return None
        if length < 0 or length > _MAX_BODY:
            return None
        return self.rfile.read(length)

    def _send(self, reply: _Reply) -> None:
        payload = b"" if reply.body is None else json.dumps(reply.body).encode()
        try:
            self.send_response(reply.status, reply.reason)
            if reply.body is not None:
                self.send_header("Content-Type", "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
        except OSError as exc:
            logger.debug("client went away before the answer was sent: %s", exc)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    # Daraja posts once to the URL it was given; following a redirect would hide a bad URL.
    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


def _post_callback(url: str, body: dict[str, object], checkout_id: str) -> None:
    request = urllib.request.Request(  # noqa: S310 - the push validation allowed only http(s)
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    # No proxies: a proxy from the environment would send loopback callbacks off the machine.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())
    try:
        with opener.open(request, timeout=_CALLBACK_TIMEOUT) as response:
            response.read()
            logger.info("callback for %s delivered: HTTP %s", checkout_id, response.status)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        logger.warning(
            "callback for %s to %s failed and is dropped: %s", checkout_id, _redact(url), exc
        )


def _callback_body(push: _Push, now: datetime) -> dict[str, object]:
    callback: dict[str, object] = {
        "MerchantRequestID": push.merchant_request_id,
        "CheckoutRequestID": push.checkout_request_id,
        "ResultCode": push.result_code,
        "ResultDesc": push.result_desc,
    }
    if push.result_code == 0:
        callback["CallbackMetadata"] = {
            "Item": [
                # A float, like Daraja's 1.00, so receivers must parse amounts as decimals.
                {"Name": "Amount", "Value": float(push.amount)},
                {"Name": "MpesaReceiptNumber", "Value": _receipt_number()},
                {"Name": "Balance"},
                {"Name": "TransactionDate", "Value": int(now.strftime("%Y%m%d%H%M%S"))},
                {"Name": "PhoneNumber", "Value": int(push.phone)},
            ]
        }
    return {"Body": {"stkCallback": callback}}


# -- small helpers -----------------------------------------------------------------------------


def _password(shortcode: str, passkey: str, timestamp: str) -> str:
    return base64.b64encode(f"{shortcode}{passkey}{timestamp}".encode()).decode("ascii")


def _same(presented: str, expected: str) -> bool:
    # compare_digest refuses non-ASCII str; bytes keep it constant-time for any input.
    return hmac.compare_digest(presented.encode("utf-8", "replace"), expected.encode("utf-8"))


def _basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    key, colon, secret = decoded.partition(":")
    if not colon or not key:
        return None
    return key, secret


def _json_object(content_type: str | None, raw: bytes) -> dict[str, Any] | None:
    if content_type is None or content_type.split(";")[0].strip().lower() != "application/json":
        return None
    try:
        doc = json.loads(raw, parse_float=Decimal)
    except (ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def _digits(value: object) -> str | None:
    """A run of ASCII digits given as a string or a non-negative int (Safaricom's own samples
    send shortcodes and phones as JSON numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value) if value >= 0 else None
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return value
    return None


def _phone(value: object) -> str | None:
    digits = _digits(value)
    return digits if digits is not None and _PHONE.fullmatch(digits) else None


def _whole_amount(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        amount = value
    elif isinstance(value, str) and _DIGITS.fullmatch(value) and len(value) <= 7:
        amount = int(value)
    else:
        return None
    return amount if 1 <= amount <= 250_000 else None


def _timestamp(value: object) -> str | None:
    if not isinstance(value, str) or not _TIMESTAMP.fullmatch(value):
        return None
    try:
        datetime.strptime(value, "%Y%m%d%H%M%S")
    except ValueError:
        return None
    return value


def _callback_url_ok(value: object) -> bool:
    if not isinstance(value, str) or any(ch.isspace() for ch in value):
        return False
    for scheme in ("http://", "https://"):
        if value.startswith(scheme) and len(value) > len(scheme):
            return True
    return False


def _label_ok(value: object, limit: int) -> bool:
    return isinstance(value, str) and len(value) <= limit and bool(_LABEL.fullmatch(value))


def _redact(url: str) -> str:
    """Scheme and host only: callback paths carry the listener's secret."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if not parts.scheme:
        return parts.path.split("?")[0][:60]
    return f"{parts.scheme}://{parts.netloc}/..."


def _error(status: int, code: str, message: str, *, request_id: str | None = None) -> _Reply:
    return _Reply(
        status,
        {"requestId": request_id or _request_id(), "errorCode": code, "errorMessage": message},
    )


def _invalid(field: str) -> _Reply:
    return _error(400, "400.002.02", f"Bad Request - Invalid {field}")


def _invalid_token() -> _Reply:
    return _error(404, "404.001.03", "Invalid Access Token")


def _request_id() -> str:
    hex_ = uuid.uuid4().hex
    return f"{hex_[:4]}-{hex_[4:8]}-{hex_[8:12]}-{hex_[12:24]}{secrets.randbelow(10**7)}"


def _unused_checkout_id(now: datetime, taken: dict[str, _Push]) -> str:
    stamp = now.strftime("%d%m%Y%H%M%S") + f"{now.microsecond // 1000:03d}"
    while True:
        candidate = f"ws_CO_{stamp}{secrets.randbelow(10**9):09d}"
        if candidate not in taken:
            return candidate


def _receipt_number() -> str:
    return secrets.choice(string.ascii_uppercase) + "".join(
        secrets.choice(_ALNUM) for _ in range(9)
    )


def _nairobi_now() -> datetime:
    return datetime.now(_NAIROBI)
