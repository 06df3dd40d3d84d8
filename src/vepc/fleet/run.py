"""Run a packed fleet: every host is an independent scenario (its VMs started in placement order, after
its host enclaves), run in parallel on this machine's cores (``concurrent.futures``) or, with ``ray``
installed and an address given, as Ray tasks. The model is deterministic: both give the same result.

>>> from vepc.fleet.spec import FleetSpec
>>> f = FleetSpec.from_toml('[[host]]\\nepc = ["16M@0"]\\n[[vm]]\\nname = "w"\\nepc = "8M"\\ncount = 3\\n')
>>> r = run_fleet(f, workers=1)
>>> [(h["name"], h["committed_bytes"] >> 20) for h in r.hosts], [v["name"] for v in r.refused]
([('node', 16)], ['w-3'])
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

from vepc.fleet.packing import Placement, pack
from vepc.fleet.spec import FleetSpec, Host, VmRequest

__all__ = ["FleetResult", "run_fleet", "run_host", "host_job", "RayUnavailable"]

_QEMU = ("-m 1G -accel kvm -cpu host -object memory-backend-epc,id=m0,size={size},prealloc={prealloc} "
         "-M sgx-epc.0.memdev=m0,sgx-epc.0.node=0")


class RayUnavailable(RuntimeError):
    """``--ray`` without the ``ray`` package (the optional extra ``vepc[ray]``)."""


@dataclass
class FleetResult:
    """Per host: EPC, what was requested and committed, VMs running and failed; the VMs the scheduler
    refused; how the run was executed."""

    spec: FleetSpec
    placement: Placement
    hosts: list[dict] = field(default_factory=list)
    executor: str = "local"

    @property
    def refused(self) -> list[dict]:
        """VMs no host could take (the scheduler's refusal)."""
        return [{"name": v.name, "epc_bytes": v.epc, "reason": "no host has that much unrequested EPC"}
                for v in self.placement.refused]

    @property
    def failed(self) -> list[dict]:
        """VMs placed on a host that then failed to start there (the kernel's refusal)."""
        return [{"host": h["name"], **v} for h in self.hosts for v in h["vms"] if v["state"] != "running"]

    def to_dict(self) -> dict:
        s = self.spec
        return {"fleet": {"file": s.source, "title": s.title, "policy": s.policy, "kernel": s.kernel,
                          "epc_cgroup": s.epc_cgroup, "hosts": len(s.hosts), "vms": len(s.vms)},
                "executor": self.executor, "hosts": self.hosts, "refused": self.refused, "failed": self.failed,
                "ok": all(h["invariants_ok"] for h in self.hosts)}


def host_job(host: Host, vms: list[VmRequest], kernel: str, epc_cgroup: bool) -> dict:
    """What one worker needs (plain data: it crosses process and Ray boundaries)."""
    return {"host": asdict(host), "vms": [asdict(v) for v in vms], "kernel": kernel, "epc_cgroup": epc_cgroup}


def run_host(job: dict) -> dict:
    """Run one host's placement as a scenario; returns its row of :attr:`FleetResult.hosts`."""
    from vepc.arch.constants import PAGE_SIZE
    from vepc.scenario.runner import run_scenario
    from vepc.scenario.spec import HostSpec, Scenario, Step, VmSpec

    h = job["host"]
    cg = job["epc_cgroup"]
    vms = {}
    for v in job["vms"]:
        q = _QEMU.format(size=v["epc"], prealloc="on" if v["prealloc"] else "off")
        vms[v["name"]] = VmSpec(v["name"], q, cgroup=f"/vms/{v['name']}" if cg else None,
                                epc_max=v["epc"] if cg else None)
    steps = []
    if h["host_enclaves"]:
        steps.append(Step(1, "pressure", name="host-enclaves", size=h["host_enclaves"]))
    for v in job["vms"]:
        steps.append(Step(len(steps) + 1, "start", vm=v["name"]))
    scenario = Scenario(HostSpec(epc=tuple(h["epc"]), kernel=job["kernel"], epc_cgroup=cg), vms, steps,
                        source=f"fleet host {h['name']}")
    r = run_scenario(scenario)
    doc = r.to_dict()
    rows = []
    for v in doc["vms"]:
        rows.append({"name": v["name"], "state": v["state"], "error": v["error"],
                     "epc_committed_bytes": v["epc_committed_bytes"]})
    pool = r.machine.kernel.pool
    enclaves = sum(e["epc_pages"] for e in doc["host_enclaves"]) * PAGE_SIZE
    return {"name": h["name"], "epc_bytes": h["epc_bytes"],
            "requested_bytes": sum(v["epc"] for v in job["vms"]),
            "committed_bytes": sum(v["epc_committed_bytes"] for v in rows),
            "host_enclave_bytes": enclaves, "free_bytes": pool.nr_free * PAGE_SIZE,
            "ewb_pages": doc["event_totals"].get("RECLAIM_EWB", 0), "vms": rows,
            "invariants_ok": doc["invariants"]["ok"]}


def run_fleet(spec: FleetSpec, *, workers: int | None = None, ray_address: str | None = None) -> FleetResult:
    """Pack ``spec`` and run every host. ``workers``: processes (default: this machine's cores; 1 runs in
    this process). ``ray_address``: run as Ray tasks instead -- ``"local"`` starts a Ray instance on this
    machine (what the tests use), else what ``ray.init(address=...)`` takes ("auto", "ray://HOST:10001")."""
    placement = pack(spec.hosts, spec.vms, spec.policy)
    jobs = [host_job(h, placement.by_host[h.name], spec.kernel, spec.epc_cgroup) for h in spec.hosts]
    if ray_address is not None:
        rows, executor = _run_ray(jobs, ray_address), f"ray ({ray_address})"
    else:
        n = workers or os.cpu_count() or 1
        n = max(1, min(n, len(jobs)))
        if n == 1:
            rows = [run_host(j) for j in jobs]
        else:
            with ProcessPoolExecutor(max_workers=n) as ex:
                rows = list(ex.map(run_host, jobs))
        executor = f"local ({n} process{'es' if n > 1 else ''})"
    return FleetResult(spec, placement, rows, executor)


def _run_ray(jobs: list[dict], address: str) -> list[dict]:
    try:
        import ray
    except ImportError:
        raise RayUnavailable("--ray needs the ray package: pip install 'vepc[ray]'") from None
    local = address == "local"
    started = not ray.is_initialized()
    if started:
        # "local": a Ray instance started here, on this machine's cores (Ray's old local_mode, one process,
        # is gone: ray 2.60's init() raises "`local_mode` is no longer supported").
        try:
            ray.init(address="local" if local else address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except Exception as e:                                 # connection refused, bad address, ...
            raise RayUnavailable(f"--ray {address}: {' '.join(str(e).split())}") from None
    try:
        task = ray.remote(run_host)
        return ray.get([task.remote(j) for j in jobs])
    finally:
        if started:
            ray.shutdown()
