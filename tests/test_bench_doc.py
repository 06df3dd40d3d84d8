"""docs/performance.md is `vepc bench --markdown` of one full run, never edited by hand (issue [Bench
honesty]); the resident-memory figure is measured, not declared."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from vepc.bench.cli import bench
from vepc.bench.doc import load_run, render_markdown
from vepc.bench.figures import _child, populate_rate

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"


def test_performance_doc_is_exactly_what_its_embedded_full_run_renders():
    run = load_run(str(DOC))
    assert run["run"]["mode"] == "full" and run["run"]["repeats"] >= 5
    assert DOC.read_text(encoding="utf-8") == render_markdown(run)


def test_performance_doc_states_every_limit_in_one_line_and_each_goal():
    run = load_run(str(DOC))
    text = DOC.read_text(encoding="utf-8")
    for f in run["figures"]:
        assert f"- **{f['name'].replace('|', chr(92) + '|')}**: {f['limit_what']}\n" in text
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| {f['name'].replace('|', chr(92) + '|')} |"))
        assert row.endswith("| ok |" if f["meets"] else "| MISSED |"), row
    assert "(not in this run)" not in text


def test_from_json_renders_a_saved_run_and_refuses_what_is_not_one(tmp_path):
    run = load_run(str(DOC))
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(run))
    r = CliRunner().invoke(bench, ["--from-json", str(saved), "--markdown"])
    assert r.exit_code == 0 and r.stdout == render_markdown(run)
    bad = tmp_path / "bad.json"
    bad.write_text('{"figures": 3}')
    r = CliRunner().invoke(bench, ["--from-json", str(bad)])
    assert r.exit_code == 2 and r.output.startswith(f"vepc: {bad}: not a bench run")


def test_resident_memory_is_measured_with_four_vms_and_guest_kernels_holding_all_epc():
    r = _child(["memory", "256M"], 120)             # a fresh interpreter: its RSS growth is the model's
    assert r["pages"] == 65536
    assert abs(r["total"] - (r["host"] + r["vms"])) < 1e-9
    # at least the rows that must be resident once all EPC is committed: the kernel's flags and ring
    # (5 B), and per VM page its page array, PTE and EPT entries (20 B)
    assert r["total"] >= 25


def test_populate_limit_measures_the_kernel_populating_fresh_memory():
    assert populate_rate(4096) > 0
