"""The listener's changes to waitress itself (sfcrm/server/waitress_fixes.py), each over a real
loopback socket: every test here fails when the override it names is taken out."""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import closing, suppress

import pytest
import requests
from support import (
    Listener,
    closed_by_server,
    connect_from,
    paid_callback,
    read_answer,
    request_head,
    status_of,
    wait_for,
)

from sfcrm.db import Database
from sfcrm.emulator import EmulatorSettings
from sfcrm.models import MpesaCallback, Person
from sfcrm.payments import Payments
from sfcrm.server import CallbackApp, ConnectionLimits, make_server


@pytest.fixture
def emulator_settings() -> EmulatorSettings:
    # Settled at once, callbacks withheld: the tests post every callback themselves.
    return EmulatorSettings(callback_delay=0, prompt_seconds=1.0, send_callbacks=False)


def stored_callbacks(db: Database) -> int:
    from sqlmodel import func, select

    with db.read() as session:
        return int(session.exec(select(func.count()).select_from(MpesaCallback)).one())


# -- ClientErrorTask: 400, not 501, for a Transfer-Encoding waitress does not know -------------


@pytest.mark.parametrize(
    "encoding", ["gzip", "deflate", "identity", "gzip, chunked", "chunked, gzip", "x-custom"]
)
def test_unsupported_transfer_encoding_is_400_not_501(
    listener: Listener, payments: Payments, person_with_balance: Person, db: Database,
    encoding: str,
) -> None:  # fmt: skip
    target = payments.request(str(person_with_balance.id), 500, "Crew deposit")
    body = json.dumps(paid_callback(target.checkout_request_id)).encode()
    request = request_head(listener.path, Transfer_Encoding=encoding, Connection="close")
    request += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)

    with socket.create_connection(("127.0.0.1", listener.server.effective_port), timeout=5) as s:
        s.sendall(request)
        answer = read_answer(s, time.monotonic() + 5)

    assert status_of(answer) == 400
    assert b"Transfer-Encoding" in answer
    assert stored_callbacks(db) == 0
    assert listener.post(body).status_code == 200
    assert payments.get(target.id or 0).status == "completed"


# -- ListenerChannel: a deadline on each request, a place at the per-address gate -------------


def _answer_on(sock: socket.socket, request: bytes) -> int:
    """Send one request on a kept-alive connection; the status of its whole answer."""
    sock.settimeout(5)
    sock.sendall(request)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, "the listener closed the connection instead of answering"
        received += chunk
    head, body = received.split(b"\r\n\r\n", 1)
    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length"))
                 .split(b":")[1])  # fmt: skip
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split()[1])


def _refused_from(source: str, port: int) -> bool:
    """The listener closed a new connection from ``source`` at once (it may even reset it
    before connect() has returned)."""
    try:
        sock = connect_from(source, port)
    except ConnectionResetError:
        return True
    with closing(sock):
        return closed_by_server(sock, 1.0)


GET_ANY = b"GET /anything HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def test_connection_trickling_its_headers_is_closed_at_the_deadline_however_often_it_sends(
    open_listener: Callable[..., Listener],
) -> None:
    running = open_listener(limits=ConnectionLimits(request_seconds=1.0))
    port = running.server.effective_port
    began = time.monotonic()
    with (
        closing(connect_from("127.0.0.2", port)) as slow,
        closing(connect_from("127.0.0.2", port)) as idle,
    ):
        slow.sendall(b"GET /anything HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        closed = False
        while not closed and time.monotonic() - began < 5:
            with suppress(OSError):
                slow.sendall(b"a")  # a byte every 0.1 s: never silent for long
            closed = closed_by_server(slow, 0.1)
        trickled_for = time.monotonic() - began
        assert closed_by_server(idle, 0.5)  # one that never sent a byte went the same way
    assert closed, "a connection sending a byte every 0.1 s was kept open for 5 s"
    assert 1.0 <= trickled_for < 2.5


def test_kept_alive_connection_is_not_cut_while_its_requests_come_in_time(
    open_listener: Callable[..., Listener],
) -> None:
    running = open_listener(limits=ConnectionLimits(request_seconds=1.0))
    with closing(connect_from("127.0.0.2", running.server.effective_port)) as sock:
        for _ in range(4):  # 2.4 s on one connection: the clock restarts after each answer
            assert _answer_on(sock, GET_ANY) == 404
            assert not closed_by_server(sock, 0.6)
        assert _answer_on(sock, GET_ANY) == 404


def test_kept_alive_connection_is_not_cut_when_its_answer_beats_the_loop_to_the_next_look(
    open_listener: Callable[..., Listener], monkeypatch: pytest.MonkeyPatch
) -> None:
    from waitress.channel import HTTPChannel

    take_in = HTTPChannel.received

    def lingering(channel: HTTPChannel, data: bytes) -> bool:
        done = take_in(channel, data)
        time.sleep(0.05)  # the loop is slow to come back: the worker answers meanwhile
        return done

    monkeypatch.setattr(HTTPChannel, "received", lingering)
    running = open_listener(limits=ConnectionLimits(request_seconds=1.0))
    with closing(connect_from("127.0.0.2", running.server.effective_port)) as sock:
        for _ in range(3):  # each answer restarts the clock, however quick it was
            assert _answer_on(sock, GET_ANY) == 404
            assert not closed_by_server(sock, 0.6)
        assert _answer_on(sock, GET_ANY) == 404


def test_loop_does_not_spin_while_workers_answer_kept_alive_clients(
    payments: Payments, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression: a worker sends its answer itself, holding the connection's output lock.
    # waitress called that connection writable meanwhile, so once anything woke the loop its
    # poll returned at once, its flush found the lock taken, and it went round again: with a
    # hundred kept-alive clients the loop took the interpreter from the workers it waited for.
    from waitress import wasyncore
    from waitress.channel import HTTPChannel

    passes = [0]
    poll = wasyncore.poll2

    def counted(timeout: float = 0.0, map: object = None) -> None:
        passes[0] += 1
        poll(timeout, map)

    sending = threading.Event()
    flush = HTTPChannel._flush_some

    def slow_send(channel: HTTPChannel, do_close: bool = True) -> bool:
        if threading.current_thread().name.startswith("waitress-") and not sending.is_set():
            sending.set()
            time.sleep(0.3)  # a worker sending its answer, the output lock held
        return bool(flush(channel, do_close=do_close))

    monkeypatch.setattr(wasyncore, "poll2", counted)
    monkeypatch.setattr(HTTPChannel, "_flush_some", slow_send)
    server = make_server(CallbackApp(payments, callback_path=None), "127.0.0.1", 0, 1)
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    port = server.effective_port
    try:
        with closing(socket.create_connection(("127.0.0.1", port), timeout=5)) as first:
            first.sendall(GET_ANY)
            assert sending.wait(5)
            before = passes[0]
            # another client arrives meanwhile: the loop wakes up to take it
            with closing(socket.create_connection(("127.0.0.1", port), timeout=5)) as second:
                assert _answer_on(first, b"") == 404
                looped = passes[0] - before
                assert _answer_on(second, GET_ANY) == 404
    finally:
        server.close()
        serving.join(timeout=5)
    assert looped < 50, f"the loop went round {looped} times while one answer was sent"


def test_connections_over_the_per_address_cap_are_closed_at_once_and_others_still_served(
    open_listener: Callable[..., Listener],
) -> None:
    running = open_listener(limits=ConnectionLimits(per_address=3))
    port = running.server.effective_port
    gate = running.server.gate
    held = [connect_from("127.0.0.2", port) for _ in range(3)]
    try:
        wait_for(lambda: gate.held("127.0.0.2") == 3, timeout=5)
        assert _refused_from("127.0.0.2", port)
        with closing(connect_from("127.0.0.3", port)) as other:  # another address: served
            assert _answer_on(other, GET_ANY) == 404
        local = [connect_from("127.0.0.1", port) for _ in range(5)]  # a proxy on this host
        for sock in local:
            assert _answer_on(sock, GET_ANY) == 404
            sock.close()
        assert _answer_on(held[0], GET_ANY) == 404  # those within the cap work as ever
        held.pop().close()
        wait_for(lambda: gate.held("127.0.0.2") == 2, timeout=5)
        held.append(connect_from("127.0.0.2", port))  # a place came free
        assert _answer_on(held[-1], GET_ANY) == 404
    finally:
        for sock in held:
            sock.close()


# -- listener_channel(): a connection gone before it is set up ---------------------------------


def test_connection_gone_before_it_is_set_up_leaves_the_listener_serving(
    open_listener: Callable[..., Listener], monkeypatch: pytest.MonkeyPatch
) -> None:
    from waitress.channel import HTTPChannel

    set_up = HTTPChannel.__init__
    resets: list[object] = []

    def reset_once(channel: HTTPChannel, *args: object, **options: object) -> None:
        if not resets:  # what a peer that resets at once makes some systems' getsockopt() say
            resets.append(channel)
            raise ConnectionResetError(54, "Connection reset by peer")
        set_up(channel, *args, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(HTTPChannel, "__init__", reset_once)
    running = open_listener()
    port = running.server.effective_port

    with closing(connect_from("127.0.0.2", port)) as gone:
        assert closed_by_server(gone, 2.0)
    with closing(connect_from("127.0.0.2", port)) as next_one:
        assert _answer_on(next_one, GET_ANY) == 404
    assert len(resets) == 1
    wait_for(lambda: running.server.gate.held("127.0.0.2") == 0, timeout=5)


# -- ListenerServer: close() from any thread -------------------------------------------------


def test_listener_closed_from_another_thread_stops_its_loop_and_workers_cleanly(
    payments: Payments, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: waitress's close() from another thread (the tests' fixtures, the demo) left
    # the serving thread selecting forever on the connections still open, and a worker then
    # wrote to the closed trigger's descriptor ("Exception when servicing", EBADF), which by
    # then could be another file's; at times the serving thread died of EBADF.
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    for _ in range(30):
        server = make_server(CallbackApp(payments, callback_path="/cb/x"), "127.0.0.1", 0, 2)
        serving = threading.Thread(target=server.run, daemon=True)
        serving.start()
        with requests.Session() as kept_alive:  # a connection still open when it closes
            answer = kept_alive.get(f"http://127.0.0.1:{server.effective_port}/", timeout=5)
            assert answer.status_code == 404
            server.close()
            serving.join(timeout=5)
        assert not serving.is_alive()
    assert died == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_listener_closed_just_after_an_answer_always_wakes_its_loop_and_stops(
    payments: Payments,
) -> None:
    # Regression: close() had the serving thread close the trigger's pipe, and the wake-up a
    # worker sends after each answer could make it do so before close() had written its own
    # byte to that pipe: about one close in 30 failed with EBADF (or wrote into whatever file
    # had taken the descriptor).
    for _ in range(300):
        server = make_server(CallbackApp(payments, callback_path="/cb/x"), "127.0.0.1", 0, 2)
        serving = threading.Thread(target=server.run, daemon=True)
        serving.start()
        with socket.create_connection(("127.0.0.1", server.effective_port), timeout=5) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert status_of(sock.recv(65536)) == 404
            server.close()
        serving.join(timeout=5)
        assert not serving.is_alive()


def test_a_wake_up_after_the_listener_closed_writes_to_no_descriptor(payments: Payments) -> None:
    # A worker wakes the loop through the trigger after each answer. One still answering when
    # close() has shut the trigger's pipe wrote to its closed descriptor: EBADF, or a byte in
    # whatever pipe, socket or database file had taken the number since.
    for _ in range(20):
        server = make_server(CallbackApp(payments, callback_path=None), "127.0.0.1", 0, 2)
        serving = threading.Thread(target=server.run, daemon=True)
        serving.start()
        with closing(socket.create_connection(("127.0.0.1", server.effective_port))) as sock:
            assert _answer_on(sock, GET_ANY) == 404
            server.close()
        serving.join(timeout=5)
        others = [os.pipe() for _ in range(4)]  # take the numbers the listener gave back
        try:
            server.pull_trigger()  # what that worker does once its answer is written
            for read_end, _ in others:
                os.set_blocking(read_end, False)
                with pytest.raises(BlockingIOError):
                    os.read(read_end, 1)
        finally:
            for pipe in others:
                for end in pipe:
                    os.close(end)


def _next_answer(sock: socket.socket, pending: bytes) -> tuple[str, bytes]:
    """Read one whole answer: ("answered", what came after it), or how the connection ended
    instead: "closed" before a byte of the answer (a reset too: the kernel resets a
    connection it queued for a listener that closed, or one holding unread requests), "cut"
    in the middle of it, "hung" when nothing more came for 5 s."""
    received = pending
    while True:
        head, sep, rest = received.partition(b"\r\n\r\n")
        if sep:
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            if len(rest) >= length:
                return "answered", rest[length:]
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return "hung", b""
        except ConnectionError:
            chunk = b""
        if not chunk:
            return ("cut" if received else "closed"), b""
        received += chunk


def test_listener_closed_from_another_thread_under_load_logs_nothing_and_cuts_no_answer(
    payments: Payments, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The tests' listeners, the demo's and serve-callback's are closed while clients still
    # ask: no thread may fail or log an error then (a descriptor that waitress writes to after
    # it was closed fails with EBADF, or lands in whatever file took its number), and every
    # client gets whole answers until its connection is closed.
    caplog.set_level(logging.INFO)  # waitress logs an exception in a loop task at INFO
    died: list[object] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    monkeypatch.setattr(sys, "unraisablehook", lambda raised: died.append(raised.exc_value))
    requests_ = [GET_ANY, b"GET /crew/rsvp/x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"]
    outcomes: Counter[str] = Counter()
    counted = threading.Lock()

    def client(port: int, stop: threading.Event) -> None:
        rng = random.Random()
        while not stop.is_set():
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            except OSError:  # the listener is gone
                return
            with sock:
                pending = b""
                for _ in range(rng.randint(1, 6)):  # kept alive, sometimes pipelined
                    asked = rng.randint(1, 3)
                    try:
                        sock.sendall(b"".join(rng.choice(requests_) for _ in range(asked)))
                    except OSError:
                        outcome = "closed"
                    for _ in range(asked):
                        outcome, pending = _next_answer(sock, pending)
                        with counted:
                            outcomes[outcome] += 1
                        if outcome != "answered":
                            break
                    if outcome != "answered":
                        break

    for _ in range(40):
        server = make_server(CallbackApp(payments, callback_path=None), "127.0.0.1", 0, 4)
        serving = threading.Thread(target=server.run, daemon=True)
        serving.start()
        stop = threading.Event()
        clients = [
            threading.Thread(target=client, args=(server.effective_port, stop), daemon=True)
            for _ in range(16)
        ]
        for thread in clients:
            thread.start()
        before = outcomes["answered"]
        wait_for(lambda before=before: outcomes["answered"] > before + 30, interval=0.001)
        server.close()  # requests in flight, more coming
        serving.join(timeout=5)
        stop.set()
        for thread in clients:
            thread.join(timeout=10)
        assert not serving.is_alive()
        assert not any(thread.is_alive() for thread in clients)

    assert died == []
    assert [
        r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info
    ] == []
    assert [r.getMessage() for r in caplog.records if "exception" in r.getMessage()] == []
    assert set(outcomes) <= {"answered", "closed"}, outcomes
    assert outcomes["closed"] > 0
