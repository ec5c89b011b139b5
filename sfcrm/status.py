"""The status values of payments and crew assignments, in a module of their own so that
commands which never load the ORM can use them."""

from __future__ import annotations


class PaymentStatus:
    INITIATED = "initiated"  # row written; the push was never sent
    PENDING = "pending"  # Daraja accepted the push; waiting for the outcome
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"  # 1031 / 1032
    NEEDS_REVIEW = "needs_review"  # paid, but not the amount asked for
    # the push is being sent, or was sent and its answer never recorded: it may be on the phone
    UNKNOWN = "unknown"

    ALL = (INITIATED, PENDING, COMPLETED, FAILED, CANCELLED, NEEDS_REVIEW, UNKNOWN)
    OPEN = (PENDING, UNKNOWN)


class CrewStatus:
    INVITED = "invited"
    CONFIRMED = "confirmed"
    DECLINED = "declined"
    COMPLETED = "completed"
    CANCELLED = "cancelled"  # the event was cancelled
    REMOVED = "removed"  # taken off the event by the office (`crew remove`)
    NO_SHOW = "no_show"  # confirmed, and did not turn up (`crew complete --no-show`)

    ALL = (INVITED, CONFIRMED, DECLINED, COMPLETED, CANCELLED, REMOVED, NO_SHOW)
    # the assignment holds the person's time: another event at that time clashes with it
    BOOKED = (INVITED, CONFIRMED, COMPLETED)
    # the assignment is over before its event: no email, answer or reminder for it any more
    CLOSED = (CANCELLED, REMOVED)
