"""The callback listener: Daraja's STK results and the crew's RSVP pages, over waitress.

- ``callbacks``: the WSGI app (``CallbackApp``) and the worker that confirms a 'paid' by query
  (``ConfirmWorker``).
- ``rsvp_pages``: the crew's confirm/decline pages (``RsvpPages``).
- ``crew_pages``: each crew member's own page and calendar feed (``CrewPages``).
- ``rate``: the bounded rate of page requests per address (``PageRate``).
- ``checkpoint``: WAL checkpoints after a burst of callbacks (``WalCheckpointer``).
- ``listener``: the app on a socket, with its connection limits (``ConnectionLimits``,
  ``AddressGate``, ``make_server``).
- ``waitress_fixes``: every place the listener changes waitress's own behaviour.
- ``networks``: addresses and the networks they are checked against.

Nothing here imports waitress until ``make_server`` is called.
"""

from sfcrm.server.callbacks import ACCEPTED, CallbackApp, ConfirmWorker
from sfcrm.server.checkpoint import WalCheckpointer
from sfcrm.server.crew_pages import CrewPages
from sfcrm.server.listener import AddressGate, ConnectionLimits, make_server
from sfcrm.server.networks import LOOPBACK
from sfcrm.server.rate import PageRate
from sfcrm.server.rsvp_pages import RSVP_MAX_BODY, RSVP_PREFIX, RsvpPages

__all__ = [
    "ACCEPTED",
    "LOOPBACK",
    "RSVP_MAX_BODY",
    "RSVP_PREFIX",
    "AddressGate",
    "CallbackApp",
    "ConfirmWorker",
    "ConnectionLimits",
    "CrewPages",
    "PageRate",
    "RsvpPages",
    "WalCheckpointer",
    "make_server",
]
