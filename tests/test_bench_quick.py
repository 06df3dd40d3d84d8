"""``vepc bench --quick --json``: the report's shape (no timing asserts: CI machines vary)."""

from __future__ import annotations

import json
import math

from click.testing import CliRunner

from vepc.bench.cli import bench, format_table
from vepc.bench.figures import run_bench

KEYS = {"name", "value", "unit", "limit", "ratio", "goal"}


def test_quick_bench_json_has_every_figure_with_value_limit_ratio_and_goal():
    result = CliRunner().invoke(bench, ["--quick", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert set(out) == {"figures"}
    figures = out["figures"]
    assert len(figures) >= 15
    for f in figures:
        assert set(f) == KEYS, f
        assert isinstance(f["name"], str) and f["name"]
        assert isinstance(f["unit"], str) and isinstance(f["goal"], str)
        assert isinstance(f["value"], (int, float)) and not math.isnan(f["value"]), f
        if f["limit"] is not None:
            assert f["limit"] > 0 and f["ratio"] is not None
            assert math.isclose(f["ratio"], f["value"] / f["limit"], rel_tol=1e-9)
    names = " | ".join(f["name"] for f in figures)
    for needle in ("guest touch per page", "prealloc", "release", "enclave", "EWB + ELDU", "fault cost",
                   "bytes per EPC page", "boot", "VMs"):
        assert needle in names, needle


def test_table_lists_the_same_figures():
    result = run_bench(quick=True)
    table = format_table(result["_figures"]).splitlines()
    assert table[0].split()[:2] == ["figure", "value"]
    assert len(table) == 2 + len(result["figures"])
