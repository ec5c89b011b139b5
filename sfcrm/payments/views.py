"""What ``--json`` prints of a payment and of a stored callback."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sfcrm.money import format_kes
from sfcrm.times import iso_in

if TYPE_CHECKING:
    from zoneinfo import ZoneInfo

    from sfcrm.models import MpesaCallback, MpesaPayment


def payment_json(payment: MpesaPayment, tz: ZoneInfo) -> dict[str, Any]:
    return {
        "payment_id": payment.id,
        "status": payment.status,
        "amount": format_kes(payment.amount),
        "receipt_number": payment.receipt_number,
        "completed_at": iso_in(payment.completed_at, tz),
        "person_id": payment.person_id,
        "phone_number": payment.phone_number,
        "payment_purpose": payment.payment_purpose,
        "account_reference": payment.account_reference,
        "checkout_request_id": payment.checkout_request_id,
        "merchant_request_id": payment.merchant_request_id,
        "result_code": payment.result_code,
        "result_desc": payment.result_desc,
        "transaction_date": iso_in(payment.transaction_date, tz),
        "initiated_at": iso_in(payment.initiated_at, tz),
        "push_count": payment.push_count,
        "refund_due": payment.refund_due,
        "settled_by": payment.settled_by,
        "resolved_at": iso_in(payment.resolved_at, tz),
        "resolution": payment.resolution,
        "refund_done_at": iso_in(payment.refund_done_at, tz),
    }


def callback_json(row: MpesaCallback, tz: ZoneInfo) -> dict[str, Any]:
    return {
        "id": row.id,
        "received_at": iso_in(row.received_at, tz),
        "source_addr": row.source_addr,
        "checkout_request_id": row.checkout_request_id,
        "result_code": row.result_code,
        "outcome": row.outcome,
        "detail": row.detail,
        "payment_id": row.payment_id,
        "size": len(row.body),
    }
