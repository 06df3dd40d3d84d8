"""Run a checked :class:`~vepc.scenario.spec.Scenario` on a model host and collect the whole story.

Each step runs against the model the way a user would drive the real thing:

* ``start``/``shutdown``/``kill``/``reset`` -- :class:`vepc.vmm.qemu.QemuVm` (QEMU's launch order, the
  guest's reboot through ``sgx_epc_reset``, QEMU's exit closing every vepc descriptor);
* ``enclave`` -- :func:`vepc.kernel.loader.load_enclave` in a new process, on the host or in the guest (inside
  ``vm.guest_call``); ``node``/``add_node`` place the loading thread for ENCLAVE_CREATE and ADD_PAGES
  (the kernel allocates EPC node-locally, ``__sgx_alloc_epc_page``);
* ``touch`` -- a guest reads its EPC (``vm.touch_epc``), or a host process opens ``/dev/sgx_vepc``, mmaps
  and touches it (``sgx_vepc_fault``, no reclaim);
* ``pressure`` -- a host process builds synthetic enclaves (at most :data:`PRESSURE_CHUNK` each) totalling
  ``size``; their allocations may reclaim (``sgx_alloc_epc_page(..., reclaim=true)``), which swaps host
  enclave pages out; VM pages are never reclaimed;
* ``destroy`` -- the enclave's process unmaps and closes it (``sgx_release``);
* ``expect`` -- compares the state; a mismatch fails the step.

A step that raises what the real component reports (QEMU's error line, an errno, a failed KVM_RUN) fails
with that text; ``expect_error`` turns an expected failure into a pass. The run goes on after a failed
step. After every step the host's kthreads get their scheduling point (``kernel.schedule()``: ksgxd runs if
it was woken), ``--check-every-step`` runs :func:`vepc.kernel.invariants.check` on the host (and on every
running guest kernel, whose pages it compares with the EPCM through the VM's EPT), and the virtual clock
advances by one step (:data:`~vepc.observe.recorder.STEP_NS`).

>>> from vepc.scenario.spec import Scenario
>>> s = Scenario.from_toml('[host]\\nepc = ["8M@0"]\\n[[step]]\\ndo = "pressure"\\nsize = "4M"\\n')
>>> r = run_scenario(s)
>>> r.ok, r.steps[0].ok, r.to_dict()["host"]["epc_bytes"]
(True, True, 8388608)
"""

from __future__ import annotations

import bisect
import errno as errno_mod
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from vepc.arch.constants import PAGE_SIZE
from vepc.events import EventKind
from vepc.kernel.epc_pool import PAGE_IS_FREE, PAGE_POISON
from vepc.kernel.invariants import check
from vepc.observe.recorder import GROUP_HOST_ENCLAVES, Recorder, STEP_NS
from vepc.observe.timeline import cgroup_series
from vepc.scenario.spec import Scenario, ScenarioError, Step

__all__ = ["run_scenario", "ScenarioRunner", "RunResult", "StepResult", "EnclaveRecord", "StepFailure",
           "PRESSURE_CHUNK"]

#: The largest synthetic enclave a ``pressure`` step builds (several are built for more).
PRESSURE_CHUNK = 8 << 20


class StepFailure(Exception):
    """A step did not do what it should; the message is the step's error."""


@dataclass
class StepResult:
    """What one step did: ``ok``, ``error`` (None when ok), ``detail`` (a human line), its events."""

    index: int
    do: str
    target: str
    description: str
    ok: bool = True
    error: str | None = None
    detail: str = ""
    first_event: int = 0
    end_event: int = 0
    time_ns: int = 0
    note: str | None = None
    traceback: str | None = None

    def as_dict(self) -> dict:
        return {"index": self.index, "do": self.do, "target": self.target, "description": self.description,
                "ok": self.ok, "error": self.error, "detail": self.detail, "note": self.note,
                "events": [self.first_event, self.end_event], "time_ns": self.time_ns}


@dataclass
class EnclaveRecord:
    """An enclave a step built (or tried to): where, its identity, its state."""

    name: str
    vm: str | None
    state: str = "initialized"
    error: str | None = None
    mrenclave: str | None = None
    mrsigner: str | None = None
    size: int = 0
    epc_pages_at_load: int = 0
    proc: Any = None
    kernel: Any = None
    fd: int = -1
    base: int = 0
    group: str | None = None

    def as_dict(self, state: str, epc_pages: int) -> dict:
        return {"name": self.name, "mrenclave": self.mrenclave, "mrsigner": self.mrsigner, "state": state,
                "error": self.error, "size": self.size, "epc_pages": epc_pages, "group": self.group}


@dataclass
class _VmRuntime:
    spec: Any
    qemu: Any = None
    error: str | None = None
    starts: int = 0


@dataclass
class _VepcUser:
    """A host process that opened /dev/sgx_vepc and touched it (a ``touch`` step on the host)."""

    name: str
    proc: Any
    fd: int
    size: int
    state: str = "open"


def _size(n: int) -> str:
    """``"32 MiB"``, ``"4100 KiB"``, ``"12 bytes"``: exact, for messages."""
    if n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return f"{n} bytes"


def _os_message(e: OSError) -> str:
    """``ENOMEM (Cannot allocate memory): SGX_IOC_ENCLAVE_ADD_PAGES on /dev/sgx_enclave``."""
    from vepc.kernel import ioctl_numbers

    name = errno_mod.errorcode.get(e.errno or 0, str(e.errno))
    text = e.strerror or str(e)
    for ioc in ("SGX_IOC_ENCLAVE_CREATE", "SGX_IOC_ENCLAVE_ADD_PAGES", "SGX_IOC_ENCLAVE_INIT",
                "SGX_IOC_ENCLAVE_PROVISION", "SGX_IOC_VEPC_REMOVE_ALL"):
        text = text.replace(f"ioctl {getattr(ioctl_numbers, ioc):#x}", ioc)
    base, _, what = text.partition(": ")
    return f"{name} ({base})" + (f": {what}" if what else "")


def _value_at(series: list[tuple[float, int]], ns: float) -> int:
    """The last value of a time-ordered (time, value) series at or before ``ns`` (0 before the first)."""
    i = bisect.bisect_right(series, ns, key=lambda tv: tv[0])
    return series[i - 1][1] if i else 0


@dataclass
class RunResult:
    """Everything a run produced; :meth:`to_dict` is the ``--json`` document.

    >>> from vepc.scenario.spec import Scenario
    >>> r = run_scenario(Scenario.from_toml('[host]\\nepc = ["4M@0"]\\n'))
    >>> r.exit_status, r.to_dict()["host"]["free_bytes"], r.timeline.final["free"]
    (0, 4194304, 1024)
    """

    scenario: Scenario
    machine: Any
    recorder: Recorder
    steps: list[StepResult]
    vms: dict[str, _VmRuntime]
    enclaves: list[EnclaveRecord]
    vepc_users: list[_VepcUser]
    violations: list[str]
    idle: bool
    _timeline: Any = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """Every step passed and the final invariant check found nothing."""
        return all(s.ok for s in self.steps) and not self.violations

    @property
    def exit_status(self) -> int:
        """0 when :attr:`ok`, else 1 (2 is for bad input, which never gets this far)."""
        return 0 if self.ok else 1

    @property
    def timeline(self):
        """The host EPC over scenario time, read from the event stream (built once)."""
        if self._timeline is None:
            from vepc.observe.timeline import build_timeline
            self._timeline = build_timeline(self.recorder)
        return self._timeline

    # -- state readers ----------------------------------------------------------------------------
    def vm_state(self, name: str) -> str:
        """"running", "stopped" (also: never started) or "failed"."""
        rt = self.vms[name]
        if rt.qemu is None:
            return "failed" if rt.error else "stopped"
        st = rt.qemu.state
        return "stopped" if st == "created" else st

    def vm_error(self, name: str) -> str | None:
        rt = self.vms[name]
        return rt.qemu.error if rt.qemu is not None and rt.qemu.error else rt.error

    def enclave_state(self, rec: EnclaveRecord) -> str:
        """"initialized", "destroyed", "lost" (its guest rebooted or its VM ended) or "failed"."""
        if rec.state != "initialized" or rec.vm is None:
            return rec.state
        q = self.vms[rec.vm].qemu
        if q is None or q.state != "running" or q.guest is not rec.kernel:
            return "lost"
        return rec.state

    def enclave_epc_pages(self, rec: EnclaveRecord) -> int:
        """EPC pages the enclave holds now in its kernel (0 unless initialized)."""
        if self.enclave_state(rec) != "initialized" or rec.proc is None or not rec.proc.alive:
            return 0
        try:
            return int(rec.proc.file(rec.fd).private_data.epc_pages())
        except Exception:
            return 0

    def find_enclave(self, name: str) -> EnclaveRecord | None:
        for rec in reversed(self.enclaves):
            if rec.name == name:
                return rec
        return None

    # -- the JSON document ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The ``vepc run --json`` object (schema: docs/scenarios.md)."""
        m = self.machine
        k = m.kernel
        pool = k.pool
        sections = []
        for s in pool.sections:
            fl = pool.flags[s.first:s.first + s.nr_pages]
            free = int((((fl & PAGE_IS_FREE) != 0) & ((fl & PAGE_POISON) == 0)).sum())
            sections.append({"base": int(s.phys_addr), "size": s.size, "node": s.node, "free_bytes": free * PAGE_SIZE})
        counts = pool.counts()
        zombies = len(k.vepc.zombie_secs_pages) if k.vepc is not None else 0
        host = {"epc_bytes": pool.nr_pages * PAGE_SIZE, "free_bytes": pool.nr_free * PAGE_SIZE,
                "zombie_secs": zombies, "poisoned_bytes": counts["poisoned"] * PAGE_SIZE,
                "kernel": self.scenario.host.kernel, "sgx2": self.scenario.host.sgx2, "flc": self.scenario.host.flc,
                "kvm": self.scenario.host.kvm, "sections": sections,
                "pages": {key: int(v) for key, v in counts.items()}}
        vms = []
        for name, rt in self.vms.items():
            q = rt.qemu
            try:
                query = q.query_sgx() if q is not None else None
            except Exception as e:                                    # QMP error reply
                query = {"error": getattr(e, "qmp", {"class": "GenericError", "desc": str(e)})}
            encl = [r.as_dict(self.enclave_state(r), self.enclave_epc_pages(r)) for r in self.enclaves if r.vm == name]
            vms.append({"name": name, "state": self.vm_state(name), "error": self.vm_error(name),
                        "epc_committed_bytes": q.epc_committed_bytes() if q is not None else 0,
                        "query_sgx": query, "starts": rt.starts, "enclaves": encl})
        host_enclaves = [r.as_dict(self.enclave_state(r), self.enclave_epc_pages(r))
                         for r in self.enclaves if r.vm is None]
        users = [{"name": u.name, "state": u.state, "size": u.size,
                  "epc_bytes": (len(u.proc.file(u.fd).private_data.page_array) * PAGE_SIZE
                                if u.state == "open" and u.proc.alive else 0)} for u in self.vepc_users]
        tl = self.timeline
        by_owner = {g: n * PAGE_SIZE for g, n in tl.final.items() if n or g == "free"}
        steps = []
        cg_series = cgroup_series(tl) if k.cgroups is not None else {}
        step_end = {i: end for i, _label, _start, end in tl.steps}
        for s in self.steps:
            d = s.as_dict()
            d["epc_by_owner"] = {g: n * PAGE_SIZE for g, n in tl.at_step_end(s.index).items() if n or g == "free"}
            if cg_series:
                d["epc_by_cgroup"] = {path: _value_at(series, step_end[s.index]) * PAGE_SIZE
                                      for path, series in cg_series.items()}
            steps.append(d)
        return {
            "scenario": {"file": self.scenario.source, "title": self.scenario.title, "steps": len(self.steps)},
            "ok": self.ok,
            "exit_status": self.exit_status,
            "host": host,
            "vms": vms,
            "host_enclaves": host_enclaves,
            "host_vepc_users": users,
            "steps": steps,
            "invariants": {"ok": not self.violations, "violations": list(self.violations), "idle": self.idle},
            "epc_by_owner": by_owner,
            "cgroups": k.cgroups.table() if k.cgroups is not None else None,
            "warnings": m.events.warnings(),
            "events": len(m.events),
            "event_totals": dict(sorted(m.events.totals().items())),
            "time_ns": m.events.now,
        }


class ScenarioRunner:
    """Runs one scenario. ``on_step(step, position, total)`` is called before each step (progress bars);
    ``snapshot_steps`` names steps after which the EPC map is captured (default: the fullest one).

    >>> from vepc.scenario.spec import Scenario
    >>> s = Scenario.from_toml('[host]\\nepc = ["4M@0"]\\n[[step]]\\ndo = "touch"\\nsize = "1M"\\n')
    >>> r = ScenarioRunner(s, snapshot_steps={1}).run()
    >>> [snap.label for snap in r.recorder.snapshots]
    ['after step 1: touch 1 MiB on the host', 'end of the scenario']
    """

    def __init__(self, scenario: Scenario, *, check_every_step: bool = False,
                 on_step: Callable[[Step, int, int], None] | None = None,
                 snapshot_steps: set[int] | None = None) -> None:
        self.scenario = scenario
        self.check_every_step = check_every_step
        self.on_step = on_step
        self.snapshot_steps = snapshot_steps

    def _build_host(self):
        from vepc.kernel.kernel import SgxUnavailable
        from vepc.machine import Machine

        h = self.scenario.host
        try:
            m = Machine.build(epc=list(h.epc), kernel_version=h.kernel, sgx2=h.sgx2, flc=h.flc, vmx=h.kvm,
                              epc_cgroup=h.epc_cgroup, epc_balloon=h.epc_balloon)
        except SgxUnavailable as e:
            raise ScenarioError(self.scenario.source, "[host]", f"the host kernel cannot use SGX: {e}") from None
        for c in self.scenario.cgroups:                  # [[cgroup]]: made at boot, before any step
            m.kernel.cgroups.misc.mkdir(c.path, parents=True)
            self._write_max(m.kernel, c.path, c.epc_max)
        return m

    @staticmethod
    def _write_max(kernel, path: str, epc_max: int | None) -> None:
        """``echo "sgx_epc N" > misc.max`` (or "max")."""
        try:
            kernel.cgroups.misc.write(path, "misc.max", f"sgx_epc {'max' if epc_max is None else epc_max}")
        except OSError as e:
            raise StepFailure(f"{path}/misc.max: {_os_message(e)}") from None

    def _enter_cgroup(self, proc, path: str | None) -> None:
        """Move a host process into ``path`` (created with its parents if missing), as a launcher would."""
        if path is None:
            return
        misc = self.machine.kernel.cgroups.misc
        misc.mkdir(path, parents=True)
        misc.attach(proc, path)

    def run(self) -> RunResult:
        """Boot the host, run every step, check the invariants; bad host input raises ScenarioError."""
        machine = self._build_host()
        rec = Recorder(machine)
        machine.events.advance(STEP_NS)                 # boot takes the first tick of scenario time
        self.machine, self.rec = machine, rec
        self.result = RunResult(self.scenario, machine, rec, [], {n: _VmRuntime(v) for n, v in self.scenario.vms.items()},
                                [], [], [], False)
        peak = -1
        total = len(self.scenario.steps)
        for pos, step in enumerate(self.scenario.steps):
            if self.on_step is not None:
                self.on_step(step, pos, total)
            res = self._run_step(step)
            self.result.steps.append(res)
            used = machine.kernel.pool.nr_pages - machine.kernel.pool.nr_free
            if self.snapshot_steps is not None:
                if step.index in self.snapshot_steps:
                    rec.snapshot(f"after step {step.index}: {step.describe()}")
            elif used > peak:
                peak = used
                rec.snapshots[:] = [s for s in rec.snapshots if not s.label.startswith("fullest")]
                rec.snapshot(f"fullest: after step {step.index} ({step.describe()})")
        rec.snapshot("end of the scenario")
        self.result.idle = self._idle()
        self.result.violations = check(machine.kernel, machine.processor, idle=self.result.idle)
        return self.result

    def _idle(self) -> bool:
        """No QEMU process, enclave process or vepc user is alive: all EPC should be free again."""
        for rt in self.result.vms.values():
            if rt.qemu is not None and rt.qemu.proc is not None and rt.qemu.proc.alive:
                return False
        for r in self.result.enclaves:
            if r.vm is None and r.proc is not None and r.proc.alive:
                return False
        return not any(u.proc.alive for u in self.result.vepc_users)

    # -- one step ---------------------------------------------------------------------------------
    def _run_step(self, step: Step) -> StepResult:
        events = self.machine.events
        res = StepResult(step.index, step.do, step.target, step.describe(), note=step.note,
                         first_event=len(events), time_ns=events.now)
        self.rec.mark_step(step.index, step.describe())
        error = None
        try:
            res.detail = getattr(self, f"_do_{step.do}")(step) or ""
        except StepFailure as e:
            error = str(e)
        except Exception as e:                                  # a model defect: report it, go on
            error = f"internal error: {type(e).__name__}: {e}"
            res.traceback = traceback.format_exc()
        self.machine.kernel.schedule()                          # ksgxd's turn, if it was woken
        if step.expect_error is not None:
            if error is None:
                error = f"expected an error containing {step.expect_error!r}, but the step succeeded"
            elif step.expect_error in error:
                res.detail = f"failed as expected: {error}"
                error = None
            else:
                error = f"expected an error containing {step.expect_error!r}, got: {error}"
        if self.check_every_step:
            v = self._check_all()
            if v:
                error = "; ".join(filter(None, [error, "invariants violated: " + "; ".join(v)]))
        res.ok = error is None
        res.error = error
        res.end_event = len(events)
        events.advance(STEP_NS)
        return res

    def _check_all(self) -> list[str]:
        """The kernel invariants of the host, then of every running guest kernel (through its EPT)."""
        v = check(self.machine.kernel, self.machine.processor)
        for name, rt in self.result.vms.items():
            q = rt.qemu
            if q is not None and q.state == "running" and q.guest is not None and q.guest.pool is not None:
                v += [f"{name} guest: {p}" for p in check(q.guest, self.machine.processor)]
        return v

    # -- helpers ----------------------------------------------------------------------------------
    def _vm(self, step: Step, running: bool = True):
        rt = self.result.vms[step.vm]
        q = rt.qemu
        if running and (q is None or q.state != "running"):
            state = self.result.vm_state(step.vm)
            raise StepFailure(f"VM {step.vm} is not running ({state})")
        return rt, q

    def _host_events_since(self, seq: int, kind: EventKind) -> list:
        guest = self.rec.guest_rows
        return [e for e in self.machine.events.since(seq) if e.kind == kind and e.seq not in guest]

    def _call_guest(self, q, fn, *args, **kw):
        """``q.guest_call`` with the model's errors turned into step failures (QEMU's wording)."""
        from vepc.formats.errors import FormatError
        from vepc.kvm import KvmExit, KvmRunError
        from vepc.vmm.errors import QemuError

        try:
            return q.guest_call(fn, *args, **kw)
        except (KvmRunError, KvmExit):
            raise StepFailure(q.error or "error: kvm run failed") from None
        except QemuError as e:
            raise StepFailure(str(e)) from None
        except FormatError as e:
            raise StepFailure(str(e)) from None
        except OSError as e:
            raise StepFailure(_os_message(e)) from None

    # -- VM life cycle ------------------------------------------------------------------------------
    def _do_start(self, step: Step) -> str:
        from vepc.vmm.errors import QemuError
        from vepc.vmm.qemu import QemuVm

        rt = self.result.vms[step.vm]
        q = rt.qemu
        if q is not None and q.state == "running":
            raise StepFailure(f"VM {step.vm} is already running")
        if q is not None and q.proc is not None and q.proc.alive:
            raise StepFailure(f"VM {step.vm} has failed ({q.error}) and its QEMU process is still alive: "
                              "kill or reset it first")
        rt.qemu, rt.error = None, None
        rt.starts += 1
        spec = rt.spec
        args = list(spec.qemu) if isinstance(spec.qemu, tuple) else spec.qemu
        with self.rec.acting(step.vm):
            if spec.cgroup is not None:
                self.machine.kernel.cgroups.misc.mkdir(spec.cgroup, parents=True)
                if spec.epc_max is not None:
                    self._write_max(self.machine.kernel, spec.cgroup, spec.epc_max)
            try:
                q = QemuVm(self.machine, args, name=step.vm, guest_kernel=spec.guest_kernel, cgroup=spec.cgroup)
            except QemuError as e:
                rt.error = str(e)
                raise StepFailure(str(e)) from None
            q.events = self.rec.guest_events(step.vm)          # the guest kernel's rows are noted as its own
            rt.qemu = q
            try:
                q.start()
            except QemuError as e:
                raise StepFailure(str(e)) from None
            except Exception:
                if q.error:
                    raise StepFailure(q.error) from None
                raise
        committed = q.epc_committed_bytes()
        guest = "" if q.guest is None or q.guest.pool is None else \
            f"; guest EPC {q.guest.pool.nr_pages * PAGE_SIZE >> 20} MiB in {len(q.guest.pool.sections)} section(s)"
        return f"{committed >> 20} MiB of host EPC committed{guest}"

    def _do_shutdown(self, step: Step) -> str:
        return self._end_vm(step, "shutdown")

    def _do_kill(self, step: Step) -> str:
        return self._end_vm(step, "kill")

    def _end_vm(self, step: Step, how: str) -> str:
        """QEMU exits (``shutdown``) or is killed (``kill``); its descriptors' release frees the EPC."""
        rt, q = self._vm(step, running=False)
        if q is None or q.proc is None or not q.proc.alive:
            raise StepFailure(f"VM {step.vm} is not running ({self.result.vm_state(step.vm)})")
        seq = len(self.machine.events)
        getattr(q, how)()
        return self._release_detail(seq)

    def _release_detail(self, seq: int) -> str:
        """What ``sgx_vepc_release`` did: pages freed, zombie SECS made and freed."""
        freed = sum(e.count for e in self._host_events_since(seq, EventKind.EPC_FREE))
        z = len(self._host_events_since(seq, EventKind.VEPC_ZOMBIE))
        zf = len(self._host_events_since(seq, EventKind.VEPC_ZOMBIE_FREED))
        text = f"{_size(freed * PAGE_SIZE)} of EPC freed"
        if z or zf:
            text += f"; zombie SECS: {z} made, {zf} freed"
        return text

    def _do_reset(self, step: Step) -> str:
        from vepc.vmm.errors import QemuError

        rt, q = self._vm(step, running=False)
        if q is None or q.proc is None or not q.proc.alive:
            raise StepFailure(f"VM {step.vm} is not running ({self.result.vm_state(step.vm)})")
        seq = len(self.machine.events)
        try:
            lines = q.reset()
        except QemuError as e:
            raise StepFailure(str(e)) from None
        except Exception:
            if q.error:
                raise StepFailure(q.error) from None
            raise
        results = [e.arg for e in self._host_events_since(seq, EventKind.VEPC_REMOVE_ALL)]
        text = f"SGX_IOC_VEPC_REMOVE_ALL returned {results}" if results else "no SGX_IOC_VEPC_REMOVE_ALL (ENOTTY)"
        if lines:
            text += "; QEMU: " + " / ".join(lines)
        return text

    # -- enclaves -----------------------------------------------------------------------------------
    def _image(self, step: Step):
        from vepc.scenario.synthetic import synthetic_enclave

        if step.sgxs is not None:
            return step.sgxs, step.sig
        return synthetic_enclave(step.size)

    def _check_free_name(self, name: str) -> None:
        old = self.result.find_enclave(name)
        if old is not None and self.result.enclave_state(old) == "initialized":
            raise StepFailure(f"enclave {name} already exists")
        if any(u.name == name and u.state == "open" for u in self.result.vepc_users):
            raise StepFailure(f"{name} already names a host vepc user")

    def _do_enclave(self, step: Step) -> str:
        from vepc.formats.errors import FormatError
        from vepc.kernel.loader import load_enclave

        self._check_free_name(step.name)
        image, sig = self._image(step)
        rec = EnclaveRecord(step.name, step.vm)
        self.result.enclaves.append(rec)

        def migrate_after_create(proc):
            if step.add_node is None:
                return None
            return lambda: setattr(proc, "node", step.add_node)

        try:
            if step.vm is not None:
                rt, q = self._vm(step)
                guest = q.guest
                if guest is None or "/dev/sgx_enclave" not in guest.devices:
                    raise StepFailure(f"the guest of {step.vm} has no /dev/sgx_enclave (no SGX in the guest)")
                proc = guest.spawn(f"app:{step.name}", node=step.node)
                rec.proc, rec.kernel = proc, guest
                le = self._call_guest(q, load_enclave, guest, proc, image, sig,
                                      on_created=migrate_after_create(proc))
            else:
                kernel = self.machine.kernel
                if "/dev/sgx_enclave" not in kernel.devices:
                    raise StepFailure("the host has no /dev/sgx_enclave (the SGX driver needs FLC)")
                proc = kernel.spawn(f"app:{step.name}", node=step.node)
                self._enter_cgroup(proc, step.cgroup)
                rec.proc, rec.kernel = proc, kernel
                with self.rec.acting(GROUP_HOST_ENCLAVES, label=step.name):
                    try:
                        le = load_enclave(kernel, proc, image, sig, on_created=migrate_after_create(proc))
                    except OSError as e:
                        raise StepFailure(_os_message(e)) from None
                    except FormatError as e:
                        raise StepFailure(str(e)) from None
        except StepFailure as e:
            rec.state, rec.error = "failed", str(e)
            self._end_process(rec)
            raise
        rec.mrenclave, rec.mrsigner = le.mrenclave, le.mrsigner
        rec.size, rec.fd, rec.base, rec.epc_pages_at_load = le.size, le.fd, le.base, le.epc_pages
        return f"MRENCLAVE {le.mrenclave[:16]}…, {le.epc_pages} EPC pages"

    def _end_process(self, rec: EnclaveRecord) -> None:
        """The loader process of a failed enclave exits (in its guest, if that still runs)."""
        proc = rec.proc
        if proc is None or not proc.alive:
            return
        if rec.vm is None:
            proc.exit()
            return
        q = self.result.vms[rec.vm].qemu
        if q is not None and q.state == "running" and q.guest is rec.kernel:
            try:
                self._call_guest(q, proc.exit)
            except StepFailure:
                pass

    def _destroy_one(self, rec: EnclaveRecord) -> None:
        state = self.result.enclave_state(rec)
        if state != "initialized":
            why = {"lost": f"its VM {rec.vm} was reset or stopped", "destroyed": "already destroyed",
                   "failed": "it never loaded"}.get(state, state)
            raise StepFailure(f"enclave {rec.name} is {state} ({why})")
        proc = rec.proc

        def close():
            proc.munmap(rec.base, rec.size)
            proc.close(rec.fd)
            if not proc.fds:
                proc.exit()
        if rec.vm is not None:
            self._call_guest(self.result.vms[rec.vm].qemu, close)
        else:
            close()
        rec.state = "destroyed"

    def _do_destroy(self, step: Step) -> str:
        group = [r for r in self.result.enclaves if r.group == step.name and r.state == "initialized"]
        if group:
            for r in group:
                self._destroy_one(r)
            return f"{len(group)} enclaves of {step.name} destroyed"
        for u in self.result.vepc_users:
            if u.name == step.name and u.state == "open":
                u.proc.exit()
                u.state = "closed"
                return f"host vepc user {u.name} closed its /dev/sgx_vepc"
        rec = self.result.find_enclave(step.name)
        if rec is None:
            raise StepFailure(f"no enclave named {step.name}")
        self._destroy_one(rec)
        return f"enclave {step.name} destroyed"

    # -- EPC use --------------------------------------------------------------------------------------
    def _do_touch(self, step: Step) -> str:
        from vepc.kernel.mm import MAP_SHARED

        if step.vm is not None:
            rt, q = self._vm(step)
            before = q.epc_committed_bytes()
            self._call_guest(q, q.touch_epc, step.size)
            after = q.epc_committed_bytes()
            return f"{(after - before) >> 10} KiB newly committed on the host ({after >> 20} MiB in all)"
        self._check_free_name(step.name)
        kernel = self.machine.kernel
        if kernel.vepc_device not in kernel.devices:
            raise StepFailure(f"ENOENT (No such file or directory): {kernel.vepc_device} (the host has no KVM)")
        length = -(-step.size // PAGE_SIZE) * PAGE_SIZE
        with self.rec.acting(f"{step.name} (host vepc)"):
            proc = kernel.spawn(step.name)
            self._enter_cgroup(proc, step.cgroup)
            fd = proc.open(kernel.vepc_device)
            addr = proc.mmap(length, flags=MAP_SHARED, fd=fd)
            user = _VepcUser(step.name, proc, fd, length)
            self.result.vepc_users.append(user)
            ok = proc.touch(addr, length)
        if not ok:
            got = len(proc.file(fd).private_data.page_array) if proc.alive else None
            if not proc.alive:
                user.state = "killed"
            what = "was killed" if got is None else f"stopped after {got} pages"
            raise StepFailure(f"SIGBUS: host process {step.name} {what} touching /dev/sgx_vepc "
                              "(sgx_vepc_fault allocates without reclaim)")
        return f"{length >> 10} KiB of /dev/sgx_vepc touched by host process {step.name}"

    def _do_pressure(self, step: Step) -> str:
        from vepc.kernel.loader import load_enclave
        from vepc.scenario.synthetic import synthetic_enclave

        self._check_free_name(step.name)
        kernel = self.machine.kernel
        if "/dev/sgx_enclave" not in kernel.devices:
            raise StepFailure("the host has no /dev/sgx_enclave (the SGX driver needs FLC)")
        seq = len(self.machine.events)
        vm_before = {n: (rt.qemu.epc_committed_bytes() if rt.qemu is not None else 0)
                     for n, rt in self.result.vms.items()}
        proc = kernel.spawn(step.name)
        self._enter_cgroup(proc, step.cgroup)
        chunks = []
        left = step.size
        while left > 0:
            chunks.append(min(left, PRESSURE_CHUNK))
            left -= chunks[-1]
        built = 0
        for i, nbytes in enumerate(chunks):
            name = f"{step.name}#{i}"
            rec = EnclaveRecord(name, None, group=step.name, proc=proc, kernel=kernel)
            self.result.enclaves.append(rec)
            image, sig = synthetic_enclave(nbytes)
            try:
                with self.rec.acting(GROUP_HOST_ENCLAVES, label=name):
                    le = load_enclave(kernel, proc, image, sig)
            except OSError as e:
                rec.state, rec.error = "failed", _os_message(e)
                raise StepFailure(f"enclave {i + 1} of {len(chunks)} ({nbytes >> 10} KiB): {rec.error}") from None
            rec.mrenclave, rec.mrsigner = le.mrenclave, le.mrsigner
            rec.size, rec.fd, rec.base, rec.epc_pages_at_load = le.size, le.fd, le.base, le.epc_pages
            built += 1
        ewb = sum(e.count for e in self._host_events_since(seq, EventKind.RECLAIM_EWB))
        vm_after = {n: (rt.qemu.epc_committed_bytes() if rt.qemu is not None else 0)
                    for n, rt in self.result.vms.items()}
        vm_note = "VM pages unchanged" if vm_after == vm_before else "VM pages changed"
        return f"{built} enclaves built; {ewb} pages written out by the reclaimer (EWB); {vm_note}"

    def _do_balloon(self, step: Step) -> str:
        """EXPERIMENT (vepc.vmm.epc_balloon): the guest gives free EPC back, or takes it all back."""
        rt, q = self._vm(step)
        if not self.machine.kernel.config.epc_balloon:
            raise StepFailure("ENOTTY: the host has no EPC balloon (upstream cannot take EPC back from a running "
                              "VM; the experiment needs [host] epc_balloon = true)")
        before = q.epc_committed_bytes()
        if step.deflate:
            n = self._call_guest(q, q.balloon_deflate)
            return f"the guest took {_size(n)} back (allocated on the host again at first use)"
        released = self._call_guest(q, q.balloon, step.size)
        return f"EXPERIMENT: {_size(released)} of host EPC released ({before >> 20} -> " \
               f"{q.epc_committed_bytes() >> 20} MiB committed)"

    def _do_limit(self, step: Step) -> str:
        """Write the cgroup's misc.max (creating it if missing): takes effect at once, reclaims nothing."""
        kernel = self.machine.kernel
        kernel.cgroups.misc.mkdir(step.cgroup, parents=True)
        self._write_max(kernel, step.cgroup, step.epc_max)
        cur = kernel.cgroups.misc.lookup(step.cgroup).res["sgx_epc"].usage
        return f"{step.cgroup}: misc.max {'max' if step.epc_max is None else _size(step.epc_max)}, " \
               f"misc.current {_size(cur)}"

    # -- expectations -------------------------------------------------------------------------------
    def _do_expect(self, step: Step) -> str:
        r = self.result
        kernel = self.machine.kernel
        ex = step.expect
        bad: list[str] = []
        seen: list[str] = []

        def compare(what: str, want, got) -> None:
            show = (lambda v: f"{v} ({_size(v)})") if what.endswith("_bytes") else str
            seen.append(f"{what}={_size(got) if what.endswith('_bytes') else got}")
            if want != got:
                bad.append(f"{what}: expected {show(want)}, got {show(got)}")

        target_kernel = kernel
        if step.vm is not None:
            q = r.vms[step.vm].qemu
            target_kernel = q.guest if q is not None and q.state == "running" else None
        if "state" in ex:
            compare("state", ex["state"], r.vm_state(step.vm))
        if "free_bytes" in ex:
            if target_kernel is None or target_kernel.pool is None:
                bad.append(f"free_bytes: VM {step.vm} has no running guest kernel with EPC")
            else:
                compare("free_bytes", ex["free_bytes"], target_kernel.pool.nr_free * PAGE_SIZE)
        if "zombie_secs" in ex:
            if target_kernel is None:
                bad.append(f"zombie_secs: VM {step.vm} has no running guest kernel")
            else:
                z = len(target_kernel.vepc.zombie_secs_pages) if target_kernel.vepc is not None else 0
                compare("zombie_secs", ex["zombie_secs"], z)
        if "epc_committed_bytes" in ex:
            q = r.vms[step.vm].qemu
            compare("epc_committed_bytes", ex["epc_committed_bytes"], q.epc_committed_bytes() if q is not None else 0)
        if "enclave" in ex:
            rec = r.find_enclave(ex["enclave"])
            if rec is None:
                bad.append(f"enclave {ex['enclave']}: no such enclave")
            else:
                compare(f"enclave {rec.name}", ex.get("enclave_state", "initialized"), r.enclave_state(rec))
                for key in ("mrenclave", "mrsigner"):
                    if key in ex:
                        compare(key, ex[key], getattr(rec, key))
                if "error" in ex:
                    got = rec.error or ""
                    seen.append(f"error={got!r}")
                    if ex["error"] not in got:
                        bad.append(f"enclave {rec.name} error: expected to contain {ex['error']!r}, got {got or None!r}")
        if "cgroup" in ex:
            try:
                res = kernel.cgroups.misc.lookup(ex["cgroup"]).res["sgx_epc"]
            except OSError:
                bad.append(f"cgroup {ex['cgroup']}: no such cgroup")
            else:
                if "epc_current_bytes" in ex:
                    compare("epc_current_bytes", ex["epc_current_bytes"], res.usage)
                if "epc_peak_bytes" in ex:
                    compare("epc_peak_bytes", ex["epc_peak_bytes"], res.watermark)
                if "epc_max_events" in ex:
                    compare("epc_max_events", ex["epc_max_events"], res.events)
        if "error" in ex and "enclave" not in ex:
            got = r.vm_error(step.vm) or ""
            seen.append(f"error={got!r}")
            if ex["error"] not in got:
                bad.append(f"error: expected to contain {ex['error']!r}, got {got or None!r}")
        if bad:
            raise StepFailure("; ".join(bad))
        return ", ".join(seen)


def run_scenario(scenario: Scenario, **kw) -> RunResult:
    """Run ``scenario`` (keywords as for :class:`ScenarioRunner`) and return its :class:`RunResult`.

    >>> # run_scenario(Scenario.load("examples/seed_story.toml")).exit_status
    """
    return ScenarioRunner(scenario, **kw).run()
