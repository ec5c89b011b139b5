"""The long-running commands (``serve-callback``, ``mpesa emulator``) as an office runs them:
the same start-up line under --json, and Ctrl-C ends them with exit 130 like any command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import free_port

from sfcrm.errors import ExitCode


def start(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[str], dict]:
    process = subprocess.Popen(
        [sys.executable, "-m", "sfcrm", *args, "--json"],
        env={**os.environ, **env},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    text = ""
    try:
        while True:  # one JSON document, printed once it listens
            line = process.stdout.readline()
            assert line, process.stderr.read() if process.stderr else "no output"
            text += line
            try:
                return process, json.loads(text)
            except json.JSONDecodeError:
                continue
    except BaseException:  # it never listened: leave no server behind
        process.kill()
        process.wait()
        raise


@pytest.mark.parametrize("which", ["serve-callback", "emulator"])
def test_a_server_prints_one_start_up_shape_and_ctrl_c_ends_it_with_130(
    which: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {"SFCRM_DATABASE_URL": str(tmp_path / "office.db")}
    if which == "serve-callback":
        env["MPESA_CALLBACK_URL"] = f"http://127.0.0.1:{port}/cb/{'ab' * 16}"
        args = ["serve-callback", "--port", str(port)]
    else:
        args = ["mpesa", "emulator", "--port", str(port)]
    process, doc = start(args, env, tmp_path)
    try:
        assert set(doc) == {"service", "listening", "pid", "details"}
        assert doc["service"] == which
        assert doc["listening"] == f"http://127.0.0.1:{port}"
        assert doc["pid"] == process.pid
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == int(ExitCode.INTERRUPTED) == 130
    assert "Traceback" not in err


def test_a_guessable_callback_path_is_warned_of_on_stderr_under_json(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "SFCRM_DATABASE_URL": str(tmp_path / "office.db"),
        "MPESA_CALLBACK_URL": f"http://127.0.0.1:{port}/callback/",
    }
    process, doc = start(["serve-callback", "--port", str(port)], env, tmp_path)
    try:
        assert doc["service"] == "serve-callback"
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130
    assert out == ""  # the start-up document was all of stdout
    assert err.startswith("Warning: the path of MPESA_") and "looks guessable" in err
