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


def table_rows(figures) -> list[tuple[str, ...]]:
    """figure, value, limit, ratio, goal, met; each figure's details on indented lines under it."""
    rows = [("figure", "value", "limit (same run)", "ratio", "goal", "")]
    for f in figures:
        ratio = "-" if f.ratio is None else f"{f.ratio:.2f}x"
        rows.append((f.name, _num(f.value, f.unit), _num(f.limit, f.unit), ratio, f.goal,
                     "ok" if f.meets else "MISSED"))
        for k, v in f.details.items():
            rows.append((f"  {k}", _num(v, f.detail_unit), "", "", "", ""))
    return rows


def format_table(figures) -> str:
    """The report as a text table: figure, value, limit, ratio, goal, met."""
    rows = table_rows(figures)
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
              help="Measurements per figure (default: 7, or 5 with --quick; the per-page figures 21 over 10 s, "
                   "15 over 5 s with --quick); medians are reported.")
@click.option("--markdown", "markdown", is_flag=True,
              help="Print docs/performance.md for this run (the doc is generated this way, never edited).")
@click.option("--from-json", "from_json", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Render a run saved with --json (or embedded in a generated doc) instead of measuring.")
def bench(as_json: bool, quick: bool, repeat: int | None, markdown: bool, from_json: str | None) -> None:
    """Measure the model against the machine's own limits (see docs/performance.md).

    \b
    Examples:
      vepc bench
      vepc bench --quick --json
      vepc bench --markdown > docs/performance.md
    """
    from vepc.bench import run_bench
    from vepc.bench.doc import render_markdown, run_facts

    if from_json:
        from vepc.bench.doc import load_run
        try:
            run = load_run(from_json)
        except ValueError as e:
            click.echo(f"vepc: {from_json}: {e}", err=True)
            sys.exit(2)
    else:
        def progress(name: str) -> None:
            click.echo(f"measuring {name.replace('_', ' ')} ...", err=True)

        result = run_bench(quick=quick, repeats=repeat, progress=progress)
        _add_real_kvm(result, quick, repeat, progress)
        run = {"run": run_facts(quick, repeat), "figures": result["figures"]}
        if not quick:                                    # where the time goes (docs/performance.md)
            from vepc.bench.profile import run_profiles
            progress("profiles")
            run["profiles"] = run_profiles()
    if markdown:
        click.echo(render_markdown(run), nl=False)
    elif as_json:
        click.echo(json.dumps(run, indent=2))
    else:
        from vepc.bench.figures import Figure
        click.echo(format_table([Figure.from_json(f) for f in run["figures"]]))
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
    # The same guest loop in both modes (at 2048 pages the ratios differed from 4096's by up to 1.4x: the
    # limit's lazy anonymous faults do not scale linearly); --quick repeats it fewer times.
    rows = real_kvm_bench(4096, repeat or (3 if quick else 5))
    # The anonymous memslot is the limit itself and the two references bound the design: details of the
    # one-page figure, not figures (they have no goal).
    refs = {d["name"]: d["value"] for d in rows if d["goal"] is None}
    what = "the same real guest loop over a lazy anonymous memslot (the host kernel's own fault path)"
    for d in rows:
        if d["goal"] is None:
            continue
        fig = Figure(d["name"], d["value"], d["unit"], d["limit"], what, goal_ratio=d["goal"],
                     details=refs if d["key"] == "real_kvm_one_page" else {}, detail_unit="pages/s", key=d["key"])
        result["_figures"].append(fig)
        result["figures"].append(fig.as_json())


def register(cli: click.Group) -> None:
    """Add ``vepc bench`` to the ``vepc`` command group: ``bench.cli.register(cli)`` in vepc.cli."""
    cli.add_command(bench)
