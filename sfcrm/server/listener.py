"""The callback listener on a socket: waitress, with the limits that keep slow, idle or
greedy clients from starving Daraja's callbacks."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sfcrm.server.networks import LOOPBACK, in_networks, parse_networks

if TYPE_CHECKING:
    from sfcrm.server.callbacks import CallbackApp
    from sfcrm.server.waitress_fixes import ListenerServer

log = logging.getLogger("sfcrm.listener")


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
        self._uncapped = parse_networks(uncapped)
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()  # connections close on worker threads too
        self._warned = -1e9

    def admit(self, address: str) -> bool:
        if self.per_address <= 0 or in_networks(address, self._uncapped):
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


def make_server(
    app: CallbackApp,
    host: str,
    port: int,
    threads: int,
    *,
    limits: ConnectionLimits | None = None,
) -> ListenerServer:
    """A waitress server for ``app``; ``.effective_port`` tells the port, ``.run()`` serves."""
    from waitress.server import BaseWSGIServer, create_server

    from sfcrm.server.waitress_fixes import ListenerServer, fit

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
    # One listening socket per address the host resolves to; each makes its own connections.
    for listening in list(sockets.values()):
        if isinstance(listening, BaseWSGIServer):
            fit(listening, sockets, limits.request_seconds, gate)
    return ListenerServer(server, sockets, gate)
