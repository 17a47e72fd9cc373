"""Progress on the terminal while a command works: tqdm bars on stderr, each naming its stage.

Library code reports through `stage`, `steps` and `counter`; they cost nothing and print nothing unless
a command turned reporting on with `reporting(...)`. Commands do that when stderr is a terminal and
`-q` was not given (`wanted`), so pipes, logs and the Python API stay silent. `scope` prefixes the
names of the stages inside it ("long: segment 2/12: denoising").
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TextIO, TypeVar

T = TypeVar("T")
REFRESH_SECONDS = 1.0  # how often a stage without steps redraws its elapsed time


@dataclass(frozen=True)
class _Reporter:
    stream: TextIO
    prefix: str = ""


_current: ContextVar[_Reporter | None] = ContextVar("longcat_progress", default=None)


def wanted(quiet: bool, stream: TextIO | None = None) -> bool:
    """Show progress: not asked to be quiet and the stream (default stderr) is a terminal."""
    stream = stream or sys.stderr
    return not quiet and bool(getattr(stream, "isatty", lambda: False)())


def active() -> bool:
    return _current.get() is not None


@contextlib.contextmanager
def reporting(enabled: bool, stream: TextIO | None = None) -> Iterator[None]:
    """Turn reporting on (to `stream`, default stderr) or off for the block."""
    token = _current.set(_Reporter(stream or sys.stderr) if enabled else None)
    try:
        yield
    finally:
        _current.reset(token)


@contextlib.contextmanager
def scope(label: str) -> Iterator[None]:
    """Name the stages inside the block `label: <stage>`."""
    reporter = _current.get()
    if reporter is None:
        yield
        return
    token = _current.set(replace(reporter, prefix=f"{reporter.prefix}{label}: "))
    try:
        yield
    finally:
        _current.reset(token)


def _bar(reporter: _Reporter, label: str, **kwargs):
    from tqdm import tqdm

    return tqdm(desc=reporter.prefix + label, file=reporter.stream, leave=False, dynamic_ncols=True, **kwargs)


@contextlib.contextmanager
def stage(label: str) -> Iterator[None]:
    """One line `label [elapsed]` while the block runs (kept fresh once a second), gone afterwards."""
    reporter = _current.get()
    if reporter is None:
        yield
        return
    bar = _bar(reporter, label, total=None, bar_format="{desc} [{elapsed}]")
    done = threading.Event()

    def refresh() -> None:
        while not done.wait(REFRESH_SECONDS):
            bar.refresh()

    ticker = threading.Thread(target=refresh, name="longcat-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        bar.close()


def steps(items: Iterable[T], total: int, label: str) -> Iterator[T]:
    """`items` with a bar `label k/total` (rate and time left) while they are consumed."""
    reporter = _current.get()
    if reporter is None:
        yield from items
        return
    with _bar(reporter, label, total=total, unit="step") as bar:
        for item in items:
            yield item
            bar.update(1)


class _Silent:
    def update(self, amount: int) -> None:
        pass


@contextlib.contextmanager
def counter(total: int, label: str, unit: str = "B") -> Iterator:
    """A bar over `total` units (bytes by default); call `.update(n)` as work is done."""
    reporter = _current.get()
    if reporter is None:
        yield _Silent()
        return
    scaled = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    with _bar(reporter, label, total=total, unit=unit, **scaled) as bar:
        yield bar
