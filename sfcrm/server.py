"""The callback listener: a WSGI app that takes Daraja's STK results.

One route: POST on the path of MPESA_CALLBACK_URL (a secret, compared in constant time). The raw
body is stored before anything else and acted on by :meth:`Payments.receive`, through the same
rules ``reconcile`` uses. Nothing a client sends can make it answer 500: a stored body is
answered 200 even when acting on it fails (``reconcile`` retries it), and a body that is not a
Daraja callback is stored and answered 400.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import queue
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote, unquote

from sfcrm.models import CallbackOutcome

if TYPE_CHECKING:
    from datetime import datetime

    from sfcrm.crew import Crew, CrewRow
    from sfcrm.payments import Payments
    from sfcrm.render import Renderer

log = logging.getLogger("sfcrm.listener")

StartResponse = Callable[..., Any]
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


class WalCheckpointer:
    """Copies the database's write-ahead log back into the file on a thread of its own,
    shortly after callbacks were stored.

    SQLite does this "checkpoint" inside the COMMIT of whichever write finds the log past
    1,000 pages. The listener acts on one callback at a time, so in a burst every 80th or so
    waited milliseconds for it, and every callback queued behind that one. A PASSIVE
    checkpoint blocks no reader or writer, and SQLite's own still runs should this one fall
    behind. The thread starts with the first write and ends after ``idle`` seconds without
    one, so an idle listener neither wakes up nor touches the file.
    """

    def __init__(self, path: Path, *, delay: float = 0.02, idle: float = 2.0) -> None:
        self.path = path
        self.delay = delay  # lets a burst gather: one checkpoint per ``delay``, not per write
        self.idle = idle
        self._wanted = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._broken = False

    def poke(self) -> None:
        """Something was written: checkpoint soon. Never raises."""
        with self._lock:
            self._wanted.set()
            if self._thread is None and not self._broken:
                thread = threading.Thread(target=self._run, name="sfcrm-checkpoint", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # no thread to be had now: SQLite checkpoints meanwhile
                    return
                self._thread = thread

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            # mode=rw: never create a file that is not there
            uri = f"file:{quote(str(self.path))}?mode=rw"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None)
            while True:
                if not self._wanted.wait(self.idle):
                    with self._lock:
                        if not self._wanted.is_set():
                            self._thread = None
                            return
                    continue
                time.sleep(self.delay)
                self._wanted.clear()
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except Exception as exc:
            # Not needed for correctness: SQLite checkpoints on its own. Say so once and stop.
            log.warning("checkpoints left to SQLite: %s", exc)
            with self._lock:
                self._broken = True
                self._thread = None
        finally:
            if conn is not None:
                conn.close()


def _parse_networks(items: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(item.strip(), strict=False) for item in items if item.strip()]


def _in(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return any(ip in net for net in networks)


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
    ) -> None:
        self.payments = payments
        self.rsvp = rsvp
        # None: no payment route (a listener serving crew links only); b"" matches no path
        self._path = self._normal(unquote(callback_path)).encode("utf-8") if callback_path else b""
        self.max_body = max_body
        self._allow = _parse_networks(allowlist) if allowlist is not None else None
        self._proxies = _parse_networks(trusted_proxies)
        self.worker = worker or ConfirmWorker(payments)
        self.checkpointer = checkpointer or WalCheckpointer(payments.db.path)

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
                    return self.rsvp(environ, start_response, token)
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
        trusted = self._allow is None or _in(source, self._allow)
        # Stored and acted on in one transaction; if acting fails the body is still stored
        # (outcome "error") and Daraja is answered 200: reconcile retries it.
        callback_id, applied = self.payments.receive(body, source, trusted=trusted)
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
        if not forwarded or not _in(peer, self._proxies):
            return peer
        # The right-most address not added by one of our own proxies is the real sender.
        for hop in reversed([h.strip() for h in str(forwarded).split(",") if h.strip()]):
            if not _in(hop, self._proxies):
                return hop[:64]
        return peer


RSVP_PREFIX = "/crew/rsvp/"
RSVP_MAX_BODY = 1024


class RsvpPages:
    """The crew member's confirm/decline page behind the personal link in an invitation.

    GET shows the event and two buttons and changes nothing (mail scanners open links);
    POST from that page records the answer. A forged, tampered or expired link gets 403, and
    so does one made for an assignment whose id another assignment now has.
    """

    def __init__(
        self,
        crew: Crew,
        renderer: Renderer,
        *,
        secret_key: str,
        clock: Callable[[], datetime],
    ) -> None:
        self.crew = crew
        self.renderer = renderer
        self._secret = secret_key
        self.clock = clock

    def __call__(
        self, environ: dict[str, Any], start_response: StartResponse, token: str
    ) -> Iterable[bytes]:
        from sfcrm.errors import ConflictError, NotFoundError, ValidationError
        from sfcrm.rsvp import InvalidToken

        org = {
            "name": self.crew.org.name,
            "phone": self.crew.org.phone,
            "email": self.crew.org.email,
        }
        not_valid = "This link is not a valid invitation link."
        try:
            row = self._assignment(token)
        except (InvalidToken, NotFoundError) as exc:
            reason = (
                "This link has expired: the event is over." if str(exc) == "expired" else not_valid
            )
            return self._page(
                start_response, "403 Forbidden", "rsvp_denied.html.j2", org=org, reason=reason
            )
        context = self.crew.context(row)
        method = environ.get("REQUEST_METHOD")
        if method in ("GET", "HEAD"):
            return self._page(
                start_response, "200 OK", "rsvp_page.html.j2", status=row.crew.status, **context
            )
        if method != "POST":
            return self._page(
                start_response, "405 Method Not Allowed", "rsvp_denied.html.j2", org=org,
                reason="Use the buttons on the invitation page.",
            )  # fmt: skip
        answer = self._answer(environ)
        assignment_id = row.crew.id
        assert assignment_id is not None
        try:
            row = self.crew.respond(
                assignment_id, answer or "", via="rsvp link", bound_to=row.binding
            )
        except NotFoundError:  # deleted, or its id taken by another, since it was read above
            return self._page(
                start_response, "403 Forbidden", "rsvp_denied.html.j2", org=org, reason=not_valid
            )
        except ValidationError:
            return self._page(
                start_response, "400 Bad Request", "rsvp_denied.html.j2", org=org,
                reason="Please use the Confirm or Decline button.",
            )  # fmt: skip
        except ConflictError as exc:
            return self._page(
                start_response, "409 Conflict", "rsvp_denied.html.j2", org=org, reason=exc.message
            )
        log.info("assignment %s answered %s by link", assignment_id, row.crew.status)
        return self._page(
            start_response,
            "200 OK",
            "rsvp_done.html.j2",
            status=row.crew.status,
            **self.crew.context(row),
        )

    def _assignment(self, token: str) -> CrewRow:
        """The assignment a genuine, unexpired link was made for: InvalidToken or
        NotFoundError otherwise, also when the row now at its id is another assignment."""
        from sfcrm.rsvp import InvalidToken, parse_token, verify

        link = parse_token(token)
        row = self.crew.get(link.assignment_id)
        kind = verify(self._secret, link, row.binding, self.clock())
        if kind == "unbound" and not self.crew.invitation_carries(
            link.assignment_id, RSVP_PREFIX + token
        ):
            raise InvalidToken("not sent for this assignment")
        return row

    def _answer(self, environ: dict[str, Any]) -> str | None:
        from urllib.parse import parse_qs

        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return None
        if length <= 0 or length > RSVP_MAX_BODY:
            return None
        body = environ["wsgi.input"].read(length)
        values = parse_qs(body.decode("utf-8", "replace")).get("answer", [])
        return values[0] if len(values) == 1 else None

    def _page(
        self, start_response: StartResponse, http_status: str, template: str, /, **context: Any
    ) -> list[bytes]:
        body = self.renderer.render(template, **context).encode("utf-8")
        start_response(
            http_status,
            [
                ("Content-Type", "text/html; charset=utf-8"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
                ("X-Robots-Tag", "noindex"),
                ("Referrer-Policy", "no-referrer"),
                ("X-Frame-Options", "DENY"),
            ],
        )
        return [body]


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


LOOPBACK = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class ConnectionLimits:
    """What keeps slow, idle or greedy clients from starving Daraja's callbacks.

    waitress alone serves a connection for as long as bytes keep trickling in and, once
    ``total`` connections are open, accepts no more: a thousand clients sending a byte a
    second shut Daraja out for as long as they liked.
    """

    # A client has this long, from connecting or from the end of the previous answer on the
    # connection, to send a whole request, headers and body. Each byte does not restart it.
    request_seconds: float = 10.0
    # Open connections one source address may hold; more are closed at once (0: no cap).
    per_address: int = 32
    # Open connections in all; the listener raises its open-file limit to fit them.
    total: int = 4000
    # Addresses held to no per-address cap: a reverse proxy or tunnel, whose connections
    # carry everyone's requests (it bounds its own slow clients), and Daraja's addresses.
    uncapped: tuple[str, ...] = LOOPBACK


# Files the listener needs besides its connections: the database, logs, Daraja, the trigger.
_SPARE_FILES = 64


def _fit_open_files(connections: int) -> int:
    """Raise this process's soft limit on open files to hold ``connections`` (as far as the
    hard limit allows); the number of connections that fit."""
    try:
        import resource
    except ImportError:  # not a Unix: nothing to raise
        return connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + _SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return connections
    fitting = max(1, soft - _SPARE_FILES)
    log.warning(
        "the open-file limit (%s) lets the listener hold %s connections, not %s",
        soft,
        fitting,
        connections,
    )
    return fitting


class AddressGate:
    """Counts the open connections of each source address and refuses one over the cap."""

    def __init__(self, per_address: int, uncapped: Iterable[str]) -> None:
        self.per_address = per_address
        self._uncapped = _parse_networks(uncapped)
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()  # connections close on worker threads too
        self._warned = -1e9

    def admit(self, address: str) -> bool:
        if self.per_address <= 0 or _in(address, self._uncapped):
            return True
        with self._lock:
            held = self._open.get(address, 0)
            if held < self.per_address:
                self._open[address] = held + 1
                return True
            now = time.monotonic()
            warn = now - self._warned > 60  # one line a minute, not one per refusal
            if warn:
                self._warned = now
        if warn:
            log.warning(
                "%s holds %s connections, the most one address may: closing its new ones",
                address,
                held,
            )
        return False

    def release(self, address: str) -> None:
        """One connection admitted for ``address`` closed (an uncapped one is not counted)."""
        with self._lock:
            held = self._open.get(address, 0)
            if held > 1:
                self._open[address] = held - 1
            else:
                self._open.pop(address, None)

    def held(self, address: str) -> int:
        with self._lock:
            return self._open.get(address, 0)


def _listener_channel(limits: ConnectionLimits, gate: AddressGate) -> Callable[..., Any]:
    """waitress's connection class with the listener's rules, behind the per-address gate.

    - A request must arrive whole within ``limits.request_seconds``, counted from the
      connection's start or from the end of its previous answer. waitress only closes a
      connection that has been silent for ``channel_timeout``, so one byte a second kept a
      connection forever.
    - waitress refuses a Transfer-Encoding it does not know (``gzip``, ``identity``…) with
      "501 Not Implemented" before the app sees the request. That is the client's fault, and
      the listener promises that nothing a client sends gets a 5xx (monitoring reads a 5xx as
      "the listener is broken"): it answers 400.
    """
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask
    from waitress.utilities import BadRequest, ServerNotImplemented

    class ClientErrorTask(ErrorTask):
        def execute(self) -> None:
            request: Any = self.request  # the stubs say Error; it is the request's parser
            if isinstance(request.error, ServerNotImplemented):
                request.error = BadRequest(request.error.body)
            super().execute()

    class ListenerChannel(HTTPChannel):
        error_task_class = ClientErrorTask

        def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:
            # None while a request is being answered; else when the wait for one began
            self._waiting_since: float | None = time.monotonic()
            self._answering = 0  # answers begun; counted by the worker threads
            self._gated: str | None = _address(addr)
            try:
                super().__init__(server, sock, addr, adj, map)
            except BaseException:
                self._release()
                raise

        def received(self, data: bytes) -> bool:
            begun = self._answering
            done = bool(super().received(data))
            # A request arrived whole: the clock stops until its answer is sent. (A fast
            # worker may have answered it already, hence the count.)
            if self.requests or self._answering != begun:
                self._waiting_since = None
            return done

        def service(self) -> None:
            self._answering += 1
            super().service()

        def readable(self) -> bool:
            # waitress asks every connection this at least once a second (the loop timeout)
            if self.requests:
                self._waiting_since = None
            elif self._waiting_since is None:  # answered: the clock starts for the next one
                self._waiting_since = time.monotonic()
            elif time.monotonic() - self._waiting_since > limits.request_seconds:
                self.will_close = True  # the loop closes it as soon as it may write
                return False
            return bool(super().readable())

        def del_channel(self, map: Any = None) -> None:
            # every way a connection closes comes here (handle_close skips close())
            self._release()
            super().del_channel(map)

        def _release(self) -> None:
            gated, self._gated = self._gated, None
            if gated is not None:
                gate.release(gated)

    def connect(server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> Any:
        address = _address(addr)
        if not gate.admit(address):
            with contextlib.suppress(OSError):
                # a reset, not a close: no TIME_WAIT left behind for each refused connection
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            return None
        try:
            return ListenerChannel(server, sock, addr, adj, map)
        except OSError:
            # gone before it was set up (reset at once); raising here would make waitress
            # close its listening socket
            sock.close()
            return None

    return connect


def _address(addr: Any) -> str:
    """The host part of a peer's socket address."""
    return str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)


def make_server(
    app: CallbackApp,
    host: str,
    port: int,
    threads: int,
    *,
    limits: ConnectionLimits | None = None,
) -> Any:
    """A waitress server for ``app``; ``.effective_port`` tells the port, ``.run()`` serves."""
    from waitress.server import BaseWSGIServer, create_server

    limits = limits or ConnectionLimits()
    sockets: dict[int, Any] = {}
    server = create_server(
        app,
        map=sockets,
        host=host,
        port=port,
        threads=threads,
        # waitress's own 413 for a declared or chunked body over the limit: it never buffers it.
        # waitress refuses a body *equal* to its limit, the app takes up to max_body: hence + 1.
        max_request_body_size=app.max_body + 1,
        channel_timeout=30,
        connection_limit=_fit_open_files(limits.total),
        # select() takes no descriptor above 1023: poll() serves thousands of connections
        asyncore_use_poll=True,
        ident="sfcrm",
        clear_untrusted_proxy_headers=False,
    )
    gate = AddressGate(limits.per_address, limits.uncapped)
    channel = _listener_channel(limits, gate)
    # One listening socket per address the host resolves to; each makes its own connections.
    for listening in list(sockets.values()):
        if isinstance(listening, BaseWSGIServer):
            # waitress calls it with (server, socket, address, adjustments, map=...)
            listening.channel_class = cast(Any, channel)
    return ListenerServer(server, sockets, gate)


class ListenerServer:
    """waitress's server (its other attributes pass through), with a ``close()`` that is safe
    from any thread.

    waitress's own close() shuts the listening socket and the trigger while the thread in
    ``run()`` goes on selecting on the connections left open (it never returns), and while
    worker threads still write to the trigger's descriptor, which by then may belong to
    another file. The demo and the tests serve from one thread and close from another, so
    close() here lets the workers finish first, then has the serving thread close every
    socket itself (through the trigger), so that its loop ends.
    """

    def __init__(self, server: Any, sockets: dict[int, Any], gate: AddressGate) -> None:
        self._server = server
        self._sockets = sockets
        self.gate = gate
        self._serving: int | None = None  # the thread in run(), while it is there
        self._stopped = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    @property
    def effective_port(self) -> int:
        return int(self._server.effective_port)

    def run(self) -> None:
        self._stopped.clear()
        self._serving = threading.get_ident()
        try:
            self._server.run()
        finally:
            self._serving = None
            self._stopped.set()

    def close(self) -> None:
        from waitress import wasyncore
        from waitress.server import BaseWSGIServer

        self._server.task_dispatcher.shutdown()
        serving = self._serving
        listening = [s for s in list(self._sockets.values()) if isinstance(s, BaseWSGIServer)]
        triggers: list[Any] = [s.trigger for s in listening]
        if serving is not None and serving != threading.get_ident() and listening:

            def stop() -> None:  # in the serving thread
                # Every socket, but not the triggers' pipes: they stay open until
                # pull_trigger() below has returned. The serving thread may run this before
                # that call has written its byte (woken by a worker's earlier pull), and a
                # pipe closed then made the write fail, or land in whatever file took its
                # number. (A listening server's own close() closes its trigger too.)
                for dispatcher in list(self._sockets.values()):
                    if dispatcher in triggers:
                        dispatcher.del_channel()
                    else:
                        with contextlib.suppress(OSError):
                            wasyncore.dispatcher.close(dispatcher)
                # the map is empty now: the loop ends

            triggers[0].pull_trigger(stop)
            self._stopped.wait(5)
        else:
            wasyncore.close_all(self._sockets)
        for trigger in triggers:
            trigger.close()
        self._server.close()
