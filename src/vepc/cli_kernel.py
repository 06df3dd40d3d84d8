"""``vepc enclave ...``: drive the model's /dev/sgx_enclave from the command line.

Example::

    vepc enclave load enclave.sgxs --sig enclave.sig
    vepc enclave load enclave.sgxs --sig enclave.sig --epc 64M@0,64M@1 --json
"""

from __future__ import annotations

import json
import os
import sys

import click
from typing import NoReturn

__all__ = ["register", "enclave"]


def _fail(where: str, problem: str) -> NoReturn:
    click.echo(f"vepc: {where}: {problem}", err=True)
    sys.exit(2)


@click.group()
def enclave() -> None:
    """Load enclaves through the model's /dev/sgx_enclave driver.

    \b
    Example:
      vepc enclave load enclave.sgxs --sig enclave.sig
    """


@enclave.command("load")
@click.argument("sgxs", type=click.Path(dir_okay=False))
@click.option("--sig", "sig", required=True, type=click.Path(dir_okay=False), help="The enclave's SIGSTRUCT file.")
@click.option("--epc", default="64M@0", show_default=True,
              help="EPC sections of the host, comma separated SIZE@NODE.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def load(sgxs: str, sig: str, epc: str, as_json: bool) -> None:
    """Boot a host, load SGXS with its SIGSTRUCT through the ioctls (CREATE, ADD_PAGES, INIT) and print
    MRENCLAVE, MRSIGNER and the EPC pages the enclave uses.

    \b
    Example:
      vepc enclave load test_enclave.sgxs --sig test_enclave.sig --epc 64M@0
    """
    from vepc.formats.errors import FormatError
    from vepc.kernel.loader import load_enclave
    from vepc.machine import Machine

    for path in (sgxs, sig):
        if not os.path.exists(path):
            _fail(path, "no such file")
    specs = [s.strip() for s in epc.split(",") if s.strip()]
    if not specs:
        _fail("--epc", "no EPC section given (expected SIZE@NODE, e.g. 64M@0)")
    try:
        machine = Machine.build(epc=specs)
    except ValueError as e:
        _fail("--epc", str(e))
    kernel = machine.kernel
    if "/dev/sgx_enclave" not in kernel.devices:
        _fail("--epc", "the host has no /dev/sgx_enclave")
    proc = kernel.spawn("vepc-load")
    free_before = kernel.pool.nr_free
    try:
        loaded = load_enclave(kernel, proc, sgxs, sig)
    except FormatError as e:
        _fail(e.path, e.problem)
    except OSError as e:
        where, why = _explain(e.errno, sgxs, sig)
        hw = getattr(e, "hardware", None)                   # EnclaveIoctlError: what ENCLS answered
        if hw is not None:
            why += f": {e.leaf} returned {hw}"
        if as_json:
            click.echo(json.dumps({"ok": False, "error": f"{where}: {why}", "errno": _errname(e.errno),
                                   "leaf": getattr(e, "leaf", None), "sgx_code": hw}, indent=2, sort_keys=True))
            sys.exit(2)
        _fail(where, f"{why} ({_errname(e.errno)})")
    used = free_before - kernel.pool.nr_free
    encl = proc.file(loaded.fd).private_data
    swapped = encl.swapped_pages() + (encl.secs.epc_page is None)
    if as_json:
        out = loaded.as_dict()
        out.update(ok=True, epc_pages_used=used, swapped_out=swapped, epc=specs, epc_free=kernel.pool.nr_free,
                   epc_total=kernel.pool.nr_pages)
        click.echo(json.dumps(out, indent=2, sort_keys=True))
        return
    click.echo(f"MRENCLAVE  {loaded.mrenclave}")
    click.echo(f"MRSIGNER   {loaded.mrsigner}")
    click.echo(f"base       {loaded.base:#x}  size {loaded.size:#x}  pages {loaded.pages}")
    click.echo(f"EPC pages  {used} used (enclave pages + SECS + VA pages), {swapped} swapped out; "
               f"{kernel.pool.nr_free} free of {kernel.pool.nr_pages}")


def _explain(code: int | None, sgxs: str, sig: str) -> tuple[str, str]:
    """Which input an ioctl errno points at, and why (ioctl.c return values)."""
    import errno

    if code == errno.EPERM:
        return sig, "EINIT rejected the SIGSTRUCT for this image (SGX_IOC_ENCLAVE_INIT)"
    if code == errno.EACCES:
        return sig, "the enclave asks for attributes the kernel does not allow (PROVISIONKEY needs /dev/sgx_provision)"
    if code == errno.EINVAL:
        return sig, "the kernel refused the SIGSTRUCT or SECS (reserved attributes, XFRM or MISCSELECT bits)"
    if code == errno.EIO:
        return sgxs, "the processor refused the SECS or a page (ECREATE/EADD/EEXTEND faulted)"
    if code == errno.ENOMEM:
        return "--epc", "not enough EPC for the enclave"
    return sgxs, f"loading failed: {os.strerror(code) if code else 'error'}"


def _errname(code: int | None) -> str:
    import errno

    return errno.errorcode.get(code or 0, str(code))


def register(cli: click.Group) -> None:
    """Add ``vepc enclave`` to the top-level group."""
    cli.add_command(enclave)
