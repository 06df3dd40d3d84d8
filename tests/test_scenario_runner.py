"""The scenario runner: steps, failures that do not stop the run, expectations, the JSON document."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from vepc.cli import cli
from vepc.scenario import Scenario, run_scenario
from vepc.scenario import runner as runner_mod

MiB = 1 << 20
VM = ('[[vm]]\nname = "web"\nqemu = "-m 1G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=4M,prealloc=on '
      '-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0"\n')


def run(text: str, **kw):
    return run_scenario(Scenario.from_toml(text, "t.toml"), **kw)


def steps(*parts: str) -> str:
    return "".join(f"[[step]]\n{p}\n" for p in parts)


def test_a_failed_step_does_not_stop_the_run_and_the_exit_status_is_1():
    r = run('[host]\nepc = ["16M@0"]\n' + VM + steps('do = "shutdown"\nvm = "web"', 'do = "start"\nvm = "web"',
                                                    'do = "start"\nvm = "web"', 'do = "kill"\nvm = "web"'))
    assert [s.ok for s in r.steps] == [False, True, False, True]
    assert r.steps[0].error == "VM web is not running (stopped)"
    assert r.steps[2].error == "VM web is already running"
    assert r.exit_status == 1 and r.violations == []


def test_expect_error_turns_the_expected_failure_into_a_pass_and_checks_its_text():
    r = run('[host]\nepc = ["16M@0"]\n' + VM + steps(
        'do = "shutdown"\nvm = "web"\nexpect_error = "not running"',
        'do = "shutdown"\nvm = "web"\nexpect_error = "something else"',
        'do = "start"\nvm = "web"\nexpect_error = "anything"',
        'do = "kill"\nvm = "web"'))
    assert [s.ok for s in r.steps] == [True, False, False, True]
    assert r.steps[0].detail == "failed as expected: VM web is not running (stopped)"
    assert r.steps[1].error == "expected an error containing 'something else', got: VM web is not running (stopped)"
    assert r.steps[2].error == "expected an error containing 'anything', but the step succeeded"


def test_enclaves_on_the_host_and_in_a_guest_and_their_states():
    r = run('[host]\nepc = ["16M@0"]\n' + VM + steps(
        'do = "enclave"\nname = "h"\nsize = "64K"',
        'do = "enclave"\nvm = "web"\nname = "g"\nsize = "64K"',   # not started yet
        'do = "start"\nvm = "web"',
        'do = "enclave"\nvm = "web"\nname = "g"\nsize = "64K"',
        'do = "enclave"\nname = "h"\nsize = "64K"',                # the name is taken
        'do = "destroy"\nname = "g"',
        'do = "destroy"\nname = "g"',
        'do = "expect"\nenclave = "g"\nenclave_state = "destroyed"',
        'do = "expect"\nenclave = "h"',
        'do = "kill"\nvm = "web"',
        'do = "destroy"\nname = "h"'))
    assert [s.ok for s in r.steps] == [True, False, True, True, False, True, False, True, True, True, True]
    assert r.steps[1].error == "VM web is not running (stopped)"
    assert r.steps[4].error == "enclave h already exists"
    assert r.steps[6].error == "enclave g is destroyed (already destroyed)"
    doc = r.to_dict()
    assert [(e["name"], e["state"]) for e in doc["vms"][0]["enclaves"]] == [("g", "failed"), ("g", "destroyed")]
    assert doc["host_enclaves"][0]["state"] == "destroyed"
    assert doc["host"]["free_bytes"] == 16 * MiB


def test_expect_reports_every_mismatch():
    r = run('[host]\nepc = ["16M@0"]\n' + VM + steps(
        'do = "start"\nvm = "web"',
        'do = "expect"\nvm = "web"\nstate = "stopped"\nepc_committed_bytes = "8M"\nerror = "boom"',
        'do = "expect"\nfree_bytes = "12M"\nzombie_secs = 0',
        'do = "kill"\nvm = "web"'))
    assert r.steps[1].error == ("state: expected stopped, got running; epc_committed_bytes: expected 8388608 (8 MiB), "
                                "got 4194304 (4 MiB); error: expected to contain 'boom', got None")
    assert r.steps[2].ok and r.steps[2].detail == "free_bytes=12 MiB, zombie_secs=0"


def test_host_touch_and_pressure_reclaim_host_enclave_pages_only():
    r = run('[host]\nepc = ["8M@0"]\n' + steps(
        'do = "touch"\nname = "raw"\nsize = "2M"',
        'do = "pressure"\nname = "p"\nsize = "8M"',
        'do = "destroy"\nname = "p"',
        'do = "destroy"\nname = "raw"',
        'do = "expect"\nfree_bytes = "8M"'))
    assert [s.ok for s in r.steps] == [True] * 5
    assert "written out by the reclaimer" in r.steps[1].detail
    doc = r.to_dict()
    assert doc["host_vepc_users"] == [{"name": "raw", "state": "closed", "size": 2 * MiB, "epc_bytes": 0}]
    assert doc["steps"][1]["epc_by_owner"]["raw (host vepc)"] == 2 * MiB      # never reclaimed
    assert doc["steps"][1]["epc_by_owner"]["host enclaves"] < 6 * MiB        # the pressure's own went out
    assert r.to_dict()["event_totals"]["RECLAIM_EWB"] > 0


def test_a_host_without_kvm_fails_to_initialize_kvm_at_start():
    r = run('[host]\nepc = ["8M@0"]\nkvm = false\n' + VM + steps('do = "start"\nvm = "web"'))
    assert r.steps[0].error == "qemu-system-x86_64: failed to initialize kvm: No such file or directory"
    assert r.to_dict()["vms"][0]["state"] == "failed"


def test_check_every_step_fails_the_step_on_a_violation(monkeypatch):
    monkeypatch.setattr(runner_mod, "check", lambda kernel, processor, idle=False: ["page 7 is twice free"])
    r = run('[host]\nepc = ["8M@0"]\n' + steps('do = "expect"\nfree_bytes = "8M"'), check_every_step=True)
    assert r.steps[0].error == "invariants violated: page 7 is twice free"
    assert r.to_dict()["invariants"] == {"ok": False, "violations": ["page 7 is twice free"], "idle": True}


def test_an_internal_error_fails_the_step_and_the_run_goes_on(monkeypatch):
    def boom(self, step):
        raise KeyError("model defect")
    monkeypatch.setattr(runner_mod.ScenarioRunner, "_do_pressure", boom)
    r = run('[host]\nepc = ["8M@0"]\n' + steps('do = "pressure"\nsize = "1M"', 'do = "expect"\nfree_bytes = "8M"'))
    assert r.steps[0].error == "internal error: KeyError: 'model defect'" and r.steps[0].traceback
    assert r.steps[1].ok


def test_the_json_document_has_the_documented_keys_and_is_one_object(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[host]\nepc = ["8M@0", "8M@1"]\n' + VM + steps(
        'do = "start"\nvm = "web"', 'do = "enclave"\nvm = "web"\nname = "e"\nsize = "64K"',
        'do = "enclave"\nname = "h"\nsize = "64K"'))
    result = CliRunner().invoke(cli, ["run", str(path), "--json"])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)                         # exactly one JSON object, nothing else
    assert set(doc["host"]) >= {"epc_bytes", "free_bytes", "zombie_secs", "sections"}
    assert [set(s) >= {"base", "size", "node", "free_bytes"} for s in doc["host"]["sections"]] == [True, True]
    v = doc["vms"][0]
    assert set(v) >= {"name", "state", "error", "epc_committed_bytes", "query_sgx", "enclaves"}
    assert v["state"] == "running" and v["epc_committed_bytes"] == 4 * MiB
    assert v["query_sgx"]["sections"] == [{"node": 0, "size": 4 * MiB}]
    for e in v["enclaves"] + doc["host_enclaves"]:
        assert set(e) >= {"name", "mrenclave", "mrsigner", "state", "error"}
    assert [set(s) >= {"index", "do", "ok", "error"} for s in doc["steps"]] == [True] * 3
    assert set(doc["invariants"]) >= {"ok", "violations"}
    assert isinstance(doc["events"], int) and doc["events"] > 0


def test_the_same_scenario_gives_the_same_document():
    text = '[host]\nepc = ["8M@0"]\n' + VM + steps('do = "start"\nvm = "web"', 'do = "pressure"\nsize = "6M"',
                                                  'do = "reset"\nvm = "web"', 'do = "kill"\nvm = "web"')
    a, b = run(text), run(text)
    assert a.to_dict() == b.to_dict()
    assert list(a.machine.events) == list(b.machine.events)


@pytest.mark.parametrize("size", ["1", "2K"])
def test_synthetic_enclaves_must_hold_a_tcs_and_its_ssa(size):
    from vepc.scenario import ScenarioError
    with pytest.raises(ScenarioError, match="size must be at least 8192 bytes"):
        Scenario.from_toml(steps(f'do = "enclave"\nname = "e"\nsize = "{size}"'))


def test_scenario_module_doctests():
    import doctest
    import importlib

    for name in ("vepc.scenario", "vepc.scenario.spec", "vepc.scenario.runner", "vepc.scenario.synthetic",
                 "vepc.observe.recorder", "vepc.observe.timeline", "vepc.observe.report", "vepc.observe.pictures",
                 "vepc.observe.progress", "vepc.pytest_plugin", "vepc.demo"):
        assert doctest.testmod(importlib.import_module(name)).failed == 0, name
