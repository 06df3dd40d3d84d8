"""``vepc kvm``: boot a REAL KVM guest on this machine's /dev/kvm whose EPC is the model's virtual EPC.

Bad input is one line ``vepc: kvm: ...`` on stderr and exit status 2; a machine that cannot run a real
guest, or a guest that stops with an error (e.g. "kvm run failed Bad address" when the model host's EPC is
exhausted), exits with status 1 after printing what happened.

Example::

    vepc kvm --epc 32M --host-epc 64M --touch 16M
    vepc kvm --epc 1M --touch 0 --enclave test_enclave.sgxs --sig test_enclave.sig --json
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import NoReturn

import click

__all__ = ["register", "kvm"]


def _fail(problem: str, status: int = 2) -> NoReturn:
    click.echo(f"vepc: kvm: {problem}", err=True)
    sys.exit(status)


def _memory_available() -> int:
    """Host memory available for new allocations (/proc/meminfo MemAvailable; free pages without it)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _size(option: str, text: str, allow_zero: bool = False) -> int:
    from vepc.types import parse_size
    try:
        n = parse_size(text)
    except ValueError:
        _fail(f"{option}: invalid size {text!r} (expected e.g. 32M)")
    if n % 4096 or (n == 0 and not allow_zero):
        _fail(f"{option}: {text!r} is not a {'' if allow_zero else 'positive '}multiple of 4 KiB")
    return n


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


@click.command("kvm")
@click.option("--epc", default="32M", show_default=True, help="Size of the guest's EPC section.")
@click.option("--host-epc", default="64M", show_default=True, help="EPC of the model host (one section, node 0).")
@click.option("--touch", default=None, help="EPC the guest touches, one access per page [default: all of --epc].")
@click.option("--enclave", "sgxs", type=click.Path(dir_okay=False), default=None,
              help="SGXS image the guest loads through paravirtual ENCLS.")
@click.option("--sig", type=click.Path(dir_okay=False), default=None, help="SIGSTRUCT of --enclave.")
@click.option("--vcpus", type=click.IntRange(1, 2), default=1, show_default=True, help="vCPUs sharing the touch.")
@click.option("--fault-around", type=int, default=1, show_default=True,
              help="EPC pages allocated per fault (1 = the kernel; more is a deviation).")
@click.option("--timeout", type=click.FloatRange(1, 3600), default=60.0, show_default=True,
              help="Bound on each guest run, seconds.")
@click.option("--backing", type=click.Choice(["auto", "memfd", "anonymous", "tmpfs"]), default="auto",
              show_default=True,
              help="Host memory behind the EPC memslots: a memfd answered in userfaultfd MINOR mode (committed "
                   "up front), or anonymous memory answered with UFFDIO_COPY; auto = memfd where it works and the "
                   "section is at most half of the available memory; "
                   "tmpfs = the host kernel takes first touches within a bound, the model accounts them in "
                   "batches (deferred accounting, a deviation; needs root or unprivileged user namespaces).")
@click.option("--credit", type=int, default=512, show_default=True,
              help="With --backing tmpfs: pages the guest may touch ahead of the model's accounting.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def kvm(epc: str, host_epc: str, touch: str | None, sgxs: str | None, sig: str | None, vcpus: int,
        fault_around: int, timeout: float, backing: str, credit: int, as_json: bool) -> None:
    """Boot a real KVM guest whose EPC is served by the model's /dev/sgx_vepc, touch it, optionally load an
    enclave through paravirtual ENCLS, and print what happened (pages faulted, EPC allocated, exits, time,
    result).

    \b
    Examples:
      vepc kvm --epc 32M --host-epc 64M --touch 16M
      vepc kvm --epc 16M --host-epc 8M                 # exhausts the host: "kvm run failed Bad address"
      vepc kvm --touch 0 --enclave test_enclave.sgxs --sig test_enclave.sig
    """
    epc_size = _size("--epc", epc)
    host_size = _size("--host-epc", host_epc)
    touch_size = epc_size if touch is None else _size("--touch", touch, allow_zero=True)
    if touch_size > epc_size:
        _fail(f"--touch {touch} is larger than --epc {epc}")
    if fault_around < 1 or fault_around > 512 or fault_around & (fault_around - 1):
        _fail(f"--fault-around {fault_around}: must be a power of two from 1 to 512")
    if (sgxs is None) != (sig is None):
        _fail("--enclave and --sig go together")
    if credit < 1:
        _fail(f"--credit {credit}: must be at least one page")
    if backing == "tmpfs" and fault_around > 1:
        _fail("--fault-around goes with a userfaultfd backing, not --backing tmpfs")
    ram = 4 << 20
    if sgxs is not None:
        for opt, path in (("--enclave", sgxs), ("--sig", sig)):
            if not os.path.isfile(path):
                _fail(f"{opt}: {path}: no such file")
        from vepc.formats.errors import FormatError
        from vepc.formats.sgxs import read_sgxs
        from vepc.formats.sigstruct import read_sigstruct
        try:
            image = read_sgxs(sgxs)
            read_sigstruct(sig)
        except (FormatError, ValueError, OSError) as e:
            _fail(str(e))
        if (1 + len(image.pages)) * 4096 > epc_size:
            _fail(f"--enclave needs {1 + len(image.pages)} EPC pages; --epc {epc} has {epc_size // 4096}")
        from vepc.realkvm.sgxvm import SgxVm
        ram = SgxVm.ram_for_enclave(sgxs)

    from vepc.realkvm.vmm import MAX_MAPPED_GIB, VmmError
    room = MAX_MAPPED_GIB - -(-ram >> 30)
    if -(-epc_size >> 30) > room:
        _fail(f"--epc {epc}: the guest's identity map holds at most {room} GiB of EPC")
    if backing in ("auto", "memfd") and epc_size > _memory_available() // 2:
        if backing == "memfd":            # the page cache is filled with the abort page's all-ones up front
            _fail(f"--backing memfd commits the section's host memory up front: --epc {epc} is more than half "
                  f"of the {_mib(_memory_available())} available (--backing anonymous or tmpfs allocate per touch)")
        backing = "anonymous"             # auto: memfd where it fits

    from vepc.realkvm import realkvm_usable
    ok, why = realkvm_usable()
    if not ok:
        _fail(f"cannot run a real guest here: {why}", status=1)
    if backing == "tmpfs":
        from vepc.realkvm.tmpfs import tmpfs_usable
        ok, why = tmpfs_usable()
        if not ok:
            _fail(f"--backing tmpfs: {why}", status=1)

    try:
        report = run_kvm(epc_size, host_size, touch_size, sgxs, sig, vcpus, fault_around, timeout, ram, backing,
                         credit)
    except (VmmError, OSError) as e:      # the guest could not be set up (e.g. ENOMEM for its memory)
        _fail(f"cannot start the guest: {e}", status=1)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        _print(report)
    if report["result"] != "ok":
        sys.exit(1)


def run_kvm(epc_size: int, host_size: int, touch_size: int, sgxs: str | None, sig: str | None, vcpus: int = 1,
            fault_around: int = 1, timeout: float = 60.0, ram: int = 4 << 20, backing: str = "auto",
            credit: int = 512) -> dict:
    """Boot, touch, load, exit; return the report ``vepc kvm --json`` prints.

    Example: ``run_kvm(32 << 20, 64 << 20, 16 << 20, None, None)["touch"]["epc_allocated"]`` → 4096.
    """
    from vepc.kernel.invariants import check
    from vepc.realkvm.sgxvm import SgxVm
    from vepc.realkvm.vmm import EPC_GPA

    t0 = time.perf_counter()
    vm = SgxVm(epc=epc_size, host_epc=f"{host_size >> 10}K", ram=ram, vcpus=vcpus, fault_around=fault_around,
               timeout=timeout, backing=backing, credit=credit)
    report: dict = {
        "guest": {"vcpus": vcpus, "ram_bytes": vm.ram_size, "epc_gpa": EPC_GPA, "epc_bytes": epc_size,
                  "fault_around": fault_around, "backing": vm.epc.backing,
                  "tmpfs_mount": vm.epc.tmpfs.mode if vm.epc.tmpfs is not None else None,
                  "credit": credit if vm.epc.backing == "tmpfs" else None},
        "host": {"epc_bytes": host_size, "epc_pages": vm.model.kernel.pool.nr_pages},
        "touch": None, "enclave": None, "error": None,
    }
    exits: dict = {}
    try:
        if touch_size:
            r = vm.touch(touch_size)
            report["touch"] = {
                "bytes": touch_size, "pages": r.pages, "pages_touched": r.touched, "pages_faulted": r.faults,
                "epc_allocated": r.epc_allocated, "not_abort_page": r.not_abort_page,
                "loop_seconds": r.seconds, "settle_seconds": r.settle_seconds,
                "pages_per_second": round(r.pages_per_second) if r.seconds else None,
                "status": r.status,
            }
            _add(exits, r.exits)
            if r.error is not None:
                report["error"] = str(r.error)
                report["error_gpa"] = getattr(r.error, "gpa", None)
        if sgxs is not None and report["error"] is None:
            e = vm.load_enclave(sgxs, sig)
            report["enclave"] = {"sgxs": sgxs, "sig": sig, "status": e.status,
                                 "mrenclave": e.mrenclave.hex() if e.mrenclave else None,
                                 "encls": e.leaves, "epc_pages": e.epc_pages}
            _add(exits, dict(vm.runs[-1].exits))
            if e.error is not None:
                report["error"] = str(e.error)
        stats = vm.stats()
        report["model"] = {"vepc_pages": stats["vepc_pages"], "host_epc_free": stats["host_epc_free"],
                           "uffd_faults": stats["uffd_faults"], "refusals": stats["refusals"],
                           "accounting": stats["accounting"], "pages_settled": stats["pages_settled"],
                           "events": stats["model_events"]}
    finally:
        vm.close()
    kernel = vm.model.kernel
    violations = check(kernel, vm.model.processor, idle=True)
    report["exits"] = exits
    report["after_exit"] = {"host_epc_free": kernel.pool.nr_free, "invariants": violations or "ok"}
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["result"] = "ok" if report["error"] is None and not violations else "failed"
    return report


def _add(total: dict, more: dict) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0) + v


def _print(r: dict) -> None:
    g, h = r["guest"], r["host"]
    click.echo(f"real KVM guest: {g['vcpus']} vCPU, {_mib(g['ram_bytes'])} RAM, EPC {_mib(g['epc_bytes'])} at "
               f"{g['epc_gpa']:#x} ({g['backing']} backing"
               + (f", mounted {'through a user namespace' if g['tmpfs_mount'] == 'userns' else 'by the VMM'}"
                  if g.get("tmpfs_mount") else "")
               + f"); model host EPC {_mib(h['epc_bytes'])} "
               f"({h['epc_pages']} pages)"
               + (f"; fault-around {g['fault_around']} (deviation)" if g["fault_around"] > 1 else "")
               + (f"; deferred accounting, credit {g['credit']} pages (deviation)" if g["credit"] else ""))
    t = r["touch"]
    if t is not None:
        rate = f", {t['pages_per_second']:,} pages/s" if t["pages_per_second"] else ""
        secs = f"{t['loop_seconds']:.3f} s" if t["loop_seconds"] else "-"
        click.echo(f"touch {_mib(t['bytes'])}: {t['pages_touched']}/{t['pages']} pages touched, "
                   f"{t['pages_faulted']} faulted, {t['epc_allocated']} EPC pages allocated, "
                   f"{t['not_abort_page']} not reading as the abort page, {secs}{rate}")
    e = r["enclave"]
    if e is not None:
        leaves = ", ".join(f"{k} {v}" for k, v in e["encls"].items())
        click.echo(f"enclave {os.path.basename(e['sgxs'])}: {leaves}; "
                   + (f"MRENCLAVE {e['mrenclave']}" if e["mrenclave"] else f"status {e['status']}"))
    if r["error"]:
        click.echo(f"error: {r['error']}")
        for ref in r.get("model", {}).get("refusals", []):
            click.echo(f"  model: {ref['reason']} at guest physical address {ref['gpa']:#x}")
    m = r.get("model")
    if m:
        click.echo(f"model: {m['vepc_pages']} EPC pages in the vepc, {m['host_epc_free']} free; "
                   f"{m['uffd_faults']} userfaults"
                   + (f", {m['pages_settled']} pages accounted in batches (now {m['accounting']})"
                      if m["pages_settled"] else "")
                   + "; events " + ", ".join(f"{k} {v}" for k, v in m["events"].items()))
    click.echo("exits: " + (", ".join(f"{k} {v}" for k, v in sorted(r["exits"].items())) or "none"))
    a = r["after_exit"]
    click.echo(f"after VM exit: {a['host_epc_free']} EPC pages free; invariants {a['invariants']}")
    click.echo(f"result: {r['result']} ({r['seconds']:.2f} s)")


def register(cli: click.Group) -> None:
    """Add ``vepc kvm`` to the ``vepc`` command group. Example: ``cli_realkvm.register(cli)`` in vepc.cli."""
    cli.add_command(kvm)
