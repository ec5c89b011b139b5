"""The one service the CLI, the listener, the demo and the tests use."""

from __future__ import annotations

from sfcrm.payments.pushes import Pushes
from sfcrm.payments.reconcile import Reconcile
from sfcrm.payments.resolve import Resolve


class Payments(Pushes, Reconcile, Resolve):
    """Everything the office does with M-Pesa payments: request and resend (``pushes``), the
    callback inbox (``inbox``), reconcile (``reconcile``), resolving by hand (``resolve``),
    reading payments (``base``), each applying outcomes through
    :func:`~sfcrm.payments.outcome.apply_result`. Dependencies are passed in (see
    :class:`~sfcrm.payments.base.PaymentsBase`)."""
