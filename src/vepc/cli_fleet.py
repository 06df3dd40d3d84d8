"""``vepc fleet``: pack VMs onto hosts by EPC request and run every host (see :mod:`vepc.fleet`)."""

from __future__ import annotations

import json
import sys

import click

__all__ = ["register"]


def _fail(message: str) -> None:
    click.echo(f"vepc: {message}", err=True)
    sys.exit(2)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n % (1 << 20) == 0 else f"{n / (1 << 20):.2f} MiB"


def register(cli: click.Group) -> None:
    @cli.command("fleet")
    @click.argument("file", type=click.Path())
    @click.option("--policy", default=None, help="Override the file's packing policy "
                  "(first-fit, least-allocated, most-allocated).")
    @click.option("--workers", type=int, default=None, help="Processes to run hosts in (default: the cores).")
    @click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
                  help='Run the hosts as Ray tasks: "local" (Ray\'s local mode) or a cluster address; needs '
                       "the ray extra (pip install 'vepc[ray]').")
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
    @click.option("--plot", type=click.Path(), metavar="OUT.png", help="Write a bar per host, stacked by VM.")
    def fleet_cmd(file: str, policy: str | None, workers: int | None, ray_address: str | None, as_json: bool,
                  plot: str | None) -> None:
        """Pack the VMs of a fleet FILE (TOML, VMs optionally from CSV) onto its hosts by EPC request, run
        every host as a scenario in parallel, and report per-host EPC use and the VMs refused.

        Exit status: 0 when every placed VM runs and every host's invariants hold, 1 otherwise, 2 for bad
        input.

        \b
        Example:
          vepc fleet examples/fleet.toml --plot fleet.png
          vepc fleet examples/fleet.toml --policy most-allocated --json
        """
        from rich.console import Console
        from rich.table import Table

        from vepc.fleet import POLICIES, FleetError, FleetSpec, run_fleet
        from vepc.fleet.run import RayUnavailable

        try:
            spec = FleetSpec.load(file)
        except FleetError as e:
            _fail(str(e))
        if policy is not None:
            if policy not in POLICIES:
                _fail(f"--policy: unknown policy {policy!r} (expected one of: {', '.join(POLICIES)})")
            spec.policy = policy
        if workers is not None and workers < 1:
            _fail(f"--workers must be at least 1, not {workers}")
        try:
            result = run_fleet(spec, workers=workers, ray_address=ray_address)
        except RayUnavailable as e:
            _fail(str(e))
        doc = result.to_dict()
        status = 0 if doc["ok"] and not doc["failed"] else 1
        if plot:
            from vepc.fleet.plot import write_fleet_plot

            try:
                write_fleet_plot(result, plot)
            except OSError as e:
                _fail(f"--plot: {plot}: {e.strerror or e}")
        if as_json:
            click.echo(json.dumps(doc, indent=2))
            sys.exit(status)
        t = Table(title=f"{spec.title or spec.source}: {len(spec.vms)} VMs, {len(spec.hosts)} hosts, policy "
                        f"{spec.policy}, run on {result.executor}")
        for col in ("host", "EPC", "requested", "committed", "host enclaves", "free", "VMs running", "VMs failed",
                    "EWB pages"):
            t.add_column(col, justify="left" if col == "host" else "right")
        for h in doc["hosts"]:
            running = sum(v["state"] == "running" for v in h["vms"])
            t.add_row(h["name"], _mib(h["epc_bytes"]), _mib(h["requested_bytes"]), _mib(h["committed_bytes"]),
                      _mib(h["host_enclave_bytes"]), _mib(h["free_bytes"]), str(running),
                      str(len(h["vms"]) - running), str(h["ewb_pages"]))
        con = Console()
        con.print(t)
        for v in doc["refused"]:
            con.print(f"refused by the scheduler: {v['name']} ({_mib(v['epc_bytes'])}): {v['reason']}")
        for v in doc["failed"]:
            con.print(f"failed on {v['host']}: {v['name']}: {v['error']}")
        total = sum(h["epc_bytes"] for h in doc["hosts"])
        used = sum(h["committed_bytes"] for h in doc["hosts"])
        con.print(f"fleet EPC: {_mib(used)} of {_mib(total)} committed to VMs; {len(doc['refused'])} VMs refused, "
                  f"{len(doc['failed'])} failed on their host")
        sys.exit(status)
