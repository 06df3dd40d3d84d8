"""``vepc qemu``: boot a VM from QEMU options on a described model host and show what QEMU and the
guest see (``info sgx``, the guest's CPUID 0x12, ``query-sgx``, ``query-sgx-capabilities``).

Example::

    vepc qemu --host-epc 64M@0,64M@1 -- -m 2G -cpu host \\
        -object memory-backend-epc,id=m0,size=32M,prealloc=on -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0
"""

from __future__ import annotations

import json
import sys

import click

__all__ = ["register"]

DEFAULT_HOST_EPC = "4G@0,4G@1"


def _fail(message: str) -> None:
    click.echo(f"vepc: {message}", err=True)
    sys.exit(2)


def register(cli: click.Group) -> None:
    @cli.command("qemu", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
    @click.option("--host-epc", default=DEFAULT_HOST_EPC, show_default=True,
                  help="Host EPC sections as SIZE@NODE, comma separated, in CPUID order.")
    @click.option("--host-kernel", default="6.8", show_default=True, help='Host kernel version ("5.15": no REMOVE_ALL).')
    @click.option("--json", "as_json", is_flag=True, help="Print query-sgx, query-sgx-capabilities and CPUID as JSON.")
    @click.argument("qemu_args", nargs=-1, type=click.UNPROCESSED)
    def qemu_cmd(host_epc: str, host_kernel: str, as_json: bool, qemu_args: tuple[str, ...]) -> None:
        """Boot a VM from QEMU options on a model host; print `info sgx` and the guest's CPUID 0x12.

        \b
        Example:
          vepc qemu --host-epc 64M@0,64M@1 -- -m 2G -cpu host \\
            -object memory-backend-epc,id=m0,size=32M,prealloc=on \\
            -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0
        """
        from vepc.kernel.kernel import SgxUnavailable
        from vepc.machine import Machine
        from vepc.vmm.cpuid import cpuid_rows
        from vepc.vmm.errors import QemuError
        from vepc.vmm.qemu import QemuVm

        if not qemu_args:
            _fail("qemu: no QEMU options given (put them after --)")
        try:
            host = Machine.build(epc=[s for s in host_epc.split(",") if s], kernel_version=host_kernel)
        except (ValueError, SgxUnavailable) as e:
            _fail(f"--host-epc: {e}")
        try:
            vm = QemuVm(host, list(qemu_args), name="vm")
            vm.start()
        except QemuError as e:
            _fail(str(e))
        leaves = {k: v for k, v in sorted(vm.cpuid.items()) if k[0] == 0x12}
        if as_json:
            out = {"query-sgx": vm.query_sgx(), "query-sgx-capabilities": vm.query_sgx_capabilities(),
                   "cpuid": [{"leaf": f"{l:#x}", "subleaf": s, "eax": f"{r[0]:#010x}", "ebx": f"{r[1]:#010x}",
                              "ecx": f"{r[2]:#010x}", "edx": f"{r[3]:#010x}"} for (l, s), r in leaves.items()],
                   "state": vm.state, "error": vm.error,
                   "epc_committed_bytes": vm.epc_committed_bytes(),
                   "guest_dmesg": vm.guest.dmesg_lines("sgx") if vm.guest else []}
            click.echo(json.dumps(out, indent=2))
            return
        for line in vm.stderr:
            click.echo(line, err=True)
        click.echo("(qemu) info sgx")
        click.echo(vm.info_sgx())
        click.echo("\nguest CPUID 0x12:")
        for row in cpuid_rows(leaves):
            click.echo(f"  {row}")
        if vm.guest is not None:
            click.echo("\nguest dmesg:")
            for line in vm.guest.dmesg_lines("sgx"):
                click.echo(f"  {line}")
        c = host.kernel.pool.counts()
        click.echo(f"\nhost: {vm.epc_committed_bytes() >> 20} MiB of EPC committed to the VM; "
                   f"{c['free'] * 4096 >> 20} MiB free of {c['total'] * 4096 >> 20} MiB")
