"""``vepc fleet``: pack SGX VMs onto hosts by their EPC requests and run every host as a scenario.

:mod:`.spec` reads the fleet (TOML, VMs optionally from CSV), :mod:`.packing` places VMs the way a
scheduler would, :mod:`.run` runs each host's placement as an independent scenario -- in parallel on this
machine's cores, or on a Ray cluster -- and collects per-host EPC use and refused VMs.
"""

from vepc.fleet.packing import POLICIES, Placement, pack
from vepc.fleet.run import FleetResult, run_fleet
from vepc.fleet.spec import FleetError, FleetSpec, HostGroup, VmRequest

__all__ = ["FleetSpec", "HostGroup", "VmRequest", "FleetError", "POLICIES", "Placement", "pack", "FleetResult",
           "run_fleet"]
