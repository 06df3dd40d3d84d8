"""Placing VMs on hosts by their EPC requests, the way a scheduler does: it sees each host's EPC as a
countable resource (Kubernetes: the node extended resource ``sgx.intel.com/epc`` = the sum of the CPUID
EPC section sizes, set by NFD or the plugin's ``sgx_epchook``; vmm-anchors.md §4) and the VMs' requests,
and nothing else: host enclaves, and what the kernel does at run time, are invisible to it ("accounting
only, no enforcement").

Policies (VMs are taken in file order; a VM no host can take is refused):

* ``first-fit`` -- the first host, in file order, whose unrequested EPC holds the request.
* ``least-allocated`` -- kube-scheduler's NodeResourcesFit filter, then its default scoring strategy,
  LeastAllocated (KEP-2458), configured with ``sgx.intel.com/epc`` among its resources: the host whose EPC
  stays the least requested after placing it, i.e. spreading. kube-scheduler breaks ties at random; the
  model takes the first such host in file order.
* ``most-allocated`` -- the same with MostAllocated (Kubernetes "Resource Bin Packing"): the host left
  the most requested, i.e. packing.

>>> from vepc.fleet.spec import FleetSpec
>>> f = FleetSpec.from_toml('[[host]]\\nepc = ["64M@0"]\\ncount = 2\\n[[vm]]\\nname = "w"\\nepc = "24M"\\ncount = 5\\n')
>>> p = pack(f.hosts, f.vms, "least-allocated")
>>> {h: [v.name for v in vs] for h, vs in p.by_host.items()}, [v.name for v in p.refused]
({'node-1': ['w-1', 'w-3'], 'node-2': ['w-2', 'w-4']}, ['w-5'])
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vepc.fleet.spec import Host, VmRequest

__all__ = ["POLICIES", "Placement", "pack"]

POLICIES = ("first-fit", "least-allocated", "most-allocated")


@dataclass
class Placement:
    """Which VMs each host got (in placement order), and the VMs no host could take."""

    by_host: dict[str, list[VmRequest]] = field(default_factory=dict)
    refused: list[VmRequest] = field(default_factory=list)
    requested: dict[str, int] = field(default_factory=dict)


def pack(hosts: list[Host], vms: list[VmRequest], policy: str) -> Placement:
    """Place ``vms`` on ``hosts`` by ``policy`` (one of :data:`POLICIES`)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r} (expected one of: {', '.join(POLICIES)})")
    p = Placement({h.name: [] for h in hosts}, [], {h.name: 0 for h in hosts})
    for vm in vms:
        fits = [h for h in hosts if p.requested[h.name] + vm.epc <= h.epc_bytes]
        if not fits:
            p.refused.append(vm)
            continue
        if policy == "first-fit":
            best = fits[0]
        else:
            # fraction of the host's EPC requested once this VM is placed; max() keeps the first of equals
            def score(h: Host) -> float:
                used = (p.requested[h.name] + vm.epc) / h.epc_bytes
                return 1.0 - used if policy == "least-allocated" else used
            best = max(fits, key=score)
        p.by_host[best.name].append(vm)
        p.requested[best.name] += vm.epc
    return p
