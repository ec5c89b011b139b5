"""M-Pesa collections: request, resend, status, reconcile, and applying an outcome.

The rules that keep money right live here once, and the CLI, the callback listener and
``reconcile`` all go through them:

- the payment row is written before Daraja is called, and no transaction spans a Daraja call;
- every callback body is stored before it is acted on;
- :func:`apply_result` applies each push's outcome once, inside one write transaction that
  locks the push and its payment, and the balance moves only with ``balance_applied`` going
  from false to true (the ledger's unique index on the payment is the last guard);
- a payment whose money moved (:attr:`MpesaPayment.settled`) never goes back and is never
  pushed again;
- a push is never retried blindly: a pending payment is queried before it is pushed again.

One module per concern: ``outcome`` (applying a result, matching a "paid" to a push that got no
answer), ``inbox`` (storing, acting on and confirming callbacks), ``pushes`` (request and
resend), ``reconcile``, ``resolve`` (settling by hand), ``client`` (the Daraja client and its
token cache), ``views`` (JSON).
"""

from sfcrm.payments.client import DatabaseTokenCache, build_daraja_client
from sfcrm.payments.inbox import ACTIONABLE
from sfcrm.payments.outcome import (
    ADOPT_SKEW,
    ADOPT_WINDOW,
    CANCELLED_CODES,
    MIN_SHOWN_DIGITS,
    Applied,
    apply_result,
    query_as_result,
)
from sfcrm.payments.pushes import MAX_PURPOSE, PROMPT_LIFETIME, PushInterrupted, PushReport
from sfcrm.payments.reconcile import DEFAULT_RECONCILE_AGE, ReconcileReport
from sfcrm.payments.resolve import RESOLVED_AS, Resolution
from sfcrm.payments.service import Payments
from sfcrm.payments.views import callback_json, payment_json

__all__ = [
    "ACTIONABLE",
    "ADOPT_SKEW",
    "ADOPT_WINDOW",
    "CANCELLED_CODES",
    "DEFAULT_RECONCILE_AGE",
    "MAX_PURPOSE",
    "MIN_SHOWN_DIGITS",
    "PROMPT_LIFETIME",
    "RESOLVED_AS",
    "Applied",
    "DatabaseTokenCache",
    "Payments",
    "PushInterrupted",
    "PushReport",
    "ReconcileReport",
    "Resolution",
    "apply_result",
    "build_daraja_client",
    "callback_json",
    "payment_json",
    "query_as_result",
]
