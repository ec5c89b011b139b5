"""Daraja's STK results: the callback listener's WSGI app.

One route: POST on the path of MPESA_CALLBACK_URL (a secret, compared in constant time). The raw
body is stored before anything else and acted on by :meth:`Payments.receive`, through the same
rules ``reconcile`` uses. Nothing a client sends can make it answer 500: a stored body is
answered 200 even when acting on it fails (``reconcile`` retries it), and a body that is not a
Daraja callback is stored and answered 400. Requests under /crew/rsvp/ go to the RSVP pages
and under /crew/me/ to each crew member's own page, each address within a rate of pages.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import queue
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from sfcrm.models import CallbackOutcome
from sfcrm.portal import PAGE_PREFIX
from sfcrm.server.checkpoint import WalCheckpointer
from sfcrm.server.networks import LOOPBACK, in_networks, parse_networks
from sfcrm.server.rate import PageRate
from sfcrm.server.rsvp_pages import RSVP_PREFIX

if TYPE_CHECKING:
    from wsgiref.types import StartResponse

    from sfcrm.payments import Payments
    from sfcrm.server.crew_pages import CrewPages
    from sfcrm.server.rsvp_pages import RsvpPages

log = logging.getLogger("sfcrm.listener")

ACCEPTED = {"ResultCode": 0, "ResultDesc": "Accepted"}
# The answer to almost every request, built once.
_ACCEPTED_BODY = json.dumps(ACCEPTED).encode()
_ACCEPTED_HEADERS = (
    ("Content-Type", "application/json"),
    ("Content-Length", str(len(_ACCEPTED_BODY))),
)


class ConfirmWorker:
    """Confirms 'paid' callbacks by STK Push Query off the request thread, so Daraja is
    answered at once. What is left when it stops stays NEEDS_QUERY for ``reconcile``."""

    def __init__(self, payments: Payments) -> None:
        self.payments = payments
        self._queue: queue.Queue[int | None] = queue.Queue(maxsize=10_000)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, callback_id: int) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sfcrm-confirm", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(callback_id)
        except queue.Full:
            log.warning("confirmation queue full; callback %s waits for reconcile", callback_id)

    def _run(self) -> None:
        while True:
            callback_id = self._queue.get()
            if callback_id is None:
                return
            try:
                self.payments.confirm_callback(callback_id)
            except Exception as exc:  # keep the worker alive; reconcile picks the row up
                log.warning("callback %s not confirmed yet: %s", callback_id, exc)

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)


class CallbackApp:
    """The WSGI application; also importable for gunicorn or waitress with more workers."""

    def __init__(
        self,
        payments: Payments,
        *,
        callback_path: str | None,
        max_body: int = 65536,
        allowlist: Iterable[str] | None = None,
        trusted_proxies: Iterable[str] = (),
        worker: ConfirmWorker | None = None,
        rsvp: RsvpPages | None = None,
        checkpointer: WalCheckpointer | None = None,
        crew_pages: CrewPages | None = None,
        page_rate: PageRate | None = None,
    ) -> None:
        self.payments = payments
        self.rsvp = rsvp
        self.crew_pages = crew_pages
        self.page_rate = page_rate or PageRate(60)
        # None: no payment route (a listener serving crew links only); b"" matches no path
        self._path = self._normal(unquote(callback_path)).encode("utf-8") if callback_path else b""
        self.max_body = max_body
        self._allow = parse_networks(allowlist) if allowlist is not None else None
        self._proxies = parse_networks(trusted_proxies)
        self._unseen = [*parse_networks(LOOPBACK), *self._proxies]
        self.worker = worker or ConfirmWorker(payments)
        # Only SQLite keeps a write-ahead log to copy back into the file.
        if checkpointer is None and payments.db.dialect == "sqlite":
            checkpointer = WalCheckpointer(payments.db.checkpoint)
        self.checkpointer = checkpointer

    def stop(self) -> None:
        """Stops the app's own threads, the confirmations and the checkpoints: before the
        database is closed."""
        self.worker.stop()
        if self.checkpointer is not None:
            self.checkpointer.stop()

    @staticmethod
    def _normal(path: str) -> str:
        return path.rstrip("/") or "/"

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            body = self._handle(environ, start_response)
        except Exception:
            log.exception("listener error")
            body = _reply(
                start_response,
                "503 Service Unavailable",
                {"ResultCode": 1, "ResultDesc": "Try again"},
            )
        # HEAD: the headers GET would send, Content-Length included, and no body. waitress
        # sends whatever the app returns, and a kept-alive client would read those bytes as
        # the start of its next answer.
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else body

    def _handle(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = self._normal(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).encode(
            "latin-1", "replace"
        )
        if not hmac.compare_digest(path, self._path):
            text = path.decode("latin-1")
            if self.rsvp is not None and text.startswith(RSVP_PREFIX):
                token = text[len(RSVP_PREFIX) :]
                if token and "/" not in token:
                    return self._page(environ, start_response, self.rsvp, token)
            if self.crew_pages is not None and text.startswith(PAGE_PREFIX):
                rest = text[len(PAGE_PREFIX) :]
                if rest and rest.count("/") <= 1:
                    return self._page(environ, start_response, self.crew_pages, rest)
            return _reply(start_response, "404 Not Found", {"error": "not found"})
        if environ.get("REQUEST_METHOD") != "POST":
            return _reply(
                start_response,
                "405 Method Not Allowed",
                {"error": "POST only"},
                [("Allow", "POST")],
            )
        body = self._read_body(environ)
        if body is None:
            return _reply(
                start_response,
                "413 Content Too Large",
                {"ResultCode": 1, "ResultDesc": "Body too large"},
            )
        if isinstance(body, str):
            return _reply(start_response, "400 Bad Request", {"ResultCode": 1, "ResultDesc": body})
        source = self._source(environ)
        trusted = self._allow is None or in_networks(source, self._allow)
        # Stored and acted on in one transaction; if acting fails the body is still stored
        # (outcome "error") and Daraja is answered 200: reconcile retries it.
        callback_id, applied = self.payments.receive(body, source, trusted=trusted)
        if self.checkpointer is not None:
            self.checkpointer.poke()
        if applied.outcome == CallbackOutcome.REJECTED:
            log.info("callback %s from %s rejected: %s", callback_id, source, applied.detail)
            return _reply(
                start_response,
                "400 Bad Request",
                {"ResultCode": 1, "ResultDesc": f"Rejected: {applied.detail}"},
            )
        if applied.outcome == CallbackOutcome.NEEDS_QUERY:
            self.worker.submit(callback_id)
        start_response("200 OK", list(_ACCEPTED_HEADERS))
        return [_ACCEPTED_BODY]

    def _page(
        self,
        environ: dict[str, Any],
        start_response: StartResponse,
        pages: Callable[[dict[str, Any], StartResponse, str], Iterable[bytes]],
        rest: str,
    ) -> Iterable[bytes]:
        """A crew page, within the rate one address may ask for pages. A request whose sender
        cannot be told (it comes from this machine or a trusted proxy without a forwarded
        address: a tunnel or proxy carrying everyone's) is not counted, as the connection caps
        do not count them: one bucket would be shared by every crew member."""
        source = self._source(environ)
        wait = 0.0 if in_networks(source, self._unseen) else self.page_rate.allow(source)
        if wait:
            body = b"Too many requests: wait a minute, then open the link again.\n"
            start_response(
                "429 Too Many Requests",
                [("Content-Type", "text/plain; charset=utf-8"),
                 ("Content-Length", str(len(body))), ("Retry-After", str(math.ceil(wait))),
                 ("Cache-Control", "no-store")],
            )  # fmt: skip
            return [body]
        return pages(environ, start_response, rest)

    def _read_body(self, environ: dict[str, Any]) -> bytes | str | None:
        """The body, None when over the limit (unread), or an error text."""
        length_text = environ.get("CONTENT_LENGTH") or ""
        stream = environ["wsgi.input"]
        if length_text:
            try:
                length = int(length_text)
            except ValueError:
                return "bad Content-Length"
            if length < 0:
                return "bad Content-Length"
            if length > self.max_body:
                return None
            return bytes(stream.read(length))
        # No length (chunked): read at most one byte past the limit.
        data = bytes(stream.read(self.max_body + 1))
        return None if len(data) > self.max_body else data

    def _source(self, environ: dict[str, Any]) -> str:
        peer = str(environ.get("REMOTE_ADDR") or "")
        forwarded = environ.get("HTTP_X_FORWARDED_FOR")
        if not forwarded or not in_networks(peer, self._proxies):
            return peer
        # The right-most address not added by one of our own proxies is the real sender.
        for hop in reversed([h.strip() for h in str(forwarded).split(",") if h.strip()]):
            if not in_networks(hop, self._proxies):
                return hop[:64]
        return peer


def _reply(
    start_response: StartResponse,
    status: str,
    doc: dict[str, Any],
    headers: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    body = json.dumps(doc).encode()
    start_response(
        status,
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            *(headers or []),
        ],
    )
    return [body]
