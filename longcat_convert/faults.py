"""Crash points for the fault-tolerance tests.

`LONGCAT_CONVERT_KILL_AT=N` makes the process SIGKILL itself when it reaches its N-th checkpoint, so a
test can stop a conversion at an exact place (mid-shard, between shards, before the index, before the
manifest, around the final rename) without timing games. `LONGCAT_CONVERT_TRACE=1` prints each
checkpoint to stderr so a test can count them. Unset (always, outside tests), a checkpoint costs a
dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import sys

_reached = 0


def checkpoint(label: str) -> None:
    global _reached
    target = os.environ.get("LONGCAT_CONVERT_KILL_AT")
    if target is None:
        return
    _reached += 1
    if os.environ.get("LONGCAT_CONVERT_TRACE"):
        print(f"checkpoint {_reached}: {label}", file=sys.stderr, flush=True)
    if _reached == int(target):
        os.kill(os.getpid(), signal.SIGKILL)
