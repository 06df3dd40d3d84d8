"""``vepc qemu``: boot a VM from QEMU options on a described model host and show what QEMU and the
guest see (``info sgx``, the guest's CPUID 0x12, ``query-sgx``, ``query-sgx-capabilities``).

Example::

    vepc qemu --host-epc 64M@0,64M@1 -- -m 2G -accel kvm -cpu host \\
        -object memory-backend-epc,id=m0,size=32M,prealloc=on -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0

Exit status as QEMU's: a refusal QEMU makes prints QEMU's lines (warnings, the error, its hint) and
exits 1; a check only this model makes (``--strict``, a bad ``--host-epc``) prints one ``vepc:`` line
and exits 2.  A failed KVM_RUN (``error: kvm run failed Bad address``) stops the VM as QEMU does
(``vm_stop(RUN_STATE_INTERNAL_ERROR)``); the report then says so and the status is 1.
"""

from __future__ import annotations

import json
import sys

import click

from vepc.vmm.qemu_version import DEFAULT_QEMU_VERSION, QemuVersion

__all__ = ["register"]

DEFAULT_HOST_EPC = "4G@0,4G@1"


def _fail(message: str) -> None:
    click.echo(f"vepc: {message}", err=True)
    sys.exit(2)


def _build_host(host_epc: str, host_kernel: str, epc_cgroup: bool = False):
    """The model host of ``--host-epc`` / ``--host-kernel``; a bad value is one line naming its option.
    ``epc_cgroup``: the host kernel carries the EPC cgroup series."""
    from vepc.kernel.kernel import SgxUnavailable, parse_version
    from vepc.machine import Machine

    try:
        parse_version(host_kernel)
    except ValueError as e:
        _fail(f"--host-kernel: {e}")
    try:
        return Machine.build(epc=[s for s in host_epc.split(",") if s], kernel_version=host_kernel,
                             epc_cgroup=epc_cgroup)
    except (ValueError, SgxUnavailable) as e:
        _fail(f"--host-epc: {e}")


def _print_guest_and_host(host, vm, leaves: dict) -> None:
    """The guest's CPUID 0x12 rows and SGX dmesg lines, then the host's EPC use."""
    from vepc.vmm.cpuid import cpuid_rows

    click.echo("\nguest CPUID 0x12:")
    for row in cpuid_rows(leaves):
        click.echo(f"  {row}")
    if vm.guest is not None:
        click.echo("\nguest dmesg:")
        for line in vm.guest.dmesg_lines("sgx") or ["(no SGX lines: the guest has no SGX)"]:
            click.echo(f"  {line}")
    c = host.kernel.pool.counts()
    click.echo(f"\nhost: {vm.epc_committed_bytes() >> 20} MiB of EPC committed to the VM; "
               f"{c['free'] * 4096 >> 20} MiB free of {c['total'] * 4096 >> 20} MiB")


def _cgroup_options(host, cgroup: str | None, epc_max: str | None) -> None:
    """``--cgroup`` / ``--epc-max``: make the cgroup and write its misc.max (one line, exit 2, if bad)."""
    from vepc.kernel.misc_cgroup import parse_cgroup_path
    from vepc.scenario.spec import parse_epc_max

    if cgroup is None:
        return
    try:
        if not parse_cgroup_path(cgroup):
            _fail("--cgroup: \"/\" is the root cgroup; name one below it, e.g. /vms/web")
    except ValueError as e:
        _fail(f"--cgroup: {e}")
    misc = host.kernel.cgroups.misc
    misc.mkdir(cgroup, parents=True)
    if epc_max is not None:
        try:
            limit = parse_epc_max(epc_max)
        except ValueError as e:
            _fail(f"--epc-max: {e} (or \"max\")")
        misc.write(cgroup, "misc.max", f"sgx_epc {'max' if limit is None else limit}")


def _cgroup_row(host, cgroup: str | None) -> dict | None:
    """The cgroup's row of ``EpcCgroups.table()`` (None without ``--cgroup``)."""
    if cgroup is None:
        return None
    return next(row for row in host.kernel.cgroups.table() if row["path"] == cgroup)


def _boot_qemu(host, argv: list[str], *, qemu_version: str, strict: bool = False, intel_qemu_sgx: bool = False,
               as_json: bool = False, frontend: str = "qemu", cgroup: str | None = None) -> None:
    """Start a QemuVm from ``argv`` on ``host`` and print what QEMU and the guest see (or QEMU's refusal)."""
    from vepc.kvm import KvmExit, KvmRunError
    from vepc.vmm.errors import QemuError
    from vepc.vmm.qemu import QemuVm

    stopped = False
    try:
        vm = QemuVm(host, argv, name="vm", qemu_version=qemu_version, strict=strict,
                    intel_qemu_sgx=intel_qemu_sgx, cgroup=cgroup)
        vm.frontend = frontend
        vm.start()
    except QemuError as e:
        if e.vepc_only:
            for line in e.preface:
                click.echo(line, err=True)
            _fail(e.message)
        click.echo(e.report, err=True)
        row = _cgroup_row(host, cgroup)
        if row is not None and row["events_max"]:
            click.echo(f"vepc: host cgroup {cgroup}: misc.events sgx_epc.max {row['events_max']} (the vEPC fault at "
                       "misc.max had no reclaimable page in the cgroup: -ENOMEM, SIGBUS)", err=True)
        sys.exit(1)
    except (KvmRunError, KvmExit):
        stopped = True                    # the VM stopped (internal-error); QEMU's line is in vm.stderr
    leaves = {k: v for k, v in sorted(vm.cpuid.items()) if k[0] == 0x12}
    if as_json:
        out = {"query-sgx": vm.query_sgx(), "query-sgx-capabilities": vm.query_sgx_capabilities(),
               "cpuid": [{"leaf": f"{l:#x}", "subleaf": s, "eax": f"{r[0]:#010x}", "ebx": f"{r[1]:#010x}",
                          "ecx": f"{r[2]:#010x}", "edx": f"{r[3]:#010x}"} for (l, s), r in leaves.items()],
               "frontend": vm.frontend, "state": vm.state, "error": vm.error,
               "epc_committed_bytes": vm.epc_committed_bytes(),
               "guest_dmesg": vm.guest.dmesg_lines("sgx") if vm.guest else [],
               "cgroup": _cgroup_row(host, cgroup)}
        click.echo(json.dumps(out, indent=2))
        sys.exit(1 if stopped else 0)
    for line in vm.stderr:
        click.echo(line, err=True)
    click.echo(f"front end: {vm.frontend} {vm.config.qemu_version} ({vm.config.machine.type}, "
               f"accel {vm.config.accel}, cpu {vm.config.cpu.model})")
    if stopped:
        click.echo("VM stopped: internal-error (the vCPU's KVM_RUN failed; QEMU keeps the process and its EPC)")
    click.echo("(qemu) info sgx")
    click.echo(vm.info_sgx())
    _print_guest_and_host(host, vm, leaves)
    row = _cgroup_row(host, cgroup)
    if row is not None:
        mx = "max" if row["max"] is None else f"{row['max'] >> 20} MiB"
        click.echo(f"host cgroup {cgroup}: misc.current {row['current'] >> 20} MiB, misc.max {mx}, "
                   f"misc.events sgx_epc.max {row['events_max']}")
    if stopped:
        sys.exit(1)


def register(cli: click.Group) -> None:
    @cli.command("qemu", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
    @click.option("--host-epc", default=DEFAULT_HOST_EPC, show_default=True,
                  help="Host EPC sections as SIZE@NODE, comma separated, in CPUID order.")
    @click.option("--host-kernel", default="6.8", show_default=True, help='Host kernel version ("5.15": no REMOVE_ALL).')
    @click.option("--json", "as_json", is_flag=True, help="Print query-sgx, query-sgx-capabilities and CPUID as JSON.")
    @click.option("--qemu-version", default=str(DEFAULT_QEMU_VERSION), show_default=True,
                  help="QEMU release to behave as (6.2 .. 10.1): machine types, removed options, query-sgx fields.")
    @click.option("--strict", is_flag=True,
                  help="Refuse options the model accepts but ignores, and EPC for a guest that cannot have SGX.")
    @click.option("--intel-qemu-sgx", is_flag=True, help="Accept -sgx-epc of the pre-upstream intel/qemu-sgx tree.")
    @click.option("--cgroup", metavar="PATH", default=None,
                  help="Run QEMU in this host cgroup (the host kernel then carries the EPC cgroup series).")
    @click.option("--epc-max", metavar="SIZE", default=None,
                  help='misc.max of --cgroup for sgx_epc: bytes with K/M/G/T, or "max".')
    @click.argument("qemu_args", nargs=-1, type=click.UNPROCESSED)
    def qemu_cmd(host_epc: str, host_kernel: str, as_json: bool, qemu_version: str, strict: bool,
                 intel_qemu_sgx: bool, cgroup: str | None, epc_max: str | None, qemu_args: tuple[str, ...]) -> None:
        """Boot a VM from QEMU options on a model host; print `info sgx` and the guest's CPUID 0x12.

        \b
        Example:
          vepc qemu --host-epc 64M@0,64M@1 -- -m 2G -accel kvm -cpu host \\
            -object memory-backend-epc,id=m0,size=32M,prealloc=on \\
            -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0
        """
        if not qemu_args:
            _fail("qemu: no QEMU options given (put them after --)")
        if epc_max is not None and cgroup is None:
            _fail("--epc-max limits QEMU's cgroup: add --cgroup PATH (e.g. --cgroup /vms/web)")
        host = _build_host(host_epc, host_kernel, epc_cgroup=cgroup is not None)
        try:
            QemuVersion.parse(qemu_version)
        except ValueError as e:
            _fail(f"--qemu-version: {e}")
        _cgroup_options(host, cgroup, epc_max)
        _boot_qemu(host, list(qemu_args), qemu_version=qemu_version, strict=strict,
                   intel_qemu_sgx=intel_qemu_sgx, as_json=as_json, cgroup=cgroup)

    @cli.command("cloud-hypervisor", context_settings={"ignore_unknown_options": True,
                                                       "allow_interspersed_args": False})
    @click.option("--host-epc", default=DEFAULT_HOST_EPC, show_default=True,
                  help="Host EPC sections as SIZE@NODE, comma separated, in CPUID order.")
    @click.option("--host-kernel", default="6.8", show_default=True, help="Host kernel version.")
    @click.option("--json", "as_json", is_flag=True, help="Print the layout, CPUID 0x12 and guest dmesg as JSON.")
    @click.argument("ch_args", nargs=-1, type=click.UNPROCESSED)
    def ch_cmd(host_epc: str, host_kernel: str, as_json: bool, ch_args: tuple[str, ...]) -> None:
        """Boot a VM from Cloud Hypervisor (v0.9 .. v47) options on a model host.

        \b
        Example (docs/intel_sgx.md):
          vepc cloud-hypervisor -- --cpus boot=1 --memory size=512M \\
            --sgx-epc id=epc0,size=64M,prefault=on
        """
        from vepc.vmm.cloud_hypervisor import CloudHypervisorVm
        from vepc.vmm.errors import QemuError

        if not ch_args:
            _fail("cloud-hypervisor: no Cloud Hypervisor options given (put them after --)")
        host = _build_host(host_epc, host_kernel)
        try:
            vm = CloudHypervisorVm(host, list(ch_args)).start()
        except QemuError as e:
            if e.vepc_only:
                _fail(e.message)
            click.echo(e.message, err=True)
            sys.exit(1)
        leaves = {k: v for k, v in sorted(vm.cpuid.items()) if k[0] == 0x12}
        sections = [{"id": vm.ch_ids[s.memdev], "base": f"{s.base:#x}", "size": s.size}
                    for s in vm.layout.epc_sections]
        if as_json:
            click.echo(json.dumps({"frontend": vm.frontend, "sgx_epc": sections,
                                   "epc_committed_bytes": vm.epc_committed_bytes(),
                                   "cpuid": {f"{l:#x}.{s}": [f"{x:#010x}" for x in r] for (l, s), r in leaves.items()},
                                   "guest_dmesg": vm.guest.dmesg_lines("sgx") if vm.guest else []}, indent=2))
            return
        click.echo(f"front end: cloud-hypervisor (RAM {vm.layout.ram_size >> 20} MiB, {vm.ch.cpus} vCPU)")
        for s in sections:
            click.echo(f"SGX EPC section {s['id']}: {s['base']} ({s['size']:#x})")
        _print_guest_and_host(host, vm, leaves)

    @cli.command("libvirt")
    @click.argument("domain_xml", type=click.Path(dir_okay=False))
    @click.option("--host-epc", default=DEFAULT_HOST_EPC, show_default=True,
                  help="Host EPC sections as SIZE@NODE, comma separated, in CPUID order.")
    @click.option("--host-kernel", default="6.8", show_default=True, help="Host kernel version.")
    @click.option("--qemu-version", default="7.0", show_default=True,
                  help="QEMU release libvirt drives (decides -no-acpi vs acpi=off, and QEMU's own rules).")
    @click.option("--argv", "print_argv", is_flag=True, help="Print the QEMU argv libvirt builds, one option a line.")
    @click.option("--json", "as_json", is_flag=True, help="Print query-sgx, query-sgx-capabilities and CPUID as JSON.")
    def libvirt_cmd(domain_xml: str, host_epc: str, host_kernel: str, qemu_version: str, print_argv: bool,
                    as_json: bool) -> None:
        """Boot a libvirt domain XML with <memory model='sgx-epc'> devices, through the QEMU argv libvirt builds.

        \b
        Example:
          vepc libvirt examples/libvirt-sgx-epc.xml --host-epc 128M@0,128M@1
        """
        import shlex

        from vepc.vmm.libvirt import LibvirtError, domain_to_qemu_argv

        try:
            with open(domain_xml, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            _fail(f"{domain_xml}: {getattr(e, 'strerror', None) or e}")
        try:
            argv = domain_to_qemu_argv(text, domain_xml, qemu_version=qemu_version)
        except LibvirtError as e:
            if e.vepc_only:
                _fail(str(e))
            click.echo(f"error: {e}", err=True)             # virsh prints libvirt's message after "error: "
            sys.exit(1)
        except ValueError as e:                              # --qemu-version
            _fail(f"--qemu-version: {e}")
        if print_argv:
            words = ["/usr/bin/qemu-system-x86_64"] + argv
            lines, i = [words[0]], 1
            while i < len(words):                            # libvirt's .args: one option and its value a line
                if i + 1 < len(words) and not words[i + 1].startswith("-"):
                    lines.append(f"{words[i]} {shlex.quote(words[i + 1])}")
                    i += 2
                else:
                    lines.append(words[i])
                    i += 1
            click.echo(" \\\n".join(lines))
            return
        host = _build_host(host_epc, host_kernel)
        _boot_qemu(host, argv, qemu_version=qemu_version, as_json=as_json, frontend="libvirt")

