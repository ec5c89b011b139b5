"""``sfcrm demo``: the whole payment flow on embedded defaults, in a throw-away folder.

It starts the Daraja emulator and the callback listener on free loopback ports, adds a person
with a balance, requests a payment, waits for the callback, and reports the result. No
configuration and no network beyond 127.0.0.1.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sfcrm.errors import SfcrmError
from sfcrm.models import MpesaPayment, PaymentStatus, Person

DEMO_PHONE = "254708374149"  # Safaricom's sandbox test phone: the emulator pays it
DEMO_BALANCE = "1500"
DEMO_AMOUNT = 500


@dataclass
class DemoResult:
    folder: Path
    emulator_url: str
    listener_url: str
    person_before: Person
    person_after: Person
    payment: MpesaPayment
    seconds: float


def run_demo(
    folder: Path,
    *,
    progress: Callable[[str], None] = lambda _: None,
    timeout: float = 30.0,
    callback_delay: float = 1.0,
) -> DemoResult:
    import requests

    from sfcrm.daraja import DarajaClient
    from sfcrm.db import Database
    from sfcrm.emulator import SANDBOX_PASSKEY, SANDBOX_SHORTCODE, DarajaEmulator, EmulatorSettings
    from sfcrm.payments import DatabaseTokenCache, Payments
    from sfcrm.people import People
    from sfcrm.server import CallbackApp, make_server

    started = time.monotonic()

    def clock() -> datetime:
        return datetime.now(UTC)

    db = Database(folder / "sfcrm.db")
    emulator = DarajaEmulator(EmulatorSettings(callback_delay=callback_delay)).start()
    server = None
    try:
        progress(f"Daraja emulator listening on {emulator.url}")
        client = DarajaClient(
            emulator.url,
            "demo-consumer-key",
            "demo-consumer-secret",
            SANDBOX_SHORTCODE,
            SANDBOX_PASSKEY,
            session=requests.Session(),
            timeout=10,
            clock=clock,
            token_cache=DatabaseTokenCache(db),
        )
        path = "/callback/" + secrets.token_urlsafe(24)
        payments = Payments(db, callback_url=None, clock=clock, client_factory=lambda: client)
        app = CallbackApp(payments, callback_path=path)
        server = make_server(app, "127.0.0.1", 0, threads=4)
        listener_url = f"http://127.0.0.1:{server.effective_port}"
        payments.callback_url = listener_url + path
        threading.Thread(target=server.run, name="sfcrm-demo-listener", daemon=True).start()
        progress(f"callback listener on {listener_url}/callback/<secret>")

        people = People(db, clock)
        person = people.add(
            "Demo Crew Member", DEMO_PHONE, "demo@soundfusion.invalid", DEMO_BALANCE
        )
        progress(f"added person {person.id}: {person.name}, owes KES {DEMO_BALANCE}")
        assert person.id is not None
        payment = payments.request(str(person.id), DEMO_AMOUNT, "Crew deposit")
        progress(
            f"payment {payment.id}: STK push accepted (checkout {payment.checkout_request_id}); "
            "waiting for the callback"
        )
        assert payment.id is not None
        deadline = time.monotonic() + timeout
        while payment.status in (PaymentStatus.INITIATED, PaymentStatus.PENDING):
            if time.monotonic() > deadline:
                raise SfcrmError(
                    "the demo's callback did not arrive in time",
                    hint="something on this machine blocks loopback connections",
                )
            time.sleep(0.1)
            payment = payments.get(payment.id)
        after = people.show(str(person.id))
        return DemoResult(
            folder=folder,
            emulator_url=emulator.url,
            listener_url=listener_url,
            person_before=person,
            person_after=after,
            payment=payment,
            seconds=time.monotonic() - started,
        )
    finally:
        if server is not None:
            server.close()
        emulator.stop()
        db.close()
