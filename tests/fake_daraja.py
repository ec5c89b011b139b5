"""A fake Daraja of the tests' own, over real HTTP on 127.0.0.1, with switches for faults.

Unlike :mod:`sfcrm.emulator` (which sfcrm ships for demos), this one exists to be cruel and to
count: every switch is set from the test, every request is counted, and every push body is kept
so a test can prove how many prompts would have reached a phone.

Switches (all thread-safe; set them with :meth:`FakeDaraja.configure` or the helpers):

- ``token_lifetime``: seconds a token lives; an older one is answered ``404.001.03``. Each new
  token also kills the previous one, as on the real Daraja.
- ``token_latency``: seconds before a token request is answered (a slow gateway), so that
  processes starting together all need the token at once.
- ``push_latency``: seconds before a push is answered. Longer than the client's timeout, the
  push is still accepted (the prompt "reaches the phone") and its callback still posted.
- ``callback`` / ``callback_delay``: the outcome posted to the push's CallBackURL
  (``"paid"``, ``"cancelled"``, ``"failed"`` or None for no callback), that many seconds after
  the push's answer. :meth:`hold_callbacks` keeps them back until :meth:`release_callbacks`.
  ``callback_before_answer``: count the delay from the push's arrival instead, so that with a
  slow ``push_latency`` the callback beats the push's own answer (as on the real Daraja).
- :meth:`fail`: the next N requests of a kind answered 5xx, with Daraja's envelope or an HTML
  gateway page.
- :meth:`force_invalid_token`: the next N pushes/queries answered ``404.001.03`` whatever the
  token.
- :meth:`stop` / :meth:`start`: the port refuses connections, then listens again.
- ``query_answer``: ``"processing"`` (HTTP 500 "being processed"), ``"4999"``, ``"paid"``,
  ``"cancelled"``.

Every loop and wait here is bounded in time.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN_PATH = "/oauth/v1/generate"
PUSH_PATH = "/mpesa/stkpush/v1/processrequest"
QUERY_PATH = "/mpesa/stkpushquery/v1/query"

KINDS = ("token", "push", "query")
RESULTS = {
    "paid": (0, "The service request is processed successfully."),
    "cancelled": (1032, "Request cancelled by user"),
    "failed": (1037, "DS timeout user cannot be reached"),
}
_DESCRIPTIONS = {str(code): desc for code, desc in RESULTS.values()}
MAX_WAIT = 30.0  # no handler or callback thread waits longer than this


def callback_body(
    checkout_request_id: str,
    code: int | str = 0,
    *,
    merchant_request_id: str = "29115-34620561-1",
    amount: int | float | None = 500,
    phone: str | int | None = 254708374149,
    receipt: str = "SFA1B2C3D4",
    desc: str | None = None,
) -> bytes:
    """An STK callback of the real shape; metadata only on success, as Daraja sends it."""
    stk: dict[str, Any] = {
        "MerchantRequestID": merchant_request_id,
        "CheckoutRequestID": checkout_request_id,
        "ResultCode": code,
        "ResultDesc": desc or _DESCRIPTIONS.get(str(code), "Request cancelled by user"),
    }
    if str(code) == "0":
        items: list[dict[str, Any]] = [
            {"Name": "Amount", "Value": amount},
            {"Name": "MpesaReceiptNumber", "Value": receipt},
            {"Name": "Balance"},
            {"Name": "TransactionDate", "Value": 20250314102030},
        ]
        if phone is not None:
            # masked by M-Pesa ("2547******09") it comes as a string
            shown = phone if isinstance(phone, str) and not phone.isdigit() else int(phone)
            items.append({"Name": "PhoneNumber", "Value": shown})
        stk["CallbackMetadata"] = {"Item": items}
    return json.dumps({"Body": {"stkCallback": stk}}).encode()


def post_callback(url: str, body: bytes, timeout: float = 10.0) -> int:
    """POST a callback body the way Daraja does; returns the HTTP status (0 when unreachable)."""
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            answer.read()
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@dataclass
class Push:
    """One push as the fake received it."""

    body: dict[str, Any]
    checkout_request_id: str
    merchant_request_id: str
    received_at: float  # time.monotonic()
    answered_at: float | None = None


@dataclass
class Counters:
    token: int = 0
    push: int = 0
    query: int = 0
    other: int = 0
    expired_token_rejections: int = 0  # a token older than its lifetime
    replaced_token_rejections: int = 0  # a token killed by a newer one
    forced_token_rejections: int = 0
    callbacks_posted: int = 0
    callback_statuses: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.token + self.push + self.query + self.other


class FakeDaraja:
    def __init__(
        self,
        *,
        shortcode: str = "174379",
        passkey: str = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919",
        token_lifetime: float = 3599,
        consumer_key: str = "test-consumer-key",
        consumer_secret: str = "test-consumer-secret",
    ) -> None:
        self.shortcode = shortcode
        self._basic = base64.b64encode(f"{consumer_key}:{consumer_secret}".encode()).decode()
        self.passkey = passkey
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._callbacks_free = threading.Event()
        self._callbacks_free.set()
        self._threads: list[threading.Thread] = []
        self._connections: set[Any] = set()  # open client sockets, cut by stop()
        self._ids = itertools.count(1)
        # switches
        self.token_lifetime = token_lifetime
        self.push_latency = 0.0
        self.token_latency = 0.0
        self.callback: str | None = None
        self.callback_delay = 0.0
        self.callback_before_answer = False
        self.query_answer = "processing"
        self._failures: dict[str, list[tuple[int, str]]] = {kind: [] for kind in KINDS}
        self._forced_token_errors = 0
        # state
        self.counters = Counters()
        self.pushes: list[Push] = []
        self.paths: list[str] = []
        self._token: tuple[str, float] | None = None  # the one live token and when it was made
        self.server: ThreadingHTTPServer | None = None
        self.port = 0
        self.start()

    # -- switches --------------------------------------------------------------------------

    def configure(self, **switches: Any) -> None:
        allowed = {
            "token_lifetime", "token_latency", "push_latency", "callback", "callback_delay",
            "query_answer", "callback_before_answer",
        }  # fmt: skip
        unknown = set(switches) - allowed
        if unknown:
            raise TypeError(f"no such switch: {sorted(unknown)}")
        if "query_answer" in switches and switches["query_answer"] not in (
            "processing",
            "4999",
            *RESULTS,
        ):
            raise ValueError(switches["query_answer"])
        with self._lock:
            for name, value in switches.items():
                setattr(self, name, value)

    def fail(
        self, kind: str = "push", times: int = 1, *, status: int = 503, style: str = "html"
    ) -> None:
        """The next ``times`` requests of ``kind`` get HTTP ``status``: "html" or "envelope"."""
        assert kind in KINDS and style in ("html", "envelope") and status >= 500
        with self._lock:
            self._failures[kind].extend([(status, style)] * times)

    def force_invalid_token(self, times: int = 1) -> None:
        """The next ``times`` pushes or queries are answered 404.001.03."""
        with self._lock:
            self._forced_token_errors += times

    def hold_callbacks(self) -> None:
        self._callbacks_free.clear()

    def release_callbacks(self) -> None:
        self._callbacks_free.set()

    # -- reading -------------------------------------------------------------------------------

    def snapshot(self) -> Counters:
        with self._lock:
            c = self.counters
            return Counters(
                c.token, c.push, c.query, c.other, c.expired_token_rejections,
                c.replaced_token_rejections, c.forced_token_rejections, c.callbacks_posted,
                list(c.callback_statuses),
            )  # fmt: skip

    def push_bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(p.body) for p in self.pushes]

    def last_push(self) -> Push:
        with self._lock:
            return self.pushes[-1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- life ------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen (again, on the same port after :meth:`stop`)."""
        with self._lock:
            if self.server is not None:
                return
            server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
            server.daemon_threads = True
            self.server = server
            self.port = int(server.server_address[1])
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()

    def stop(self) -> None:
        """Close the port: connections are refused until :meth:`start`."""
        with self._lock:
            server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        # Kept-alive connections would otherwise still reach a "stopped" Daraja.
        with self._lock:
            connections, self._connections = set(self._connections), set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closing.set()
        self._callbacks_free.set()
        self.stop()
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + 5
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> FakeDaraja:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- behaviour -------------------------------------------------------------------------

    def _count(self, kind: str, path: str) -> tuple[int, str] | None:
        with self._lock:
            self.paths.append(path)
            if kind == "other":
                self.counters.other += 1
                return None
            setattr(self.counters, kind, getattr(self.counters, kind) + 1)
            queue = self._failures[kind]
            return queue.pop(0) if queue else None

    def _mint(self) -> dict[str, Any]:
        with self._lock:
            token = secrets.token_urlsafe(20)
            self._token = (token, time.monotonic())
            lifetime = self.token_lifetime
        return {"access_token": token, "expires_in": str(int(lifetime))}

    def _token_refusal(self, header: str) -> str | None:
        """None when the bearer token is live; else why it is not (and count it)."""
        with self._lock:
            if self._forced_token_errors > 0:
                self._forced_token_errors -= 1
                self.counters.forced_token_rejections += 1
                return "forced"
            token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
            if self._token is None or token != self._token[0]:
                self.counters.replaced_token_rejections += 1
                return "not the live token"
            if time.monotonic() - self._token[1] >= self.token_lifetime:
                self.counters.expired_token_rejections += 1
                return "expired"
            return None

    def _push(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        required = (
            "BusinessShortCode", "Password", "Timestamp", "Amount", "PartyA", "PhoneNumber",
            "CallBackURL", "AccountReference", "TransactionDesc",
        )  # fmt: skip
        missing = [name for name in required if name not in body]
        if missing:
            return 400, _envelope("400.002.02", f"Bad Request - Invalid {missing[0]}")
        expected = base64.b64encode(
            f"{self.shortcode}{self.passkey}{body['Timestamp']}".encode()
        ).decode()
        if body["Password"] != expected or str(body["BusinessShortCode"]) != self.shortcode:
            return 500, _envelope("500.001.1001", "Wrong credentials")
        if not isinstance(body["Amount"], int) or isinstance(body["Amount"], bool):
            return 400, _envelope("400.002.02", "Bad Request - Invalid Amount")
        phone = str(body["PhoneNumber"])
        if len(phone) != 12 or not phone.isdigit() or not phone.startswith(("2547", "2541")):
            return 400, _envelope("400.002.02", "Bad Request - Invalid PhoneNumber")
        n = next(self._ids)
        push = Push(
            body=body,
            checkout_request_id=f"ws_CO_FAKE_{n:06d}_{secrets.token_hex(4)}",
            merchant_request_id=f"FAKE-{n}-1",
            received_at=time.monotonic(),
        )
        with self._lock:
            self.pushes.append(push)
            latency, outcome, delay = self.push_latency, self.callback, self.callback_delay
            early = self.callback_before_answer
        if outcome is not None and early:
            self._spawn(self._send_callback, push, outcome, delay)
        if latency:
            self._closing.wait(min(latency, MAX_WAIT))
        with self._lock:
            push.answered_at = time.monotonic()
        if outcome is not None and not early:
            self._spawn(self._send_callback, push, outcome, delay)
        return 200, {
            "MerchantRequestID": push.merchant_request_id,
            "CheckoutRequestID": push.checkout_request_id,
            "ResponseCode": "0",
            "ResponseDescription": "Success. Request accepted for processing",
            "CustomerMessage": "Success. Request accepted for processing",
        }

    def _query(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        checkout = str(body.get("CheckoutRequestID") or "")
        with self._lock:
            known = any(p.checkout_request_id == checkout for p in self.pushes)
            answer = self.query_answer
        if not known:
            return 400, _envelope("400.002.02", "Bad Request - Invalid CheckoutRequestID")
        if answer == "processing":
            return 500, _envelope("500.001.1001", "The transaction is being processed")
        code, desc = (4999, "The transaction is still under processing")
        if answer in RESULTS:
            code, desc = RESULTS[answer]
        return 200, {
            "ResponseCode": "0",
            "ResponseDescription": "The service request has been accepted successsfully",
            "MerchantRequestID": "FAKE",
            "CheckoutRequestID": checkout,
            "ResultCode": str(code),
            "ResultDesc": desc,
        }

    def _send_callback(self, push: Push, outcome: str, delay: float) -> None:
        if delay:
            self._closing.wait(min(delay, MAX_WAIT))
        self._callbacks_free.wait(MAX_WAIT)
        if self._closing.is_set():
            return
        code, desc = RESULTS[outcome]
        body = callback_body(
            push.checkout_request_id,
            code,
            merchant_request_id=push.merchant_request_id,
            amount=push.body["Amount"],
            phone=push.body["PhoneNumber"],
            receipt=f"SF{secrets.token_hex(4).upper()}",
            desc=desc,
        )
        self.post_callback(str(push.body["CallBackURL"]), body)

    def post_callback(self, url: str, body: bytes) -> int:
        """Post a callback body to ``url``, counted; returns the HTTP status (0: unreachable)."""
        status = post_callback(url, body)
        with self._lock:
            self.counters.callbacks_posted += 1
            self.counters.callback_statuses.append(status)
        return status

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with fake._lock:
                    fake._connections.add(self.connection)

            def finish(self) -> None:
                with fake._lock:
                    fake._connections.discard(self.connection)
                with contextlib.suppress(OSError):
                    super().finish()

            def do_GET(self) -> None:
                path = self.path.partition("?")[0]
                if path != TOKEN_PATH:
                    fake._count("other", path)
                    self._reply(404, _envelope("404.001.01", "Resource not found"))
                    return
                failure = fake._count("token", path)
                if failure:
                    self._fail(*failure, "token")
                    return
                if self.headers.get("Authorization") != f"Basic {fake._basic}":
                    self._reply(400, None)  # Daraja: empty body, "Invalid Credentials"
                    return
                with fake._lock:
                    latency = fake.token_latency
                time.sleep(latency)
                self._reply(200, fake._mint())

            def do_POST(self) -> None:
                path = self.path.partition("?")[0]
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                kind = {PUSH_PATH: "push", QUERY_PATH: "query"}.get(path, "other")
                failure = fake._count(kind, path)
                if kind == "other":
                    self._reply(404, _envelope("404.001.01", "Resource not found"))
                    return
                if failure:
                    self._fail(*failure, kind)
                    return
                if fake._token_refusal(self.headers.get("Authorization") or ""):
                    self._reply(404, _envelope("404.001.03", "Invalid Access Token"))
                    return
                try:
                    body = json.loads(raw)
                    assert isinstance(body, dict)
                except (ValueError, AssertionError):
                    self._reply(400, _envelope("400.002.02", "Bad Request - Invalid JSON"))
                    return
                status, doc = fake._push(body) if kind == "push" else fake._query(body)
                self._reply(status, doc)

            def _fail(self, status: int, style: str, kind: str) -> None:
                if style == "envelope":
                    self._reply(status, _envelope("500.003.1001", "Internal Server Error"))
                    return
                page = f"<html><body><h1>{status} Service Unavailable</h1></body></html>"
                self._send(status, page.encode(), "text/html")

            def _reply(self, status: int, doc: dict[str, Any] | None) -> None:
                body = b"" if doc is None else json.dumps(doc).encode()
                self._send(status, body, "application/json")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up waiting: the real Daraja does not care either

        return Handler


def _envelope(code: str, message: str) -> dict[str, Any]:
    return {"requestId": secrets.token_hex(8), "errorCode": code, "errorMessage": message}
