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
from datetime import UTC, datetime
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
    from datetime import timedelta
    from zoneinfo import ZoneInfo

    import requests

    from sfcrm.crew import Crew
    from sfcrm.crewmail import CrewMail, Org
    from sfcrm.daraja import DarajaClient
    from sfcrm.db import Database
    from sfcrm.emulator import SANDBOX_PASSKEY, SANDBOX_SHORTCODE, DarajaEmulator, EmulatorSettings
    from sfcrm.events import Events
    from sfcrm.mail import FileBackend, Mailer
    from sfcrm.payments import DatabaseTokenCache, Payments
    from sfcrm.people import People
    from sfcrm.render import Renderer
    from sfcrm.rsvp import make_token, rsvp_url
    from sfcrm.server import CallbackApp, RsvpPages, make_server

    started = time.monotonic()
    tz = ZoneInfo("Africa/Nairobi")

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
        secret_key = secrets.token_urlsafe(32)
        listener = {"url": ""}
        payments = Payments(db, callback_url=None, clock=clock, client_factory=lambda: client)
        renderer = Renderer(None)
        mailer = Mailer(
            db,
            lambda: FileBackend(folder / "outbox"),
            sender="Sound Fusion <office@soundfusion.invalid>",
            clock=clock,
        )
        org = Org("Sound Fusion", "0700000000", "office@soundfusion.invalid")
        crew = Crew(db, clock=clock, tz=tz, org=org)
        crew_mail = CrewMail(
            db,
            clock=clock,
            mailer=lambda: mailer,
            renderer=lambda: renderer,
            org=org,
            rsvp=lambda aid, bound_to, expires: rsvp_url(
                listener["url"], make_token(secret_key, aid, bound_to, expires, clock())
            ),
        )
        pages = RsvpPages(crew, renderer, secret_key=secret_key, clock=clock)
        app = CallbackApp(payments, callback_path=path, rsvp=pages)
        server = make_server(app, "127.0.0.1", 0, threads=4)
        listener["url"] = f"http://127.0.0.1:{server.effective_port}"
        payments.callback_url = listener["url"] + path
        threading.Thread(target=server.run, name="sfcrm-demo-listener", daemon=True).start()
        progress(f"callback listener on {listener['url']}/callback/<secret>")

        # 1. collect money
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
        progress(
            f"payment {payment.id} {payment.status}; balance now KES {after.balance_cents // 100}"
        )

        # 2. run the crew
        tomorrow = (datetime.now(tz) + timedelta(days=1)).date().isoformat()
        event = Events(db, clock, tz).add(
            "Safari Rally Gala", tomorrow, "KICC, Nairobi", time="18:00", end_time="23:30",
            details="Load-in from 14:00. Black clothes.",
        )  # fmt: skip
        assert event.id is not None
        row = crew.assign(event.id, str(person.id), "Sound Engineer", notes="Bring the DI boxes")
        assert row.crew.id is not None
        run = crew_mail.invite(assignment_ids=[row.crew.id])
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
            listener_url=listener["url"],
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
            app.stop()  # its threads work on the database closed below
        emulator.stop()
        db.close()
