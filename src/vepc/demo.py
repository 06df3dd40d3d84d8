"""``vepc demo``: the virtual EPC's whole story, as a built-in scenario, in a few seconds.

A host with two NUMA nodes (16 MiB of EPC each) runs a host application's enclave and two VMs:

* **web** -- one 4 MiB EPC section, preallocated: QEMU opens ``/dev/sgx_vepc``, mmaps it and touches every
  page (``qemu_prealloc_mem``); an enclave is built in the guest through the guest's own
  ``/dev/sgx_enclave``;
* **db** -- two 2 MiB EPC sections on two guest NUMA nodes; its guest process runs on node 0 for
  ENCLAVE_CREATE and on node 1 for ADD_PAGES, and the guest kernel allocates node-locally, so the SECS
  lives in section 0 and its children in section 1.

Then: EPC pressure from host enclaves (the reclaimer writes host pages out; VM pages are never reclaimed),
a reboot of web (QEMU's ``sgx_epc_reset``: SGX_IOC_VEPC_REMOVE_ALL twice), the enclave rebuilt, db
killed (its section 0 closes first: the SECS still has children, so ``sgx_vepc_release`` puts it on
``zombie_secs_pages``; closing section 1 removes the children and frees the zombie), and everything
closed until the EPC is all free again.

Enclaves come from the shared test enclave (``test_enclave.sgxs`` + ``.sig`` in ``../shared/vectors``
beside the checkout) or, when it is not there, a synthetic enclave signed with the throw-away key.

The folder it writes (default ``./vepc-demo/``): ``scenario.toml`` (rerun it with ``vepc run``),
``report.txt``, ``report.json``, ``trace.json`` (Perfetto), ``epc.png`` and ``report.html``.

>>> # run_demo("/tmp/vepc-demo")   -> 0; or: vepc demo --out /tmp/vepc-demo
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["run_demo", "default_vectors", "demo_scenario_toml", "DEMO_SNAPSHOT_STEPS", "DEMO_FILES"]

#: Steps after which the EPC map is captured (VMs up, pressure, the cross-section enclave).
DEMO_SNAPSHOT_STEPS = {3, 5, 10}
#: What the demo writes into its folder.
DEMO_FILES = ("scenario.toml", "report.txt", "report.json", "trace.json", "epc.png", "report.html")

_DEMO = """\
title = "vepc demo: the virtual EPC's whole story"
description = "Host enclaves and two VMs share a two-node host's EPC: pressure, a guest reboot, a zombie SECS."

[host]
epc = ["16M@0", "16M@1"]
kernel = "6.8"

[[vm]]
name = "web"
qemu = "-m 1G -accel kvm -cpu host -object memory-backend-epc,id=m0,size=4M,prealloc=on -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0"

[[vm]]
name = "db"
qemu = "-m 1G -accel kvm -cpu host -smp 2 -object memory-backend-ram,id=r0,size=512M -object memory-backend-ram,id=r1,size=512M -numa node,nodeid=0,cpus=0,memdev=r0 -numa node,nodeid=1,cpus=1,memdev=r1 -object memory-backend-epc,id=m0,size=2M -object memory-backend-epc,id=m1,size=2M -M sgx-epc.0.memdev=m0,sgx-epc.0.node=0,sgx-epc.1.memdev=m1,sgx-epc.1.node=1"

[[step]]
do = "enclave"
name = "billing"
note = "a host application's enclave, through the host's /dev/sgx_enclave"
{enclave}

[[step]]
do = "start"
vm = "web"
note = "QEMU opens /dev/sgx_vepc, mmaps it and preallocates: every page is an EPC page now"

[[step]]
do = "start"
vm = "db"
note = "two EPC sections on two guest NUMA nodes; the guest's boot-time EREMOVE touches every page"

[[step]]
do = "enclave"
vm = "web"
name = "web-app"
note = "built in the guest through the guest kernel's own /dev/sgx_enclave"
{enclave}

[[step]]
do = "pressure"
name = "batch-jobs"
size = "24M"
note = "host enclaves want more EPC than is free: the reclaimer writes host enclave pages out (EWB)"

[[step]]
do = "expect"
vm = "web"
epc_committed_bytes = "4M"
note = "VM pages are never reclaimed"

[[step]]
do = "reset"
vm = "web"
note = "the guest reboots: QEMU's sgx_epc_reset runs SGX_IOC_VEPC_REMOVE_ALL twice (SECS after children)"

[[step]]
do = "expect"
vm = "web"
enclave = "web-app"
enclave_state = "lost"

[[step]]
do = "enclave"
vm = "web"
name = "web-app-2"
note = "rebuilt after the reboot: REMOVE_ALL left the EPC clean for the new guest kernel"
{enclave}

[[step]]
do = "enclave"
vm = "db"
name = "db-app"
node = 0
add_node = 1
note = "ENCLAVE_CREATE on guest node 0, ADD_PAGES on node 1: SECS in section 0, children in section 1"
{enclave}

[[step]]
do = "kill"
vm = "db"
note = "section 0 closes first: its SECS has children elsewhere → zombie; section 1's release frees it"

[[step]]
do = "expect"
vm = "db"
state = "stopped"

[[step]]
do = "expect"
zombie_secs = 0
note = "the host's zombie_secs_pages is empty again"

[[step]]
do = "destroy"
name = "batch-jobs"

[[step]]
do = "shutdown"
vm = "web"

[[step]]
do = "destroy"
name = "billing"

[[step]]
do = "expect"
free_bytes = "32M"
zombie_secs = 0
note = "every page is free again: nothing leaked"
"""


def default_vectors() -> Path:
    """``../shared/vectors`` beside the checkout (where the project's shared folder lives)."""
    import vepc

    return Path(vepc.__file__).resolve().parents[3] / "shared" / "vectors"


def demo_scenario_toml(vectors: str | Path | None = None) -> tuple[str, str]:
    """(TOML text of the demo scenario, what its enclaves are). ``vectors`` given but without the test
    enclave is an ``OSError``; not given and not found, a synthetic enclave stands in.

    >>> text, what = demo_scenario_toml("/nonexistent")
    Traceback (most recent call last):
    ...
    FileNotFoundError: [Errno 2] test_enclave.sgxs/.sig not found: '/nonexistent'
    """
    folder = Path(vectors) if vectors else default_vectors()
    sgxs, sig = folder / "test_enclave.sgxs", folder / "test_enclave.sig"
    if sgxs.is_file() and sig.is_file():
        enclave = f"sgxs = {json.dumps(str(sgxs.resolve()))}\nsig = {json.dumps(str(sig.resolve()))}"
        what = f"the shared test enclave ({sgxs.resolve()})"
    elif vectors:
        raise FileNotFoundError(2, "test_enclave.sgxs/.sig not found", str(folder))
    else:
        enclave = 'size = "64K"'
        what = "a synthetic 64 KiB enclave (the shared test enclave was not found)"
    return _DEMO.replace("{enclave}", enclave), what


def run_demo(out: str | Path = "vepc-demo", *, vectors: str | Path | None = None, quiet: bool = False,
             verbose: bool = False, console=None) -> int:
    """Run the demo scenario, print its report, write the folder; returns the exit status (0 = story ok)."""
    from rich.console import Console

    from vepc.observe.outputs import OutputError, write_outputs
    from vepc.observe.progress import step_progress
    from vepc.observe.report import render_report
    from vepc.scenario import Scenario
    from vepc.scenario.runner import ScenarioRunner

    console = console or Console()
    text, what = demo_scenario_toml(vectors)
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(folder, e) from None
    scenario = Scenario.from_toml(text, source=str(folder / "scenario.toml"), base_dir=folder)
    err = Console(stderr=True)
    with step_progress(len(scenario.steps), enabled=not quiet, console=err, label="demo") as advance:
        result = ScenarioRunner(scenario, snapshot_steps=DEMO_SNAPSHOT_STEPS,
                                on_step=lambda step, pos, total: advance(f"{step.index}. {step.describe()}")).run()
    try:
        (folder / "scenario.toml").write_text(text, encoding="utf-8")
    except OSError as e:
        raise OutputError(folder / "scenario.toml", e) from None
    write_outputs(result, trace=folder / "trace.json", plot=folder / "epc.png", html=folder / "report.html",
                  json_path=folder / "report.json", text=folder / "report.txt", verbose=verbose)
    if not quiet:
        render_report(result.to_dict(), console, verbose=verbose)
        console.print(f"Enclaves: {what}.")
        console.print(f"Written to [bold]{folder}/[/]: " + ", ".join(DEMO_FILES)
                      + f"  (open {folder / 'report.html'}; load {folder / 'trace.json'} at ui.perfetto.dev)")
    return result.exit_status
