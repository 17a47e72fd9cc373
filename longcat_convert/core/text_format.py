"""Human-readable summaries shared by convert, inspect and validate."""

from __future__ import annotations

from .dtypes import friendly


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1000
    return f"{count:.2f} TB"


def census_lines(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]] | None = None) -> list[str]:
    lines = []
    dtypes = sorted(set(before) | set(after or {}))
    for dtype in dtypes:
        b = before.get(dtype, {"tensors": 0, "bytes": 0})
        text = f"  {friendly(dtype):>9}: {b['tensors']:>6} tensors {human_bytes(b['bytes']):>10}"
        if after is not None:
            a = after.get(dtype, {"tensors": 0, "bytes": 0})
            text += f"  ->  {a['tensors']:>6} tensors {human_bytes(a['bytes']):>10}"
        lines.append(text)
    return lines
