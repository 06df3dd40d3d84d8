"""`vepc fleet`: fleet files, the packing policies, running every host, locally and on Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vepc.fleet import FleetError, FleetSpec, pack, run_fleet

from cliutil import vepc

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fleet.toml"
MB = 1 << 20


def fleet(text: str) -> FleetSpec:
    return FleetSpec.from_toml(text, "f.toml")


TWO_HOSTS = '[[host]]\nepc = ["64M@0"]\ncount = 2\n[[vm]]\nname = "w"\nepc = "24M"\ncount = 5\n'


def test_first_fit_fills_the_first_host_before_the_next():
    f = fleet(TWO_HOSTS)
    p = pack(f.hosts, f.vms, "first-fit")
    assert {h: [v.name for v in vs] for h, vs in p.by_host.items()} == {"node-1": ["w-1", "w-2"],
                                                                     "node-2": ["w-3", "w-4"]}
    assert [v.name for v in p.refused] == ["w-5"]


def test_least_allocated_spreads_and_most_allocated_packs():
    f = fleet('[[host]]\nepc = ["64M@0"]\ncount = 2\n[[vm]]\nname = "w"\nepc = "16M"\ncount = 3\n')
    spread = pack(f.hosts, f.vms, "least-allocated").by_host
    packed = pack(f.hosts, f.vms, "most-allocated").by_host
    assert [len(spread["node-1"]), len(spread["node-2"])] == [2, 1]
    assert [len(packed["node-1"]), len(packed["node-2"])] == [3, 0]


def test_the_scheduler_does_not_see_host_enclaves_but_the_run_does():
    """sgx.intel.com/epc is the sum of the EPC sections: a host's own enclaves are not subtracted; the VMs
    still start (vEPC faults retry while ksgxd swaps the host enclaves out) and the EWB count shows it."""
    f = fleet('[[host]]\nepc = ["32M@0"]\nhost_enclaves = "16M"\n[[vm]]\nname = "w"\nepc = "24M"\n')
    r = run_fleet(f, workers=1)
    h = r.hosts[0]
    assert [v["state"] for v in h["vms"]] == ["running"]
    assert h["committed_bytes"] == 24 * MB and h["ewb_pages"] > 0
    assert h["host_enclave_bytes"] <= 8 * MB


def test_with_the_epc_cgroup_each_vm_runs_in_its_own_cgroup_limited_to_its_request():
    f = fleet('epc_cgroup = true\n[[host]]\nepc = ["64M@0"]\n[[vm]]\nname = "w"\nepc = "8M"\ncount = 2\n')
    r = run_fleet(f, workers=1)
    assert r.hosts[0]["committed_bytes"] == 16 * MB and r.to_dict()["ok"]


def test_parallel_processes_give_the_same_result_as_one():
    spec = FleetSpec.load(EXAMPLE)
    one, many = run_fleet(spec, workers=1).to_dict(), run_fleet(spec, workers=2).to_dict()
    one.pop("executor"), many.pop("executor")
    assert one == many


def test_ray_gives_the_same_result_as_local_processes():
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'vepc[ray]')")
    spec = FleetSpec.load(EXAMPLE)
    local = run_fleet(spec, workers=2).to_dict()
    on_ray = run_fleet(spec, ray_address="local").to_dict()
    assert on_ray.pop("executor") == "ray (local)"
    local.pop("executor")
    assert on_ray == local


def test_example_fleet_reads_vms_from_csv_and_refuses_what_fits_nowhere():
    r = vepc("fleet", str(EXAMPLE), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["fleet"]["vms"] == 10 and doc["fleet"]["policy"] == "least-allocated"
    assert [v["name"] for v in doc["refused"]] == ["batch"]
    assert {h["name"] for h in doc["hosts"]} == {"node-1", "node-2", "node-3"}
    cache = [v for h in doc["hosts"] for v in h["vms"] if v["name"].startswith("cache")]
    assert len(cache) == 2 and all(v["state"] == "running" for v in cache)


def test_fleet_plot_is_written(tmp_path):
    out = tmp_path / "fleet.png"
    r = vepc("fleet", str(EXAMPLE), "--policy", "first-fit", "--plot", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "refused by the scheduler: batch" in r.stdout


@pytest.mark.parametrize("text, msg", [
    ('[[vm]]\nname = "w"\nepc = "8M"\n', "f.toml: no [[host]]"),
    ('policy = "random"\n[[host]]\nepc = ["8M@0"]\n', "f.toml: unknown policy 'random'"),
    ('[[host]]\nepc = ["8X@0"]\n', "f.toml: [[host]] 1: invalid EPC section '8X@0'"),
    ('[[host]]\nepc = ["8M@0"]\ncount = 0\n', "f.toml: [[host]] 1: count must be 1..10000, not 0"),
    ('[[host]]\nepc = ["8M@0"]\n[[vm]]\nname = "w"\n', "f.toml: [[vm]] 1: 'epc' is required"),
    ('[[host]]\nepc = ["8M@0"]\n[[vm]]\nname = "w"\nepc = "5000"\n', "epc must be a positive multiple of 4 KiB"),
    ('[[host]]\nepc = ["8M@0"]\n[[vm]]\nname = "w"\nepc = "4M"\n[[vm]]\nname = "w"\nepc = "4M"\n',
     "f.toml: duplicate VM name 'w'"),
    ('[[host]]\nepc = ["8M@0"]\nsize = 1\n', "f.toml: [[host]] 1: unknown key 'size'"),
    ('[[host]]\nepc = ["8M@0"]\nvms = "missing.csv"\n', "f.toml: [[host]] 1: unknown key 'vms'"),
    ('vms = "missing.csv"\n[[host]]\nepc = ["8M@0"]\n', "f.toml: vms: missing.csv: cannot read"),
    ('kernel = 6.8\n[[host]]\nepc = ["8M@0"]\n', "f.toml: kernel must be a string such as \"6.8\", not 6.8"),
    ('kernel = "9"\n[[host]]\nepc = ["8M@0"]\n', "f.toml: kernel: invalid kernel version '9'"),
])
def test_bad_fleet_input_is_one_line(text, msg):
    with pytest.raises(FleetError) as e:
        fleet(text)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_bad_csv_rows_name_their_line(tmp_path):
    (tmp_path / "v.csv").write_text("name,epc,count\nweb,16M,2\ndb,lots,1\n")
    (tmp_path / "f.toml").write_text('vms = "v.csv"\n[[host]]\nepc = ["64M@0"]\n')
    r = vepc("fleet", str(tmp_path / "f.toml"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"vepc: {tmp_path / 'v.csv'}: line 3: epc: invalid size 'lots' (a number with an " \
                               "optional K, M, G or T suffix)"


def test_fleet_cli_refuses_bad_options_in_one_line():
    for args, msg in ((["--policy", "x"], "vepc: --policy: unknown policy 'x'"),
                      (["--workers", "0"], "vepc: --workers must be at least 1, not 0")):
        r = vepc("fleet", str(EXAMPLE), *args)
        assert r.returncode == 2 and r.stderr.startswith(msg), r.stderr
    r = vepc("fleet", "nope.toml")
    assert r.returncode == 2 and r.stderr.strip() == "vepc: nope.toml: no such file"
