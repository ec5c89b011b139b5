"""``sfcrm demo``: the office's two jobs on embedded defaults, in a folder of its own.

It starts the Daraja emulator and the callback listener on free loopback ports, adds a person
with a balance, requests a payment and waits for the callback; then creates an event, puts the
person on it, sends the invitation (an ``.eml`` file in the folder's outbox) and confirms through
the RSVP link in that email, over HTTP like a phone would. No configuration and no network
beyond 127.0.0.1.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sfcrm.errors import SfcrmError
from sfcrm.models import Event, MpesaPayment, PaymentStatus, Person

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
    event: Event
    crew_status: str
    email_path: Path
    rsvp_url: str
    seconds: float


def run_demo(
    folder: Path,
    *,
    progress: Callable[[str], None] = lambda _: None,
    timeout: float = 30.0,
    callback_delay: float = 1.0,
) -> DemoResult:
    import email
    import email.policy
    import re
    import socket
    from datetime import timedelta

    import requests

    from sfcrm.config import load_settings
    from sfcrm.emulator import SANDBOX_PASSKEY, SANDBOX_SHORTCODE, DarajaEmulator, EmulatorSettings
    from sfcrm.server import CallbackApp, make_server
    from sfcrm.services import Services

    started = time.monotonic()
    emulator = DarajaEmulator(EmulatorSettings(callback_delay=callback_delay)).start()
    services: Services | None = None
    server = None
    app: CallbackApp | None = None
    try:
        progress(f"Daraja emulator listening on {emulator.url}")
        with socket.socket() as probe:  # a free loopback port for the listener, named up front
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        listener_url = f"http://127.0.0.1:{port}"
        path = "/callback/" + secrets.token_urlsafe(24)
        settings = load_settings(
            environ={
                "SFCRM_DATABASE_URL": str(folder / "sfcrm.db"),
                "MPESA_BASE_URL": emulator.url,
                "MPESA_CONSUMER_KEY": "demo-consumer-key",
                "MPESA_CONSUMER_SECRET": "demo-consumer-secret",
                "MPESA_BUSINESS_SHORT_CODE": SANDBOX_SHORTCODE,
                "MPESA_PASS_KEY": SANDBOX_PASSKEY,
                "MPESA_TIMEOUT": "10",
                "MPESA_CALLBACK_URL": listener_url + path,
                "SFCRM_PUBLIC_URL": listener_url,
                "SFCRM_SECRET_KEY": secrets.token_urlsafe(32),
                "SFCRM_LISTENER_THREADS": "4",
                "EMAIL_BACKEND": "file",
                "EMAIL_FILE_PATH": str(folder / "outbox"),
                "DEFAULT_FROM_EMAIL": "Sound Fusion <office@soundfusion.invalid>",
                "SFCRM_ORG_NAME": "Sound Fusion",
                "SFCRM_ORG_PHONE": "0700000000",
                "SFCRM_ORG_EMAIL": "office@soundfusion.invalid",
                "SFCRM_TIMEZONE": "Africa/Nairobi",
            },
            files=False,
        )
        services = Services(settings)
        app = services.callback_app()
        server = make_server(
            app, "127.0.0.1", port, settings.listener_threads,
            limits=services.listener_limits(),
        )  # fmt: skip
        threading.Thread(target=server.run, name="sfcrm-demo-listener", daemon=True).start()
        progress(f"callback listener on {listener_url}/callback/<secret>")
        people, payments, crew = services.people, services.payments, services.crew

        # 1. collect money
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
        progress(
            f"payment {payment.id} {payment.status}; balance now KES {after.balance_cents // 100}"
        )

        # 2. run the crew
        tomorrow = (datetime.now(services.tz) + timedelta(days=1)).date().isoformat()
        event = services.events.add(
            "Safari Rally Gala", tomorrow, "KICC, Nairobi", time="18:00", end_time="23:30",
            details="Load-in from 14:00. Black clothes.",
        )  # fmt: skip
        assert event.id is not None
        row = crew.assign(event.id, str(person.id), "Sound Engineer", notes="Bring the DI boxes")
        assert row.crew.id is not None
        run = services.crew_mail.invite(assignment_ids=[row.crew.id])
        if not run.sent:
            raise SfcrmError("the demo's invitation could not be written")
        [email_path] = sorted((folder / "outbox").glob("*.eml"))
        progress(f"invitation for {event.name} written to {email_path}")
        message = email.message_from_bytes(email_path.read_bytes(), policy=email.policy.default)
        body = message.get_body(("plain",))
        assert body is not None
        found = re.search(r"(http://\S+/crew/rsvp/\S+)", body.get_content())
        if found is None:
            raise SfcrmError("the demo's invitation has no RSVP link")
        link = found.group(1)
        page = requests.get(link, timeout=10)
        answer = requests.post(link, data={"answer": "confirm"}, timeout=10)
        if page.status_code != 200 or answer.status_code != 200:
            raise SfcrmError("the RSVP page did not answer", value=f"HTTP {answer.status_code}")
        confirmed = crew.get(row.crew.id)
        progress(f"confirmed through the RSVP link: {confirmed.crew.status}")
        return DemoResult(
            folder=folder,
            emulator_url=emulator.url,
            listener_url=listener_url,
            person_before=person,
            person_after=after,
            payment=payment,
            event=event,
            crew_status=confirmed.crew.status,
            email_path=email_path,
            rsvp_url=link,
            seconds=time.monotonic() - started,
        )
    finally:
        if server is not None:
            server.close()
        if app is not None:
            app.stop()  # its threads work on the database closed below
        emulator.stop()
        if services is not None:
            services.close()
