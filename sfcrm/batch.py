"""The result of a batch command (``crew invite|remind|brief``, ``mail retry``, ``mpesa resend``):
one item for each assignment, email or payment it went through, each with its outcome, and the
counts. Every such command prints this one shape under ``--json``::

    {"results": [{"assignment_id": 12, "email_id": 40, "outcome": "sent", "message": null}],
     "counts": {"sent": 1}, "total": 1}

The outcome words are the ones the commands print in text, with ``_`` for a space:

- an email: ``sent`` (SMTP), ``written`` (a file in the outbox), ``printed`` (the console),
  ``failed``, ``queued`` (written, not tried yet), ``not_sent`` (written, then taken or tried
  by another sfcrm), ``not_retried`` (``mail retry`` left it alone), ``would_send``
  (``--dry-run``);
- an assignment no email was written for: ``skipped``;
- a payment: ``pushed``, ``already_paid`` (not pushed again), ``not_pushed`` (refused or
  failed).

``message`` says why (a reason, an error) or null when the outcome says it all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchItem", "BatchResult"]


@dataclass(frozen=True)
class BatchItem:
    """What a batch did with one assignment, email or payment."""

    outcome: str
    message: str | None = None
    email_id: int | None = None
    assignment_id: int | None = None
    payment_id: int | None = None


@dataclass
class BatchResult:
    """The items of one batch, in the order it went through them. ``keys`` names the ids each
    item shows before ``email_id`` (``assignment_id``; ``payment_id``)."""

    keys: tuple[str, ...]
    items: list[BatchItem] = field(default_factory=list)

    def add(self, outcome: str, message: str | None = None, **ids: int | None) -> None:
        self.items.append(BatchItem(outcome, message, **ids))

    def count(self, outcome: str) -> int:
        return sum(1 for item in self.items if item.outcome == outcome)

    @property
    def counts(self) -> dict[str, int]:
        """How many items had each outcome, in order of first appearance (none: left out)."""
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.outcome] = counts.get(item.outcome, 0) + 1
        return counts

    def json(self, redact: Callable[[str], str] = lambda text: text) -> dict[str, Any]:
        """The batch document; ``redact`` cleans each message (an error may quote a secret)."""
        keys = [*dict.fromkeys((*self.keys, "email_id"))]
        return {
            "results": [
                {
                    **{key: getattr(item, key) for key in keys},
                    "outcome": item.outcome,
                    "message": None if item.message is None else redact(item.message),
                }
                for item in self.items
            ],
            "counts": self.counts,
            "total": len(self.items),
        }
