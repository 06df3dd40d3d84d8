"""The readable report of a run (rich tables), rendered from the ``--json`` document so that the two never
disagree; also as plain text (for files) and as HTML fragments.

>>> from rich.console import Console
>>> # render_report(result.to_dict(), Console())
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = ["render_report", "report_renderables", "report_text", "report_html_fragment", "summary_line"]


def _mib(nbytes: int | None) -> str:
    if nbytes is None:
        return "-"
    if nbytes % (1 << 20) == 0:
        return f"{nbytes >> 20} MiB"
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.2f} MiB"
    return f"{nbytes >> 10} KiB"


def summary_line(doc: dict) -> str:
    """``PASS: 16 steps, invariants hold`` or ``FAIL: step 3 (…) failed; …``.

    >>> summary_line({"steps": [{"index": 1, "ok": True}], "invariants": {"ok": True, "violations": []}})
    'PASS: 1 step, invariants hold'
    """
    steps = doc["steps"]
    failed = [s for s in steps if not s["ok"]]
    inv = doc["invariants"]
    n = len(steps)
    if not failed and inv["ok"]:
        return f"PASS: {n} step{'s' if n != 1 else ''}, invariants hold"
    parts = []
    if failed:
        parts.append(f"{len(failed)} of {n} steps failed (" + ", ".join(str(s["index"]) for s in failed) + ")")
    if not inv["ok"]:
        parts.append(f"{len(inv['violations'])} invariant violation(s)")
    return "FAIL: " + "; ".join(parts)


def _heading(text: str) -> Text:
    return Text(text, style="bold")


def _steps_table(doc: dict) -> Table:
    t = Table(expand=False, show_lines=False)
    t.add_column("#", justify="right")
    t.add_column("step")
    t.add_column("", justify="center")
    t.add_column("what happened", overflow="fold")
    for s in doc["steps"]:
        mark = Text("✓", style="green") if s["ok"] else Text("✗", style="bold red")
        what = Text(s["error"], style="red") if s["error"] else Text(s["detail"] or "")
        if s.get("note"):
            what = Text.assemble((s["note"] + "\n", "italic dim"), what)
        t.add_row(str(s["index"]), s["description"], mark, what)
    return t


def _per_step_mib_table(rows: list[dict], key: str, columns: list[str]) -> Table:
    """A row per step, a column per name of ``columns``: ``step[key][name]`` bytes in MiB."""
    t = Table()
    t.add_column("#", justify="right")
    for c in columns:
        t.add_column(c, justify="right")
    for s in rows:
        t.add_row(str(s["index"]), *[f"{s[key].get(c, 0) / (1 << 20):.2f}".rstrip("0").rstrip(".")
                                     for c in columns])
    return t


def _by_owner_table(doc: dict) -> Table | None:
    rows = [s for s in doc["steps"] if s.get("epc_by_owner")]
    if not rows:
        return None
    groups: list[str] = []
    for s in rows:
        for g in s["epc_by_owner"]:
            if g not in groups:
                groups.append(g)
    groups.sort(key=lambda g: (g == "free", 0))
    return _per_step_mib_table(rows, "epc_by_owner", groups)


def _cgroup_steps_table(doc: dict) -> Table | None:
    """misc.current of each EPC cgroup after each step: a column per cgroup (MiB)."""
    rows = [s for s in doc["steps"] if s.get("epc_by_cgroup")]
    if not rows:
        return None
    return _per_step_mib_table(rows, "epc_by_cgroup", list(rows[-1]["epc_by_cgroup"]))


def _cgroup_table(doc: dict) -> Table | None:
    """The EPC cgroups at the end: misc.current, misc.max, misc.peak, misc.events max."""
    cgs = doc.get("cgroups")
    if not cgs:
        return None
    t = Table()
    for col in ("cgroup", "misc.current", "misc.max", "misc.peak", "max events", "reclaimable pages", "tasks"):
        t.add_column(col, justify="left" if col == "cgroup" else "right")
    for c in cgs:
        ev = Text(str(c["events_max"]), style="bold red" if c["events_max"] else "")
        t.add_row(c["path"], _mib(c["current"]), "max" if c["max"] is None else _mib(c["max"]), _mib(c["peak"]),
                  ev if c["path"] != "/" else "-", str(c["reclaimable_pages"]), str(len(c["procs"])))
    return t


def comparison_table(doc: dict, upstream: dict) -> Table:
    """The steps of two runs of one scenario side by side (``vepc run --compare-upstream``): what each step
    did and the host EPC free after it, as written (with the experiment) and on an upstream host."""
    t = Table(title=f"{doc['scenario']['file']}: as written vs upstream", expand=False)
    t.add_column("#", justify="right")
    t.add_column("step")
    for side in ("as written", "upstream"):
        t.add_column(side, overflow="fold")
        t.add_column("free", justify="right")
    for a, b in zip(doc["steps"], upstream["steps"]):
        cells = []
        for s in (a, b):
            mark = Text("✓ ", style="green") if s["ok"] else Text("✗ ", style="bold red")
            text = s["error"] or s["detail"] or ""
            cells += [Text.assemble(mark, text[:160]), _mib(s["epc_by_owner"].get("free", 0))]
        t.add_row(str(a["index"]), a["description"], *cells)
    def vms(d: dict) -> str:
        up = [v for v in d["vms"] if v["state"] == "running"]
        return f"{len(up)} of {len(d['vms'])} VMs running, {_mib(sum(v['epc_committed_bytes'] for v in up))} committed"

    t.caption = f"as written: {summary_line(doc)}, {vms(doc)}; upstream: {summary_line(upstream)}, {vms(upstream)}"
    return t


def _host_table(doc: dict) -> Table:
    h = doc["host"]
    t = Table()
    for col in ("section", "base", "size", "node", "free"):
        t.add_column(col, justify="right" if col != "base" else "left")
    for i, s in enumerate(h["sections"]):
        t.add_row(str(i), f"{s['base']:#x}", _mib(s["size"]), str(s["node"]), _mib(s["free_bytes"]))
    return t


def _vm_table(doc: dict) -> Table | None:
    if not doc["vms"]:
        return None
    t = Table()
    for col in ("VM", "state", "EPC committed", "guest EPC sections", "error"):
        t.add_column(col, overflow="fold")
    for v in doc["vms"]:
        style = {"running": "green", "failed": "bold red"}.get(v["state"], "")
        q = v["query_sgx"] or {}
        secs = ", ".join(f"{_mib(s['size'])}@{s['node']}" for s in q.get("sections", [])) if "sections" in q else \
            (q.get("error", {}).get("desc", "-") if q else "-")
        t.add_row(v["name"], Text(v["state"], style=style), _mib(v["epc_committed_bytes"]), secs, v["error"] or "")
    return t


def _enclave_table(doc: dict) -> Table | None:
    rows: list[tuple[str, dict]] = [("host", e) for e in doc["host_enclaves"]]
    for v in doc["vms"]:
        rows += [(v["name"], e) for e in v["enclaves"]]
    if not rows:
        return None
    t = Table()
    for col in ("enclave", "where", "state", "MRENCLAVE", "EPC pages", "error"):
        t.add_column(col, overflow="fold", justify="right" if col == "EPC pages" else "left")
    for where, e in rows:
        style = {"initialized": "green", "failed": "bold red", "lost": "yellow"}.get(e["state"], "dim")
        t.add_row(e["name"], where, Text(e["state"], style=style), (e["mrenclave"] or "-")[:16] + ("…" if e["mrenclave"] else ""),
                  str(e["epc_pages"]), e["error"] or "")
    return t


def report_renderables(doc: dict, *, verbose: bool = False) -> list[Any]:
    """The report's parts (rich renderables) in order."""
    title = doc["scenario"].get("title")
    head = Text.assemble(("Scenario ", "bold"), (doc["scenario"]["file"], "bold cyan"),
                         (f" — {title}" if title else "", "bold"))
    h = doc["host"]
    parts: list[Any] = [head, _heading("Steps"), _steps_table(doc)]
    headed = (
        ("Host EPC by owner after each step (MiB; read from the event stream)", _by_owner_table(doc)),
        (f"Host EPC at the end: {_mib(h['epc_bytes'])}, {_mib(h['free_bytes'])} free, zombie SECS "
         f"{h['zombie_secs']}, poisoned {_mib(h['poisoned_bytes'])} (kernel {h['kernel']})", _host_table(doc)),
        ("EPC cgroups after each step (misc.current, MiB; read from the event stream)", _cgroup_steps_table(doc)),
        ("EPC cgroups at the end (sgx_epc; the EPC cgroup series, not mainline)", _cgroup_table(doc)),
        ("VMs", _vm_table(doc)),
        ("Enclaves", _enclave_table(doc)),
    )
    for heading, t in headed:
        if t is not None:
            parts += [_heading(heading), t]
    inv = doc["invariants"]
    if inv["ok"]:
        parts.append(Text(f"Invariants: all hold ({'idle' if inv['idle'] else 'EPC in use'} check), "
                          f"{doc['events']} events", style="green"))
    else:
        parts.append(Text("Invariants violated:\n  " + "\n  ".join(inv["violations"]), style="bold red"))
    if verbose:
        t = Table()
        t.add_column("kind")
        t.add_column("count", justify="right")
        for k, n in doc["event_totals"].items():
            t.add_row(k, str(n))
        parts += [_heading("Events by kind (a batch event counts its pages)"), t]
        for w in doc.get("warnings", []):
            parts.append(Text(f"kernel: {w}", style="yellow"))
    ok = doc["ok"]
    parts.append(Text(summary_line(doc), style="bold green" if ok else "bold red"))
    return parts


def render_report(doc: dict, console: Console, *, verbose: bool = False) -> None:
    """Print the report of a run's ``--json`` document on ``console``."""
    for part in report_renderables(doc, verbose=verbose):
        console.print(part)
        if isinstance(part, Table):
            console.print()


def report_text(doc: dict, *, verbose: bool = False, width: int = 120) -> str:
    """The report as plain text (no colours), e.g. for a file.

    >>> # Path("report.txt").write_text(report_text(doc))
    """
    console = Console(record=True, width=width, color_system=None, force_terminal=False, file=_Null())
    render_report(doc, console, verbose=verbose)
    return console.export_text()


def report_html_fragment(doc: dict, *, verbose: bool = False, width: int = 130) -> str:
    """The report as an HTML ``<pre>`` fragment with inline styles (for the self-contained page)."""
    console = Console(record=True, width=width, force_terminal=True, color_system="truecolor", file=_Null())
    render_report(doc, console, verbose=verbose)
    return console.export_html(inline_styles=True, code_format="<pre class=\"report\">{code}</pre>")


class _Null:
    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass

