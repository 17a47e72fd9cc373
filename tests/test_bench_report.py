"""The benchmark script's arithmetic: medians over rounds, ratios paired within a round, target verdicts."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_convert.py"


@pytest.fixture(scope="module")
def bench_module():
    spec = importlib.util.spec_from_file_location("bench_convert_under_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _bench(module, rounds: dict[str, list[tuple[float, float]]]):
    """A Bench holding (wall, sync) per round for each method of one depth-4 fp32 cold configuration."""
    bench = module.Bench(argparse.Namespace(repeat=len(next(iter(rounds.values())))))
    for method, runs in rounds.items():
        for index, (wall, sync) in enumerate(runs):
            run = module.Run(wall, sync, rss_mb=100.0 + index, rc=0)
            bench.rows.append(module.Row(4, "float32", method, "cold", 4 * 10**9, run, index))
    return bench


def test_medians_and_paired_ratios(bench_module) -> None:
    bench = _bench(bench_module, {"ours": [(10.0, 0.0), (30.0, 0.0), (12.0, 0.0)],
                                  "cp": [(5.0, 5.0), (6.0, 4.0), (20.0, 4.0)]})
    summaries = {s.method: s for s in bench_module.summarize(bench.rows)}
    assert summaries["ours"].durable == 12.0 and summaries["cp"].durable == 10.0  # medians, not means
    assert summaries["ours"].rss_mb == 102.0  # peak over the rounds
    assert bench_module.paired_ratios(bench.rows, 4, "float32", "cold") == [1.0, 3.0, 0.5]
    verdicts = "\n".join(bench_module.targets(bench))
    assert "durable, both + sync, medians): MET (ratios 1.20..1.20)" in verdicts


def test_a_slow_median_misses_the_target(bench_module) -> None:
    bench = _bench(bench_module, {"ours": [(16.0, 0.0), (17.0, 0.0), (9.0, 0.0)],
                                  "cp": [(5.0, 5.0), (5.0, 5.0), (5.0, 5.0)]})
    verdicts = "\n".join(bench_module.targets(bench))
    assert "durable, both + sync, medians): MISSED (ratios 1.60..1.60)" in verdicts
    assert "process wall, medians): MISSED (ratios 3.20..3.20)" in verdicts
    table = "\n".join(bench_module.results_table(bench))
    assert "0.90-1.70" in table  # the lowest and highest ours/cp ratio within a round
