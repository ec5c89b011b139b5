"""Shared fixtures. Every test runs isolated: no SFCRM_/MPESA_/EMAIL_ variable leaks in from
the machine, the working directory is a fresh tmp_path (so no real sfcrm.toml or .env is read)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

_PREFIXES = ("SFCRM_", "MPESA_", "EMAIL_", "DEFAULT_FROM_EMAIL")


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in list(os.environ):
        if name.startswith(_PREFIXES):
            monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
