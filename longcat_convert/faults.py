"""Crash and pause points for the fault-tolerance tests.

`LONGCAT_CONVERT_KILL_AT=N` makes the process SIGKILL itself when it reaches its N-th crash point, so a
test can stop a conversion at an exact place (mid-shard, between shards, before the index, before the
manifest, around the final rename) without timing games. `LONGCAT_CONVERT_TRACE=1` prints each crash
point to stderr so a test can count them.

`LONGCAT_CONVERT_PAUSE_AT=TEXT` with `LONGCAT_CONVERT_PAUSE_DIR=DIR` makes the first crash point whose
label contains TEXT write `DIR/paused` (the pid and the label) and wait until `DIR/go` exists, so a test
can act at an exact point of a live run (create DST, start a rival run) without sleeps. A run left paused
for 5 minutes kills itself. Unset (always, outside tests), a crash point costs two dictionary lookups.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

PAUSE_LIMIT_SECONDS = 300.0

_reached = 0
_paused = False


def crash_point(label: str) -> None:
    """A place a test may stop or pause the process at (see the module docstring)."""
    global _reached
    pause_at = os.environ.get("LONGCAT_CONVERT_PAUSE_AT")
    if pause_at is not None and pause_at in label:
        _pause(label)
    target = os.environ.get("LONGCAT_CONVERT_KILL_AT")
    if target is None:
        return
    _reached += 1
    if os.environ.get("LONGCAT_CONVERT_TRACE"):
        print(f"crash point {_reached}: {label}", file=sys.stderr, flush=True)
    if _reached == int(target):
        os.kill(os.getpid(), signal.SIGKILL)


def _pause(label: str) -> None:
    global _paused
    if _paused:
        return
    _paused = True
    folder = Path(os.environ["LONGCAT_CONVERT_PAUSE_DIR"])
    announce = folder / "paused.tmp"
    announce.write_text(f"{os.getpid()} {label}\n")
    os.replace(announce, folder / "paused")
    deadline = time.monotonic() + PAUSE_LIMIT_SECONDS
    while not (folder / "go").exists():
        if time.monotonic() > deadline:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.01)
