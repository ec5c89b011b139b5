"""Helpers the tests share (importable as ``support``: the tests folder is on sys.path)."""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests

from sfcrm.payments import Payments
from sfcrm.server import CallbackApp, make_server

CONSUMER_KEY = "test-consumer-key"
CONSUMER_SECRET = "test-consumer-secret"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Listener:
    url: str  # the full callback URL, secret path included
    base: str  # http://127.0.0.1:PORT
    path: str
    app: CallbackApp
    server: Any

    def post(self, body: bytes | str | dict[str, Any], **kwargs: Any) -> requests.Response:
        data = json.dumps(body) if isinstance(body, dict) else body
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        return requests.post(self.url, data=data, headers=headers, timeout=10, **kwargs)


def start_listener(payments: Payments, **app_options: Any) -> Listener:
    path = "/cb/" + secrets.token_urlsafe(16)
    app = CallbackApp(payments, callback_path=path, **app_options)
    server = make_server(app, "127.0.0.1", 0, threads=8)
    threading.Thread(target=server.run, daemon=True).start()
    base = f"http://127.0.0.1:{server.effective_port}"
    payments.callback_url = base + path
    return Listener(url=base + path, base=base, path=path, app=app, server=server)


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll until predicate() is truthy; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
