"""Run one command and write its wall time, peak memory and exit code to a JSON file:
``python -S timed.py RESULT -- COMMAND...``.

The benchmark starts every measured process through this small one. Linux carries the peak
memory of the process a child was spawned from into the child's own peak (the old image counts
at ``exec``), so a child of the benchmark itself, large after filling a million rows, would
report the benchmark's size instead of its own. SIGTERM and SIGINT are passed on.
"""

import json
import os
import signal
import sys
import time


def main() -> int:
    result, separator, *cmd = sys.argv[1:]
    assert separator == "--" and cmd, "usage: timed.py RESULT -- COMMAND..."
    started = time.perf_counter()
    pid = os.posix_spawnp(cmd[0], cmd, os.environ)

    def forward(signum: int, _frame: object) -> None:
        os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    _, status, usage = os.wait4(pid, 0)
    elapsed = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    with open(result, "w") as out:
        json.dump({"seconds": elapsed, "kib": usage.ru_maxrss, "code": code}, out)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
