"""The stateful property test: a Hypothesis ``RuleBasedStateMachine`` over the public API of the model.

Each rule is one operation of :class:`~vepc.reliability.world.World` -- host enclaves through the loader
and ioctls, VMs with one or two EPC sections (prealloc or lazy, guest node 0 or 1), guest enclaves, guest
touches, reclaim pressure, resets (also with a vCPU inside an enclave), kills, shutdowns, forks, closes
and exits of any process in any order, EPC exhaustion, memory failures, REMOVE_ALL racing a concurrent
EREMOVE, a VMM killed mid-prealloc. After every step the invariants of
:mod:`vepc.kernel.invariants` (host with EPCM and EPT, every running guest) and the World's own promises
hold; at the end everything is killed and the idle invariants hold.

The test suite runs it with the ``vepc-reliability`` Hypothesis profile (a bounded number of sequences);
``python -m vepc.reliability.fuzz`` runs it with many more and counts what it did in :data:`STATS`.

Hypothesis is a test dependency: import this module only where it is installed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vepc.reliability.world import World

__all__ = ["ReliabilityMachine", "STATS", "Stats", "PROFILE", "FUZZ_PROFILE", "InvariantViolation"]

#: The default suite's profile: small, so that the property test stays within a few seconds per worker.
PROFILE = "vepc-reliability"
#: The fuzz runner's profile (``max_examples`` is set per run).
FUZZ_PROFILE = "vepc-fuzz"

settings.register_profile(PROFILE, max_examples=int(os.environ.get("VEPC_RELIABILITY_EXAMPLES", "100")),
                          stateful_step_count=40, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.filter_too_much])
settings.register_profile(FUZZ_PROFILE, max_examples=1000, stateful_step_count=50, deadline=None, database=None,
                          print_blob=True, suppress_health_check=list(HealthCheck))


class InvariantViolation(AssertionError):
    """An invariant failed after a step (the message lists every violation)."""


@dataclass
class Stats:
    sequences: int = 0
    steps: int = 0
    checks: int = 0
    violations: int = 0

    def reset(self) -> None:
        self.sequences = self.steps = self.checks = self.violations = 0

    def line(self) -> str:
        return f"{self.sequences} sequences, {self.steps} steps, {self.checks} invariant checks, {self.violations} violations"


#: What every ReliabilityMachine run in this process did.
STATS = Stats()

_idx = st.integers(min_value=0, max_value=63)
#: True one time in three: rules that end things early or are cheap to repeat fire less often.
_rarely = st.sampled_from([True, False, False])
_section = st.tuples(st.sampled_from([16, 32, 64, 256, 512]), st.booleans(), st.sampled_from([0, 0, 1]))


class ReliabilityMachine(RuleBasedStateMachine):
    """Random sequences of host, VMM and guest operations with the invariants checked after each."""

    def __init__(self) -> None:
        super().__init__()
        self.world = World()
        self.log: list[str] = []
        STATS.sequences += 1

    def _did(self, what: str, outcome: str) -> None:
        STATS.steps += 1
        self.log.append(f"{what}: {outcome}")

    @initialize(epc_cgroup=st.booleans())
    def boot(self, epc_cgroup):
        """Half the worlds boot a host with the EPC cgroup series (misc.max limits, per-cgroup reclaim)."""
        if epc_cgroup:
            self.world = World(epc_cgroup=True)
        self._did("boot", "epc cgroup" if epc_cgroup else "mainline")

    # -- EPC cgroups ----------------------------------------------------------------------------------
    @precondition(lambda self: self.world.kernel.cgroups is not None)
    @rule(which=_idx, pages=st.one_of(st.none(), st.sampled_from([0, 8, 40, 96, 200])))
    def cgroup_limit(self, which, pages):
        self._did("cgroup_limit", self.world.cgroup_limit(which, pages))

    @precondition(lambda self: self.world.kernel.cgroups is not None and self.world.processes())
    @rule(i=_idx, which=_idx)
    def cgroup_attach(self, i, which):
        self._did("cgroup_attach", self.world.cgroup_attach(i, which))

    # -- host enclaves -------------------------------------------------------------------------------
    @rule(pages=st.sampled_from([2, 3, 5, 24, 96, 320]))
    def host_enclave(self, pages):
        self._did("host_enclave", self.world.host_enclave(pages))

    @precondition(lambda self: self.world.live_apps())
    @rule(i=_idx, page=_idx)
    def touch_host_enclave(self, i, page):
        self._did("touch_host_enclave", self.world.touch_host_enclave(i, page))

    @precondition(lambda self: self.world.live_apps())
    @rule(i=_idx, how=_idx)
    def destroy_host_enclave(self, i, how):
        self._did("destroy_host_enclave", self.world.destroy_host_enclave(i, how))

    @rule(go=_rarely)
    def reclaim(self, go):
        self._did("reclaim", self.world.reclaim() if go else "skipped")

    # -- VMs ---------------------------------------------------------------------------------------
    @rule(sections=st.lists(_section, min_size=1, max_size=2), smp=st.sampled_from([1, 2]),
          boot_guest=st.sampled_from([True, True, True, False]),
          kill_after=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 40)),
          kill_on_sigbus=st.sampled_from([False, False, False, True]),
          enclave_pages=st.sampled_from([0, 3, 12, 40]),
          cpu=st.sampled_from(["host", "host", "host,-sgx-provisionkey"]))
    def start_vm(self, sections, smp, boot_guest, kill_after, kill_on_sigbus, enclave_pages, cpu):
        out = self.world.start_vm(sections, smp=smp, boot_guest=boot_guest, kill_after_touches=kill_after,
                                  kill_on_sigbus=kill_on_sigbus, cpu=cpu)
        if out == "running" and enclave_pages:
            # Most VMs get an enclave at once (a small first section makes it span both sections).
            out += ", " + self.world.guest_enclave(len(self.world.live_vms("running")) - 1, enclave_pages)
        self._did("start_vm", out)

    @rule(prealloc=st.booleans(), pages=st.sampled_from([6, 12]))
    def spanning_guest_enclave(self, prealloc, pages):
        """A VM whose first EPC section is tiny: its guest's enclave has the SECS in section 0 and children
        in section 1 (two vepc instances): releasing the first makes a zombie, the second frees it."""
        out = self.world.start_vm([(16, prealloc, 0), (512, False, 0)])
        if out == "running":
            out += ", " + self.world.guest_enclave(len(self.world.live_vms("running")) - 1, pages)
        self._did("spanning_guest_enclave", out)

    @precondition(lambda self: self.world.live_vms("running"))
    @rule(i=_idx, pages=st.sampled_from([2, 3, 6, 40]))
    def guest_enclave(self, i, pages):
        self._did("guest_enclave", self.world.guest_enclave(i, pages))

    @precondition(lambda self: any(r.enclaves for r in self.world.live_vms("running")))
    @rule(i=_idx, j=_idx)
    def guest_destroy_enclave(self, i, j):
        self._did("guest_destroy_enclave", self.world.guest_destroy_enclave(i, j))

    @precondition(lambda self: self.world.live_vms("running"))
    @rule(i=_idx, kib=st.sampled_from([4, 64, 256, 1024]))
    def guest_touch(self, i, kib):
        self._did("guest_touch", self.world.guest_touch(i, kib))

    @precondition(lambda self: self.world.live_vms())
    @rule(i=_idx, inside=st.booleans())
    def reset_vm(self, i, inside):
        self._did("reset_vm", self.world.reset_vm(i, inside=inside))

    @precondition(lambda self: self.world.live_vms())
    @rule(i=_idx, how=_idx)
    def stop_vm(self, i, how):
        self._did("stop_vm", self.world.stop_vm(i, how))

    @precondition(lambda self: self.world.live_vms())
    @rule(i=_idx, race=st.booleans())
    def vmm_remove_all(self, i, race):
        self._did("vmm_remove_all", self.world.vmm_remove_all(i, race=race))

    @precondition(lambda self: self.world.live_vms())
    @rule(i=_idx, go=_rarely)
    def vmm_munmap_epc(self, i, go):
        self._did("vmm_munmap_epc", self.world.vmm_munmap_epc(i) if go else "skipped")

    @precondition(lambda self: self.world.live_vms("running"))
    @rule(i=_idx, seed=st.integers(0, 1 << 16), n=st.integers(1, 12))
    def hostile_burst(self, i, seed, n):
        """The guest kernel of a VM turns hostile: random and malformed ENCLS (vepc.reliability.hostile)."""
        self._did("hostile_burst", self.world.hostile_burst(i, seed, n))

    # -- processes, exhaustion, faults ------------------------------------------------------------
    @precondition(lambda self: self.world.processes())
    @rule(i=_idx, go=_rarely)
    def fork(self, i, go):
        self._did("fork", self.world.fork(i) if go else "skipped")

    @precondition(lambda self: any(p.fds for p in self.world.processes()))
    @rule(i=_idx, j=_idx)
    def close_fd(self, i, j):
        self._did("close_fd", self.world.close_fd(i, j))

    @precondition(lambda self: self.world.processes())
    @rule(i=_idx)
    def exit_process(self, i):
        self._did("exit_process", self.world.exit_process(i))

    @rule(kib=st.one_of(st.none(), st.sampled_from([16, 128])))
    def exhaust(self, kib):
        self._did("exhaust", self.world.hog(kib))

    @rule(where=st.integers(min_value=-3, max_value=4096), action_required=st.booleans(), who=_idx)
    def memory_failure(self, where, action_required, who):
        self._did("memory_failure", self.world.memory_failure(where, action_required, who))

    # -- the properties -------------------------------------------------------------------------------
    @invariant()
    def invariants_hold(self):
        v = self.world.check()
        STATS.checks += 1
        if v:
            STATS.violations += 1
            raise InvariantViolation("after " + (self.log[-1] if self.log else "boot") + ":\n  " + "\n  ".join(v))

    def teardown(self):
        v = self.world.teardown()
        STATS.checks += 1
        if v:
            STATS.violations += 1
            raise InvariantViolation("after killing every VM and process:\n  " + "\n  ".join(v))
