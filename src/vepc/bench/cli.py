"""``vepc bench``: the performance figures of the model next to the limits measured in the same run.

Example::

    vepc bench                 # full sizes (64 GiB prealloc, 512 GiB and 1 TiB hosts, 64 VMs): a minute or two
    vepc bench --quick --json  # small sizes, for CI
"""

from __future__ import annotations

import json
import math
import sys

import click

__all__ = ["register", "bench", "format_table"]


def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if unit == "bytes":
        for u, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
            if abs(v) >= 1 << shift:
                return f"{v / (1 << shift):.2f} {u}"
        return f"{v:.0f} B"
    for u, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale and unit in ("pages/s", "bytes/s"):
            return f"{v / scale:.3g} {u}{unit}"
    return f"{v:.3g} {unit}".strip()


def format_table(figures) -> str:
    """The report as a text table: figure, value, limit, ratio, goal, met."""
    rows = [("figure", "value", "limit (same run)", "ratio", "goal", "")]
    for f in figures:
        met = "" if f.met is None else ("ok" if f.met else "MISSED")
        ratio = "-" if f.ratio is None else f"{f.ratio:.2f}x"
        rows.append((f.name, _num(f.value, f.unit), _num(f.limit, f.unit), ratio, f.goal, met))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i in (0, 4, 5) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


@click.command("bench")
@click.option("--json", "as_json", is_flag=True, help="Print {\"figures\": [...]} as JSON.")
@click.option("--quick", is_flag=True, help="Small sizes (seconds, for CI) instead of the issue's sizes.")
@click.option("--repeat", type=click.IntRange(1, 99), default=None,
              help="Measurements per figure (default: 5, or 1 with --quick); medians are reported.")
def bench(as_json: bool, quick: bool, repeat: int | None) -> None:
    """Measure the model against the machine's own limits (see docs/performance.md).

    \b
    Examples:
      vepc bench
      vepc bench --quick --json
    """
    from vepc.bench import run_bench

    def progress(name: str) -> None:
        if not as_json:
            click.echo(f"measuring {name.replace('_', ' ')} ...", err=True)

    result = run_bench(quick=quick, repeats=repeat, progress=progress)
    _add_real_kvm(result, quick, repeat, progress)
    if as_json:
        click.echo(json.dumps({"figures": result["figures"]}, indent=2))
    else:
        click.echo(format_table(result["_figures"]))
    sys.stdout.flush()


def _add_real_kvm(result: dict, quick: bool, repeat: int | None, progress) -> None:
    """The [Real KVM] figures (a real guest's page faults served by the model's vepc fault path), where
    this machine's /dev/kvm can run a guest (otherwise the progress line says why they are missing)."""
    from vepc.bench.figures import Figure
    from vepc.realkvm import realkvm_usable

    ok, why = realkvm_usable()
    if not ok:
        progress(f"real KVM guest figures skipped: {why}")
        return
    from vepc.realkvm.bench import run_bench as real_kvm_bench

    progress("real_kvm_guest_faults")
    for d in real_kvm_bench(1024 if quick else 4096, repeat or (1 if quick else 5)):
        goal = d["goal"]
        met = None if goal is None else d["ratio"] >= goal
        fig = Figure(d["name"], d["value"], d["unit"], d["limit"], d["value"] / d["limit"],
                     "-" if goal is None else f">= {goal}x", met)
        result["_figures"].append(fig)
        result["figures"].append(fig.as_json())


def register(cli: click.Group) -> None:
    """Add ``vepc bench`` to the ``vepc`` command group: ``bench.cli.register(cli)`` in vepc.cli."""
    cli.add_command(bench)
