"""Where the listener changes how waitress itself behaves, and nowhere else.

Each override below says what waitress does, why the listener does otherwise, and which test
of tests/test_waitress_fixes.py (over a real loopback socket) fails without it:

- ``ClientErrorTask``: a Transfer-Encoding waitress does not know gets 400, not 501.
- ``ListenerChannel``: a request must arrive whole within a deadline, and a connection gives
  its place back to the per-address gate however it closes.
- ``listener_channel()``: a connection over the per-address cap is reset at once, and one
  gone before it was set up no longer costs waitress its listening socket.
- ``ListenerTrigger``: the loop's wake-up pipe, which no thread writes to once it is closed.
- ``ListenerServer``: ``close()`` from any thread, also while requests are in flight.

Imported by ``make_server`` only: waitress loads when a listener is made, not with sfcrm.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from waitress import trigger, wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer
from waitress.task import ErrorTask
from waitress.utilities import BadRequest, ServerNotImplemented

if TYPE_CHECKING:
    from sfcrm.server.listener import AddressGate


class ClientErrorTask(ErrorTask):
    """waitress refuses a Transfer-Encoding it does not know (``gzip``, ``identity``…) with
    "501 Not Implemented" before the app sees the request. That is the client's fault, and the
    listener promises that nothing a client sends gets a 5xx (monitoring reads a 5xx as "the
    listener is broken"): it answers 400.

    Test: ``test_unsupported_transfer_encoding_is_400_not_501``.
    """

    def execute(self) -> None:
        request: Any = self.request  # the stubs say Error; it is the request's parser
        if isinstance(request.error, ServerNotImplemented):
            request.error = BadRequest(request.error.body)
        super().execute()


class ListenerChannel(HTTPChannel):
    """waitress's connection, with a deadline on each request and a place at the gate.

    - waitress closes a connection only once it has been silent for ``channel_timeout``, so a
      byte a second kept one open forever. Here a request must arrive whole within
      ``request_seconds``, counted from the connection's start or from the end of its
      previous answer. ``readable`` keeps that clock, ``received`` and ``service`` stop it
      even when a worker answers before the loop looks at the connection again.
      Tests:
      ``test_connection_trickling_its_headers_is_closed_at_the_deadline_however_often_it_sends``,
      ``test_kept_alive_connection_is_not_cut_while_its_requests_come_in_time``,
      ``test_kept_alive_connection_is_not_cut_when_its_answer_beats_the_loop_to_the_next_look``.
    - waitress knows nothing of the per-address cap: every way a connection closes (and a
      set-up that fails) gives its place at the gate back (``del_channel``).
      Tests:
      ``test_connections_over_the_per_address_cap_are_closed_at_once_and_others_still_served``,
      ``test_connection_gone_before_it_is_set_up_leaves_the_listener_serving``.
    - While a worker answers, it sends its own output (waitress's ``send_bytes`` is 1) holding
      the connection's output lock. waitress still calls such a connection writable: the
      loop's poll returned at once, its flush found the lock taken, and it went round again,
      thousands of times a second, taking the interpreter from the very worker it waited for
      (a hundred kept-alive clients got a tenth of the answers). Here a connection whose
      request is being answered is not writable; the worker wakes the loop when it is done,
      and the loop sends whatever is left. A close asked for, or output past the high
      watermark (the worker then waits for the loop), still is.
      Test: ``test_loop_does_not_spin_while_workers_answer_kept_alive_clients``.
    """

    error_task_class = ClientErrorTask

    def __init__(
        self,
        server: Any,
        sock: Any,
        addr: Any,
        adj: Any,
        map: Any = None,
        *,
        request_seconds: float,
        gate: AddressGate,
    ) -> None:
        self._request_seconds = request_seconds
        self._gate = gate
        # None while a request is being answered; else when the wait for one began
        self._waiting_since: float | None = time.monotonic()
        self._answering = 0  # answers begun; counted by the worker threads
        self._gated: str | None = _peer_host(addr)
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
        elif time.monotonic() - self._waiting_since > self._request_seconds:
            self.will_close = True  # the loop closes it as soon as it may write
            return False
        return bool(super().readable())

    def writable(self) -> bool:
        if (
            self.requests
            and not (self.will_close or self.close_when_flushed)
            and self.total_outbufs_len <= self.adj.outbuf_high_watermark
        ):
            return False
        return bool(super().writable())

    def del_channel(self, map: Any = None) -> None:
        # every way a connection closes comes here (handle_close skips close())
        self._release()
        super().del_channel(map)

    def _release(self) -> None:
        gated, self._gated = self._gated, None
        if gated is not None:
            self._gate.release(gated)


def listener_channel(request_seconds: float, gate: AddressGate) -> Callable[..., Any]:
    """What waitress calls to make a connection (its ``channel_class``): a ListenerChannel,
    behind the per-address gate.

    - waitress takes every connection it accepts. One over the cap of its address is closed
      here at once, with a reset rather than a close: no TIME_WAIT is left behind for each.
      Test:
      ``test_connections_over_the_per_address_cap_are_closed_at_once_and_others_still_served``.
    - waitress lets an error in setting a connection up reach its loop, which then closes the
      listening socket: a client that resets its connection at once would stop the listener.
      Here that connection is dropped and the listener goes on.
      Test: ``test_connection_gone_before_it_is_set_up_leaves_the_listener_serving``.
    """

    def connect(server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> Any:
        address = _peer_host(addr)
        if not gate.admit(address):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            return None
        try:
            return ListenerChannel(
                server, sock, addr, adj, map, request_seconds=request_seconds, gate=gate
            )
        except OSError:
            sock.close()
            return None

    return connect


def _peer_host(addr: Any) -> str:
    """The host part of a peer's socket address."""
    return str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)


def fit(
    listening: BaseWSGIServer, sockets: dict[int, Any], request_seconds: float, gate: AddressGate
) -> None:
    """Puts this module's overrides into one of waitress's listening sockets."""
    fitted: Any = listening  # the stubs call its trigger a descriptor
    # waitress calls it with (server, socket, address, adjustments, map=...)
    fitted.channel_class = listener_channel(request_seconds, gate)
    waitress_own, fitted.trigger = fitted.trigger, ListenerTrigger(sockets)
    waitress_own.close()  # not pulled yet: the loop has not run


class ListenerTrigger(trigger.trigger):
    """The pipe a worker writes a byte to when its answer is ready, to wake the loop.

    waitress writes to that pipe and closes it with nothing between the two. close() waits
    for the workers, but not for ever, and a wake-up sent once the pipe was closed wrote to a
    closed descriptor (EBADF) or, once the number was taken again, a byte into whatever
    pipe, socket or database file had it. Two threads closing the pipe at once both closed
    its descriptors. Here pulling and closing take turns, a pull after the close does
    nothing (no loop is left to wake), and a pull never blocks: a full pipe has woken the
    loop already.

    Tests: ``test_a_wake_up_after_the_listener_closed_writes_to_no_descriptor``,
    ``test_listener_closed_just_after_an_answer_always_wakes_its_loop_and_stops``,
    ``test_listener_closed_from_another_thread_under_load_logs_nothing_and_cuts_no_answer``.
    """

    def __init__(self, map: Any) -> None:
        self._turn = threading.Lock()  # pull or close, one at a time
        self._shut = False
        super().__init__(map)
        if os.name == "posix":
            os.set_blocking(cast(Any, self).trigger, False)  # the pipe's end pulls write to

    def _physical_pull(self) -> None:
        with self._turn:
            if not self._shut:
                with contextlib.suppress(BlockingIOError):
                    cast(Any, super())._physical_pull()

    def close(self) -> None:
        with self._turn:
            self._shut = True
            super().close()


class ListenerServer:
    """waitress's server (its other attributes pass through), with a ``close()`` that is safe
    from any thread.

    waitress's own close() shuts the listening socket and the trigger while the thread in
    ``run()`` goes on polling the connections left open: it never returns. The demo and the
    tests serve from one thread and close from another, so close() here lets the workers
    finish first (for up to 5 s), then has the serving thread close every socket itself,
    woken through the trigger, so that its loop ends. A worker still answering after that
    finds the trigger shut (``ListenerTrigger``).

    Tests: ``test_listener_closed_from_another_thread_stops_its_loop_and_workers_cleanly``,
    ``test_listener_closed_from_another_thread_under_load_logs_nothing_and_cuts_no_answer``.
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
        self._server.task_dispatcher.shutdown()
        serving = self._serving
        listening = [s for s in list(self._sockets.values()) if isinstance(s, BaseWSGIServer)]
        if serving is not None and serving != threading.get_ident() and listening:

            def stop() -> None:  # in the serving thread: with its map empty, its loop ends
                for dispatcher in list(self._sockets.values()):
                    with contextlib.suppress(OSError):
                        dispatcher.close()

            wake: Any = cast(Any, listening[0]).trigger  # the stubs have it wrong twice
            wake.pull_trigger(stop)
            self._stopped.wait(5)
        else:
            wasyncore.close_all(self._sockets)
        self._server.close()
