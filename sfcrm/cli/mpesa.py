"""``sfcrm mpesa``: STK Push collections."""

import re
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated

import typer

from sfcrm.cli.runtime import (
    MAX_INT,
    CsvOption,
    JsonOption,
    command,
    host_option,
    id_argument,
    port_option,
    started,
    text_cell,
    usage_error,
)
from sfcrm.errors import BatchError, ExitCode, SfcrmError, ValidationError
from sfcrm.wording import about, plural, verb

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sfcrm.cli.runtime import Runtime
    from sfcrm.models import MpesaPayment

app = typer.Typer(
    help="Request, resend, check and reconcile M-Pesa payments.", no_args_is_help=True
)

_DURATION = re.compile(r"\s*([0-9]+)\s*([smhd]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION = timedelta(days=3650)


def parse_duration(text: str) -> timedelta:
    """``90s``, ``2m``, ``1h``, ``1d``; a bare number is seconds; at most ten years."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValidationError("not a duration; use e.g. 90s, 2m, 1h", value=text)
    digits = match.group(1).lstrip("0") or "0"
    seconds = int(digits) * _UNITS[match.group(2)] if len(digits) < 20 else None
    if seconds is None or seconds > MAX_DURATION.total_seconds():
        raise ValidationError("a duration must be at most 3650d (ten years)", value=text)
    return timedelta(seconds=seconds)


def warn_if_not_safaricom(rt: "Runtime", phone: str) -> None:
    from sfcrm.phone import display, is_safaricom

    if not is_safaricom(phone):
        rt.warn(
            f"Note: {display(phone)} does not have a Safaricom prefix; the prompt reaches it only "
            "if the number was moved to Safaricom."
        )


PAYMENT_CSV = (
    "payment_id", "person_id", "person", "phone_number", "amount", "status", "settled_by",
    "receipt_number", "initiated_at", "completed_at", "payment_purpose", "account_reference",
    "refund_due", "resolution",
)  # fmt: skip


def _payments_table(
    rt: "Runtime", payments: "Sequence[MpesaPayment]", names: dict[int, str]
) -> None:
    from sfcrm.money import format_kes
    from sfcrm.phone import display
    from sfcrm.times import iso_in

    rt.table(
        ["id", "person", "name", "phone", "amount", "status", "receipt", "initiated", "purpose"],
        [
            [p.id, p.person_id, names.get(p.person_id, ""), display(p.phone_number),
             format_kes(p.amount), status_words(p), p.receipt_number or "",
             iso_in(p.initiated_at, rt.tz), p.payment_purpose]
            for p in payments
        ],
        wrap={"name", "purpose"}, empty="No payments found.",
    )  # fmt: skip


def _whose(payment_id: object, names: dict[int, str], person_ids: dict[int, int]) -> str:
    """``payment 7 (Achieng Otieno)``: a payment named with whose it is."""
    name = names.get(person_ids.get(payment_id, 0), "") if isinstance(payment_id, int) else ""
    return f"payment {payment_id} ({name})" if name else f"payment {payment_id}"


_SETTLED_BY = {"callback": "by callback", "query": "by query", "manual": "by hand"}


def status_words(payment: "MpesaPayment") -> str:
    """``completed by query``, ``unknown``, ``completed by callback (refund due)``."""
    text = payment.status
    if payment.settled_by:
        text += " " + _SETTLED_BY.get(payment.settled_by, f"by {payment.settled_by}")
    if payment.refund_due:
        text += " (refund due)"
    elif payment.refund_done_at is not None:
        text += " (refunded)"
    return text


def _payment_detail(rt: "Runtime", payment: "MpesaPayment") -> None:
    from rich.table import Table

    from sfcrm.payments import payment_json
    from sfcrm.phone import display

    table = Table(show_header=False, box=None)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    name = rt.people.names([payment.person_id]).get(payment.person_id or 0)
    for key, value in payment_json(payment, rt.tz).items():
        if key == "phone_number" and isinstance(value, str):
            value = display(value)
        table.add_row(text_cell(key), text_cell("" if value is None else value))
        if key == "person_id" and name:
            table.add_row(text_cell("person"), text_cell(name))
    rt.out.print(table)


@app.command("request")
def request(
    person: Annotated[str, typer.Option("--person", help="id, phone or email of the payer")],
    amount: Annotated[str, typer.Option("--amount", help="whole KES, 1 to 250000")],
    purpose: Annotated[str, typer.Option("--purpose", help="what the payment is for")],
    phone: Annotated[
        str | None, typer.Option("--phone", help="phone to prompt (default: the person's)")
    ] = None,
    allow_credit: Annotated[
        bool,
        typer.Option(
            "--allow-credit", help="ask for more than the person owes (the rest is their credit)"
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Send an STK Push: the person gets an M-Pesa PIN prompt on their phone.

    More than the person owes is refused unless --allow-credit; an archived person is never
    asked.

    Example: sfcrm mpesa request --person 0712345678 --amount 500 --purpose "Crew deposit"
    """
    with command(json_output) as rt:
        from sfcrm.phone import display

        payment = rt.payments.request(person, amount, purpose, phone, allow_credit=allow_credit)
        warn_if_not_safaricom(rt, payment.phone_number)
        doc = {
            "success": True,
            "payment_id": payment.id,
            "checkout_request_id": payment.checkout_request_id,
            "message": "STK push initiated successfully",
        }
        rt.emit(
            doc,
            lambda: rt.print(
                f"Payment {payment.id}: STK push sent to {display(payment.phone_number)} for KES "
                f"{payment.amount} (checkout {payment.checkout_request_id}); status "
                f"{payment.status}. Check it with `sfcrm mpesa status {payment.id}`."
            ),
        )


@app.command("resend")
def resend(
    ctx: typer.Context,
    payment_ids: Annotated[list[int] | None, id_argument("payment ids")] = None,
    all_pending: Annotated[
        bool, typer.Option("--all-pending", help="every payment still pending")
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="push even when the last push's outcome is unknown"),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Push payments again. A completed payment never is; a pending one is first checked with
    Daraja and pushed only when its last push did not complete.

    Example: sfcrm mpesa resend 12 13
    """
    if bool(payment_ids) == all_pending:
        raise usage_error(ctx, "give payment ids or --all-pending (one of the two)")
    with command(json_output) as rt:
        from sfcrm.batch import BatchResult

        ids = rt.payments.pending_ids() if all_pending else list(payment_ids or [])
        result = BatchResult(("payment_id",))
        errors: list[SfcrmError] = []
        for pid in ids:
            try:
                report = rt.payments.resend(pid, force=force)
            except SfcrmError as exc:
                errors.append(exc)
                result.add("not_pushed", str(exc), payment_id=pid)
                rt.say(about(f"payment {pid}", str(exc)))
                if exc.hint:
                    rt.say(f"Hint: {exc.hint}")
                continue
            result.add("pushed" if report.pushed else "already_paid", report.message,
                       payment_id=pid)  # fmt: skip
            rt.say(f"payment {pid}: {report.message} (status {report.payment.status})")
        rt.emit(
            result.json(rt.redact),
            lambda: rt.summary(
                f"Resend: {result.count('pushed')} pushed, {result.count('already_paid')} "
                f"already paid, {len(errors)} not pushed."
            ),
        )
        if len(errors) == 1 and len(ids) == 1:
            raise typer.Exit(int(errors[0].exit_code))
        if errors:
            raise BatchError(
                f"{len(errors)} of {plural(len(ids), 'payment')} "
                f"{verb(len(errors), 'was', 'were')} not pushed"
            )


@app.command("status")
def status(
    payment_id: Annotated[int | None, id_argument("one payment's id")] = None,
    status_filter: Annotated[
        str | None, typer.Option("--status", help="initiated, pending, completed, failed, ...")
    ] = None,
    person: Annotated[str | None, typer.Option("--person", help="id, phone or email")] = None,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="ask Daraja about pending payments first")
    ] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="rows to show")] = 50,
    offset: Annotated[int, typer.Option("--offset", min=0, max=MAX_INT, help="rows to skip")] = 0,
    csv_output: CsvOption = False,
    json_output: JsonOption = False,
) -> None:
    """Show one payment, or a filtered list (newest first).

    Example: sfcrm mpesa status --status pending --refresh
    """
    with command(json_output, csv_output) as rt:
        from sfcrm.payments import payment_json

        if payment_id is not None:
            if refresh:
                for problem in rt.payments.refresh([payment_id]):
                    rt.warn(f"refresh: {problem}")
            payment = rt.payments.get(payment_id)
            one = payment_json(payment, rt.tz)
            rt.emit(
                one, lambda: _payment_detail(rt, payment), csv=PAYMENT_CSV,
                csv_rows=[{**one, "person": rt.people.names([payment.person_id]).get(
                    payment.person_id or 0)}],
            )  # fmt: skip
            return
        payments = rt.payments.find(
            status=status_filter, person_ref=person, limit=limit, offset=offset
        )
        if refresh:
            for problem in rt.payments.refresh([p.id for p in payments if p.id is not None]):
                rt.warn(f"refresh: {problem}")
            payments = rt.payments.find(
                status=status_filter, person_ref=person, limit=limit, offset=offset
            )
        names = rt.people.names(p.person_id for p in payments)
        docs = [payment_json(p, rt.tz) for p in payments]
        rt.emit(
            docs, lambda: _payments_table(rt, payments, names), csv=PAYMENT_CSV,
            csv_rows=[{**d, "person": names.get(d["person_id"])} for d in docs],
        )  # fmt: skip


@app.command("reconcile")
def reconcile(
    older_than: Annotated[
        str, typer.Option("--older-than", help="only pushes at least this old (90s, 2m, 1h)")
    ] = "2m",
    json_output: JsonOption = False,
) -> None:
    """Settle stale pending payments by STK Push Query, and act on stored callbacks.

    Safe to run from cron: every result is applied once.

    Example: sfcrm mpesa reconcile --older-than 5m
    """
    with command(json_output) as rt:
        from sfcrm.payments import payment_json

        age = parse_duration(older_than)
        report = rt.payments.reconcile(age)
        doc = {
            "checked": report.checked,
            "settled": [payment_json(p, rt.tz) for p in report.settled],
            "still_pending": report.still_pending,
            "callbacks_applied": report.callbacks_applied,
            "unknown_outcome": report.unqueryable,
            "not_settled": [
                {"payment_id": pid, "reason": rt.redact(why)} for pid, why in report.unsettled
            ],
            "unmatched_paid_callbacks": report.unmatched_paid,
            "errors": [rt.redact(e) for e in report.errors],
        }

        person_ids = {p.id: p.person_id for p in report.settled if p.id is not None}
        person_ids.update(rt.payments.person_ids([pid for pid, _ in report.unsettled]))
        names = rt.people.names(person_ids.values())

        def render() -> None:
            for p in report.settled:
                rt.print(f"{_whose(p.id, names, person_ids)}: {p.status}")
            for pid, why in report.unsettled:
                rt.print(f"{_whose(pid, names, person_ids)}: not settled: {why}")
            for e in report.errors:
                rt.say(f"error: {e}")
            if report.unmatched_paid:
                rt.print(
                    "'paid' callbacks no payment has taken (see `sfcrm mpesa callbacks "
                    "--unmatched`): " + ", ".join(str(i) for i in report.unmatched_paid)
                )
            rt.summary(
                f"Reconcile: {report.checked} checked, {len(report.settled)} settled, "
                f"{len(report.still_pending)} still pending, "
                f"{len(report.unsettled)} not settled, "
                f"{plural(report.callbacks_applied, 'stored callback')} applied, "
                f"{plural(len(report.unmatched_paid), 'unmatched paid callback')}, "
                f"{plural(len(report.errors), 'error')}."
            )

        rt.emit(doc, render)
        if report.errors:
            raise BatchError(f"{plural(len(report.errors), 'payment')} could not be checked")


@app.command("resolve")
def resolve(
    payment_id: Annotated[int, id_argument("the payment's id")],
    outcome: Annotated[
        str, typer.Option("--as", help="completed, failed or cancelled", show_default=False)
    ],
    reason: Annotated[
        str, typer.Option("--reason", help="why, for the audit log", show_default=False)
    ],
    receipt: Annotated[
        str | None,
        typer.Option("--receipt", help="the M-Pesa receipt number (with --as completed)"),
    ] = None,
    accept_paid_amount: Annotated[
        bool,
        typer.Option(
            "--accept-paid-amount",
            help="for a payment in review: credit what was actually paid, not what was asked",
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Settle by hand a payment no callback or query can: unknown, pending past its prompt,
    or in review. Daraja is asked first (STK Push Query) and a resolution it contradicts is
    refused; --as completed takes the amount off the balance once.

    Example: sfcrm mpesa resolve 7 --as completed --receipt TH3AB7XY9K --reason "on the statement"
    """
    with command(json_output) as rt:
        from sfcrm.money import format_cents
        from sfcrm.payments import payment_json

        done = rt.payments.resolve(
            payment_id, outcome=outcome.strip().lower(), reason=reason, receipt=receipt,
            accept_paid_amount=accept_paid_amount,
        )  # fmt: skip
        credited = None if done.credited_cents is None else format_cents(done.credited_cents)
        doc = {
            **payment_json(done.payment, rt.tz),
            "resolved_from": done.before,
            "amount_credited": credited,
            "balance_after": (
                None if done.balance_after_cents is None else format_cents(done.balance_after_cents)
            ),
            "daraja": rt.redact(done.daraja),
        }

        def render() -> None:
            from sfcrm.money import balance_words

            p = done.payment
            line = f"Payment {p.id}: {done.before} -> {p.status}, resolved by hand"
            if p.receipt_number and credited is not None:
                line += f" (receipt {p.receipt_number}); KES {credited} credited"
                if done.balance_after_cents is not None:
                    line += f", balance now {balance_words(done.balance_after_cents)}"
            rt.print(line + ".")
            rt.say(f"Checked with Daraja: {done.daraja}")

        rt.emit(doc, render)


@app.command("refund-done")
def refund_done(
    payment_id: Annotated[int, id_argument("the payment's id")],
    reason: Annotated[str, typer.Option("--reason", help="how it was refunded, for the audit log")],
    json_output: JsonOption = False,
) -> None:
    """Record a refund made outside sfcrm for a payment paid twice (flagged refund due).

    Example: sfcrm mpesa refund-done 7 --reason "KES 500 sent back by M-Pesa, ref TK1AB2CD3E"
    """
    with command(json_output) as rt:
        from sfcrm.payments import payment_json

        payment = rt.payments.refund_done(payment_id, reason=reason)
        rt.emit(
            payment_json(payment, rt.tz),
            lambda: rt.print(f"Payment {payment.id}: refund recorded as done; no refund is due."),
        )


@app.command("callbacks")
def callbacks(
    unmatched: Annotated[
        bool, typer.Option("--unmatched", help="only callbacks no payment claims")
    ] = False,
    outcome: Annotated[
        str | None,
        typer.Option(
            "--outcome",
            help="received, applied, duplicate, ignored, unmatched, needs_query, needs_review,"
            " refund_due, rejected or error",
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="rows to show")] = 50,
    csv_output: CsvOption = False,
    json_output: JsonOption = False,
) -> None:
    """List stored callbacks (the inbox), newest first.

    Example: sfcrm mpesa callbacks --unmatched
    """
    with command(json_output, csv_output) as rt:
        from sfcrm.models import CallbackOutcome
        from sfcrm.payments import callback_json

        rows = rt.payments.callbacks(
            outcome=CallbackOutcome.UNMATCHED if unmatched else outcome, limit=limit
        )
        docs = [callback_json(r, rt.tz) for r in rows]

        keys = ("id", "received_at", "source_addr", "checkout_request_id", "result_code",
                "outcome", "detail")  # fmt: skip

        def render() -> None:
            rt.table(
                ["id", "received", "from", "checkout", "code", "outcome", "detail"],
                [["" if d[k] is None else d[k] for k in keys] for d in docs],
                wrap={"detail"}, empty="No callbacks found.",
            )  # fmt: skip

        rt.emit(docs, render, csv=(*keys, "payment_id", "size"))


@app.command("emulator")
def emulator(
    port: Annotated[int, port_option()] = 8900,
    host: Annotated[str, host_option()] = "127.0.0.1",
    callback_delay: Annotated[
        float,
        typer.Option(
            "--callback-delay", min=0, max=600, help="seconds before the callback is posted"
        ),
    ] = 3.0,
    json_output: JsonOption = False,
) -> None:
    """Run a local Daraja emulator for training and demos (never Safaricom's money).

    Point sfcrm at it with MPESA_BASE_URL=http://127.0.0.1:8900. The test phone numbers that
    choose each outcome are listed in the README. Under --json it prints one line with its
    address once it is listening.

    Example: sfcrm mpesa emulator --port 8900
    """
    with command(json_output) as rt:
        from sfcrm.emulator import SANDBOX_SHORTCODE, DarajaEmulator, EmulatorSettings
        from sfcrm.errors import ConfigError

        try:
            server = DarajaEmulator(
                EmulatorSettings(callback_delay=callback_delay), host=host, port=port
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        rt.emit(
            started("emulator", server.url, shortcode=SANDBOX_SHORTCODE),
            lambda: rt.say(
                f"Daraja emulator on {server.url} (shortcode 174379, sandbox passkey). "
                "Ctrl-C stops it."
            ),
            now=True,
        )
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            rt.say("Stopped.")
            stopped = True
        else:
            stopped = False
        finally:
            server.stop()
        if stopped:
            raise typer.Exit(int(ExitCode.INTERRUPTED))
