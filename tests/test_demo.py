"""``vepc demo``: the built-in story runs, passes, and writes its folder (no timing assert: the suite's
runtime is bounded as a whole)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from vepc.cli import cli
from vepc.demo import DEMO_FILES, demo_scenario_toml, run_demo
from vepc.scenario import Scenario


def test_the_demo_writes_its_folder_and_every_step_passes(tmp_path):
    out = tmp_path / "demo"
    assert run_demo(out, quiet=True) == 0
    for name in DEMO_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    doc = json.loads((out / "report.json").read_text())
    assert doc["ok"] and all(s["ok"] for s in doc["steps"])
    assert doc["event_totals"]["VEPC_ZOMBIE"] == doc["event_totals"]["VEPC_ZOMBIE_FREED"] == 1
    assert doc["event_totals"]["RECLAIM_EWB"] > 0
    assert doc["event_totals"]["VEPC_REMOVE_ALL"] == 2
    assert (out / "epc.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "trace.json").read_text())["traceEvents"]
    # The scenario it wrote reruns as is.
    rerun = CliRunner().invoke(cli, ["run", str(out / "scenario.toml"), "--quiet"])
    assert rerun.exit_code == 0


def test_without_the_shared_vectors_a_synthetic_enclave_stands_in(monkeypatch, tmp_path):
    import vepc.demo as demo_mod

    monkeypatch.setattr(demo_mod, "default_vectors", lambda: tmp_path / "absent")
    text, what = demo_scenario_toml()
    assert what.startswith("a synthetic 64 KiB enclave")
    assert all(s.size == 64 << 10 for s in Scenario.from_toml(text).steps if s.do == "enclave")


def test_demo_with_a_missing_vectors_folder_is_bad_input(tmp_path):
    result = CliRunner().invoke(cli, ["demo", "--vectors", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.stderr == f"vepc: {tmp_path / 'none'}: test_enclave.sgxs/.sig not found\n"
