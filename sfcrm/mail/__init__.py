"""Email: building messages, the backends that deliver them, and the mail log.

The rules:

- every email is written to the log (``email_notification``) as the exact bytes to send, inside
  the caller's transaction, before anything is sent;
- a sender *claims* an email in its own short transaction before sending it, locking the row
  and skipping one another sender holds, so two runs at once (threads or processes, on SQLite
  or PostgreSQL, ``crew remind`` or ``mail retry`` from cron) never deliver one email twice; no
  transaction spans an SMTP call;
- an email may have been delivered only once its message data went to the server (SMTP's
  DATA): a send that ended after that without the server's answer is logged as failed and
  retried only when named by id, and so is a claim that expired without a result (the sender
  died mid-send); anything that went wrong before DATA (connecting, TLS, the login, MAIL FROM,
  RCPT, Ctrl-C, even a bug) is an ordinary failure that ``mail retry`` sends again;
- one SMTP connection carries a whole batch; when the server cannot be reached, the rest of the
  batch is logged as failed at once instead of connecting again for each email;
- the run that writes an email holds it until it has tried it, renewing its hold while it sends
  and letting go when it ends, so an email written, never tried and held by nobody is
  *queued*: its writer is gone, and ``mail retry`` sends it at once;
- permanent refusals (SMTP 5xx) are not retried unless named; a refused login stops the batch;
- settings that cannot work (an unknown EMAIL_BACKEND, a password smtplib cannot send, a mail
  folder that cannot be written) are a ConfigError before any email is written: the Mailer
  checks them before the first email it writes;
- no stored or logged error ever holds the SMTP password.

One concern a module: :mod:`~sfcrm.mail.message` builds the bytes,
:mod:`~sfcrm.mail.backends` and :mod:`~sfcrm.mail.smtp` deliver them,
:mod:`~sfcrm.mail.settings` picks the backend, :mod:`~sfcrm.mail.claims` holds an email's
state and its moves, :mod:`~sfcrm.mail.sender` is the :class:`Mailer` over them all.
"""

from sfcrm.mail.backends import Backend, ConsoleBackend, FileBackend
from sfcrm.mail.claims import DEFAULT_LEASE, MAYBE_DELIVERED
from sfcrm.mail.errors import MAX_ERROR, SendError, one_line
from sfcrm.mail.message import Attachment, build_message, clean_subject, validate_address
from sfcrm.mail.sender import (
    Mailer,
    Outgoing,
    Progress,
    SendReport,
    looks_no_reply,
    notification_json,
)
from sfcrm.mail.settings import backend_from_settings, outbox_folder
from sfcrm.mail.smtp import SmtpBackend, classify_smtp_error
from sfcrm.models import INTERRUPTED

__all__ = [
    "DEFAULT_LEASE",
    "INTERRUPTED",
    "MAX_ERROR",
    "MAYBE_DELIVERED",
    "Attachment",
    "Backend",
    "ConsoleBackend",
    "FileBackend",
    "Mailer",
    "Outgoing",
    "Progress",
    "SendError",
    "SendReport",
    "SmtpBackend",
    "backend_from_settings",
    "build_message",
    "classify_smtp_error",
    "clean_subject",
    "looks_no_reply",
    "notification_json",
    "one_line",
    "outbox_folder",
    "validate_address",
]
