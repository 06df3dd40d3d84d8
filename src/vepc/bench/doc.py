"""docs/performance.md, generated from one ``vepc bench`` run: the prose of ``performance.md`` (this
package's template) around the run's table, each limit in one line, and the run itself as JSON at the end,
so that ``vepc bench --from-json docs/performance.md --markdown`` regenerates the page byte for byte (a
test checks it: the page is never edited by hand).

Placeholders in the template: ``{{run}}`` (where and how it ran), ``{{table}}``, ``{{limits}}``,
``{{json}}``, ``{{profile:NAME}}`` (a profile the run recorded), and ``{{ratio:KEY}}`` / ``{{value:KEY}}`` / ``{{meets:KEY}}`` for the figure with that
``key`` ("(not in this run)" where the run lacks it).

>>> run = {"run": {"mode": "quick", "repeats": 1, "cores": 2, "memory_gib": 4.0, "python": "3.11.9",
...        "date": "2026-12-07", "commit": "abc"},
...        "figures": [{"name": "guest touch per page", "value": 2.0, "unit": "pages/s", "limit": 8.0,
...                     "limit_what": "the kernel", "goal_ratio": 0.25, "goal_min": None, "goal_max": None,
...                     "details": {}, "detail_unit": "", "key": "guest_touch"}]}
>>> _fill("{{ratio:guest_touch}} {{meets:guest_touch}} {{ratio:build}}", run)
'0.25x ok (not in this run)'
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from datetime import date
from importlib import resources
from pathlib import Path

from vepc.bench.figures import FULL, QUICK, Figure

__all__ = ["render_markdown", "load_run", "run_facts"]

_JSON_START = "```json\n"
_JSON_END = "\n```\n"
_MARK = "<!-- the run this page was generated from; do not edit -->\n"


def run_facts(quick: bool, repeats: int | None) -> dict:
    """Where and how the run was made: mode, repeats, cores, memory, Python, date, commit, and which
    SHA-256 MRENCLAVE used (:func:`vepc.silicon.native_measure.status`)."""
    from vepc.silicon import native_measure

    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    except (ValueError, OSError):
        mem = float("nan")
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"mode": "quick" if quick else "full", "repeats": repeats or (QUICK if quick else FULL).repeats,
            "cores": os.cpu_count(), "memory_gib": round(mem, 1), "python": platform.python_version(),
            "date": date.today().isoformat(), "commit": commit, "measure_hash": native_measure.status()}


def _figures(run: dict) -> list[Figure]:
    return [Figure.from_json(f) for f in run["figures"]]


def _find(run: dict, key: str) -> Figure | None:
    for f in _figures(run):
        if f.key == key:
            return f
    return None


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(run: dict) -> str:
    from vepc.bench.cli import table_rows

    rows = table_rows(_figures(run))
    head, body = rows[0], rows[1:]
    out = ["| " + " | ".join(head[:5]) + " | meets |", "|" + "---|" * 6]
    for r in body:
        name = f"&nbsp;&nbsp;↳ {r[0][2:]}" if r[0].startswith("  ") else r[0]     # a detail line
        out.append("| " + " | ".join(_cell(c) for c in (name, *r[1:])) + " |")
    return "\n".join(out)


def _limits(run: dict) -> str:
    return "\n".join(f"- **{_cell(f.name)}**: {f.limit_what}" for f in _figures(run))


def _run_line(run: dict) -> str:
    r = run["run"]
    return (f"{r['mode']} run, {r['repeats']} repeats (medians), {r['cores']} cores, {r['memory_gib']} GiB, "
            f"Python {r['python']}, {r['date']}, commit {r['commit']}"
            + (f", MRENCLAVE hash: {r['measure_hash']}" if r.get("measure_hash") else ""))


def _profile(run: dict, name: str) -> str:
    rows = run.get("profiles", {}).get(name)
    if not rows:
        return "(not in this run)"
    out = ["| own time | share | calls | cumulative | function |", "|---:|---:|---:|---:|---|"]
    for r in rows:
        out.append(f"| {r['tottime']:.3f} s | {r['share']:.0%} | {r['calls']} | {r['cumtime']:.3f} s | "
                   f"`{_cell(r['function'])}` |")
    return "\n".join(out)


def _fill(template: str, run: dict) -> str:
    def one(m: re.Match) -> str:
        kind, arg = m.group(1), m.group(2)
        if kind == "profile":
            return _profile(run, arg)
        if kind == "run":
            return _run_line(run)
        if kind == "table":
            return _table(run)
        if kind == "limits":
            return _limits(run)
        if kind == "json":
            return _MARK + _JSON_START + json.dumps(run, indent=1) + _JSON_END
        f = _find(run, arg)
        if f is None:
            return "(not in this run)"
        if kind == "ratio":
            return "n/a" if f.ratio is None else f"{f.ratio:.2f}x"
        if kind == "meets":
            return "ok" if f.meets else "MISSED"
        from vepc.bench.cli import _num
        return _num(f.value, f.unit)

    return re.sub(r"\{\{(run|table|limits|json|ratio|value|meets|profile)(?::([^}]+))?\}\}", one, template)


def render_markdown(run: dict) -> str:
    """docs/performance.md for ``run`` (``{"run": facts, "figures": [...]}`` as ``vepc bench --json`` prints)."""
    template = resources.files("vepc.bench").joinpath("performance.md").read_text(encoding="utf-8")
    return _fill(template, run)


def load_run(path: str) -> dict:
    """A run from ``vepc bench --json`` output or from a page ``render_markdown`` wrote."""
    text = Path(path).read_text(encoding="utf-8")
    if _MARK in text:
        text = text.split(_MARK, 1)[1]
        if not text.startswith(_JSON_START) or _JSON_END not in text:
            raise ValueError("the embedded run is not a ```json block")
        text = text[len(_JSON_START):].split(_JSON_END, 1)[0]
    try:
        run = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not a bench run: {e}") from None
    if not isinstance(run, dict) or not isinstance(run.get("figures"), list) or "run" not in run:
        raise ValueError('not a bench run: expected {"run": {...}, "figures": [...]}')
    try:
        _figures(run)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"a figure is malformed: {e}") from None
    return run
