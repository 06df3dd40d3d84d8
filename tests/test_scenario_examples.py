"""Every example scenario runs with its expected exit status and key JSON values ([Product] acceptance)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from vepc.cli import cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors"
MiB = 1 << 20


def run_json(path: Path, *extra: str) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, ["run", str(path), "--json", *extra])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, json.loads(result.stdout)


def vm(doc: dict, name: str) -> dict:
    return next(v for v in doc["vms"] if v["name"] == name)


def check_seed_story(doc: dict) -> None:
    steps = {s["index"]: s for s in doc["steps"]}
    assert "written out by the reclaimer" in steps[5]["detail"] and "VM pages unchanged" in steps[5]["detail"]
    assert steps[7]["detail"] == "SGX_IOC_VEPC_REMOVE_ALL returned [1, 0]"
    assert "zombie SECS: 1 made, 1 freed" in steps[11]["detail"]
    assert doc["event_totals"]["RECLAIM_EWB"] > 0
    assert doc["event_totals"]["VEPC_ZOMBIE"] == doc["event_totals"]["VEPC_ZOMBIE_FREED"] == 1
    # During the pressure the VMs kept exactly their EPC (read from the event stream).
    assert steps[5]["epc_by_owner"]["web"] == steps[5]["epc_by_owner"]["db"] == 4 * MiB
    assert [e["state"] for e in vm(doc, "web")["enclaves"]] == ["lost", "lost"]
    assert doc["host"]["free_bytes"] == doc["host"]["epc_bytes"] == 32 * MiB


def check_lazy(doc: dict) -> None:
    lazy = vm(doc, "lazy")
    assert lazy["state"] == "failed" and lazy["error"] == "error: kvm run failed Bad address"
    assert doc["steps"][2]["detail"].startswith("failed as expected")
    assert doc["event_totals"]["RECLAIM_EWB"] > 0                    # host pages went first


def check_no_reclaim(doc: dict) -> None:
    second = vm(doc, "second")
    assert second["state"] == "failed"
    assert second["error"] == "qemu-system-x86_64: qemu_prealloc_mem: preallocating memory failed: Bad address"
    assert doc["host_vepc_users"][0]["state"] == "killed"


def check_old_kernel(doc: dict) -> None:
    assert doc["host"]["kernel"] == "5.15"
    assert doc["steps"][2]["detail"].endswith("no SGX_IOC_VEPC_REMOVE_ALL (ENOTTY)")
    assert [e["state"] for e in vm(doc, "app")["enclaves"]] == ["lost", "lost"]


def check_forgotten(doc: dict) -> None:
    assert [s["ok"] for s in doc["steps"]] == [True, False, True]
    assert doc["steps"][1]["error"] == "free_bytes: expected 16777216 (16 MiB), got 12582912 (12 MiB)"
    assert doc["invariants"] == {"ok": True, "violations": [], "idle": False}
    assert vm(doc, "forgotten")["epc_committed_bytes"] == 4 * MiB


def check_shared(doc: dict) -> None:
    mre = "784acfd7d5096a8f0fbd3265760bff21b120f62407a9a9e5ba31aa3c8ed198fc"
    assert doc["host_enclaves"][0]["mrenclave"] == mre
    assert vm(doc, "guest")["enclaves"][0]["mrenclave"] == mre
    assert vm(doc, "guest")["enclaves"][0]["mrsigner"] == \
        "fb4bab3d6036ac1d730fa83d7366df1dd2dfeac194ef335d6854d8a6c6475542"


def check_seed_rfc_v2(doc: dict) -> None:
    assert doc["host"]["kernel"] == "rfc-v2"
    steps = {s["index"]: s for s in doc["steps"]}
    assert "VM pages unchanged" in steps[5]["detail"]
    assert steps[7]["detail"].endswith("no SGX_IOC_VEPC_REMOVE_ALL (ENOTTY)")     # no ioctl in the seed's fops
    assert "zombie SECS: 1 made, 1 freed" in steps[10]["detail"]
    assert doc["host"]["free_bytes"] == doc["host"]["epc_bytes"] == 32 * MiB


def check_cgroup_limits(doc: dict) -> None:
    cg = {c["path"]: c for c in doc["cgroups"]}
    assert vm(doc, "web")["error"].endswith("preallocating memory failed: Bad address")
    assert cg["/vms/web"]["max"] == 16 * MiB and cg["/vms/web"]["events_max_local"] == 1
    assert cg["/vms"]["events_max_local"] == 1 and cg["/vms"]["events_max"] == 2     # its own + web's
    assert cg["/apps"]["peak"] == 8 * MiB and cg["/apps"]["current"] <= 8 * MiB
    assert "written out by the reclaimer" in doc["steps"][7]["detail"]
    # a column per cgroup after each step, read from the event stream
    by_cg = [s["epc_by_cgroup"] for s in doc["steps"]]
    assert by_cg[2]["/vms/web"] == 12 * MiB and by_cg[-1]["/vms"] == 44 * MiB
    assert by_cg[-1]["/"] == sum(by_cg[-1][p] for p in ("/vms", "/apps"))


def check_oversubscription(doc: dict) -> None:
    steps = doc["steps"]
    assert steps[1]["detail"].startswith("EXPERIMENT: 16 MiB of host EPC released (24 -> 8 MiB committed)")
    assert steps[3]["epc_by_owner"]["b"] == 20 * MiB and steps[3]["epc_by_owner"]["free"] == 4 * MiB
    assert steps[6]["detail"] == "failed as expected: error: kvm run failed Bad address"
    assert doc["event_totals"]["VEPC_BALLOON"] == 4096


CASES = {
    "cgroup_limits.toml": (0, check_cgroup_limits),
    "oversubscription.toml": (0, check_oversubscription),
    "seed_rfc_v2.toml": (0, check_seed_rfc_v2),
    "seed_story.toml": (0, check_seed_story),
    "lazy_guest_efault.toml": (0, check_lazy),
    "no_reclaim_for_vms.toml": (0, check_no_reclaim),
    "old_kernel_reset.toml": (0, check_old_kernel),
    "forgotten_vm.toml": (1, check_forgotten),
    "shared_test_enclave.toml": (0, check_shared),
}


def test_every_example_scenario_has_a_test():
    fleets = {"fleet.toml"}                                     # `vepc fleet` input: tests/test_fleet.py
    assert sorted(p.name for p in EXAMPLES.glob("*.toml") if p.name not in fleets) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_example_runs_with_its_exit_status_and_key_values(name):
    if name == "shared_test_enclave.toml" and not VECTORS.is_dir():
        pytest.skip(f"test vectors not found at {VECTORS}")
    status, check = CASES[name]
    code, doc = run_json(EXAMPLES / name)
    assert code == status, [s for s in doc["steps"] if not s["ok"]]
    assert doc["exit_status"] == status and doc["ok"] is (status == 0)
    assert doc["invariants"]["ok"]
    check(doc)


def test_check_every_step_passes_on_the_seed_story():
    code, doc = run_json(EXAMPLES / "seed_story.toml", "--check-every-step")
    assert code == 0 and all(s["ok"] for s in doc["steps"])
