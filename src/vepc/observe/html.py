"""A self-contained HTML page of a run: the report, both pictures (PNG inlined as base64) and the event
table; one file to attach to a bug report or a CI artefact.

>>> # Path("run.html").write_text(html_page(result))
"""

from __future__ import annotations

import base64
import html
from collections import Counter

from vepc.events import EventKind
from vepc.observe.timeline import PER_PAGE_KINDS

__all__ = ["html_page", "MAX_EVENT_ROWS"]

#: Up to this many events the table lists every event; beyond, the per-page ones are only counted.
MAX_EVENT_ROWS = 3000

_PER_PAGE_NAMES = {k.name for k in PER_PAGE_KINDS}
_NAMES = {int(k): k.name for k in EventKind}

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1250px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
.pass { color: #1a7f37; font-weight: bold; } .fail { color: #cf222e; font-weight: bold; }
pre.report { font-size: 12px; line-height: 1.25; overflow-x: auto; background: #fafafa; padding: 0.8em; }
img { max-width: 100%; border: 1px solid #ddd; }
table.events { border-collapse: collapse; font-size: 12px; font-family: ui-monospace, monospace; }
table.events th, table.events td { border-bottom: 1px solid #eee; padding: 2px 8px; text-align: left; }
table.events th { position: sticky; top: 0; background: #f3f3f3; }
tr.step td { background: #eef4ff; font-weight: bold; }
.note { color: #666; font-size: 0.9em; }
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _step_of(seq: int, marks: list) -> int:
    idx = 0
    for m in marks:
        if m.seq <= seq:
            idx = m.index
        else:
            break
    return idx


def _events_html(result) -> str:
    rec = result.recorder
    tl = result.timeline
    rows = tl.rows
    marks = rec.steps
    out: list[str] = []
    # Per step: events by kind.
    per_step: dict[int, Counter] = {}
    for seq, r in enumerate(rows):
        per_step.setdefault(_step_of(seq, marks), Counter())[_NAMES.get(int(r[1]), str(r[1]))] += r[4]
    kinds = sorted({k for c in per_step.values() for k in c})
    out.append("<h3>Events by kind in each step (a batch event counts its pages; step 0 is the boot)</h3>")
    out.append('<div style="overflow-x:auto"><table class="events"><tr><th>step</th>'
               + "".join(f"<th>{html.escape(k)}</th>" for k in kinds) + "</tr>")
    for step in sorted(per_step):
        c = per_step[step]
        out.append(f"<tr><td>{step}</td>" + "".join(f"<td>{c.get(k, '') or ''}</td>" for k in kinds) + "</tr>")
    out.append("</table></div>")
    # The event list.
    full = len(rows) <= MAX_EVENT_ROWS
    out.append("<h3>Event list</h3>")
    if not full:
        out.append(f'<p class="note">{len(rows)} events: the per-page ones ({", ".join(sorted(_PER_PAGE_NAMES))}) '
                   "are counted above; every other event is listed.</p>")
    out.append('<table class="events"><tr><th>#</th><th>time (ms)</th><th>from</th><th>kind</th><th>owner</th>'
               "<th>page</th><th>count</th><th>arg</th><th>arg2</th><th>text</th></tr>")
    step_labels = {m.seq: f"step {m.index}: {m.label}" for m in marks}
    guest = rec.guest_rows
    mi = 0
    for seq, r in enumerate(rows):
        while mi < len(marks) and marks[mi].seq <= seq:
            out.append(f'<tr class="step"><td colspan="10">{html.escape(step_labels[marks[mi].seq])}</td></tr>')
            mi += 1
        kind = _NAMES.get(int(r[1]), str(r[1]))
        if not full and kind in _PER_PAGE_NAMES:
            continue
        src = guest.get(seq)
        owner = ""
        if r[2] > 0 and src is None:
            b = rec.owner_at(r[2], seq)
            owner = f"{r[2]} ({b.label})" if b is not None else str(r[2])
        elif r[2] >= 0:
            owner = str(r[2])
        who = f"{src} guest" if src else "host"
        out.append(f"<tr><td>{seq}</td><td>{tl.display_ns[seq] / 1e6:.4f}</td><td>{html.escape(who)}</td>"
                   f"<td>{kind}</td><td>{html.escape(owner)}</td><td>{r[3] if r[3] >= 0 else ''}</td><td>{r[4]}</td>"
                   f"<td>{r[5]}</td><td>{r[6]}</td><td>{html.escape(r[7] or '')}</td></tr>")
    while mi < len(marks):
        out.append(f'<tr class="step"><td colspan="10">{html.escape(step_labels[marks[mi].seq])}</td></tr>')
        mi += 1
    out.append("</table>")
    return "\n".join(out)


def html_page(result, *, occupancy_png: bytes | None = None, map_png: bytes | None = None,
              verbose: bool = False) -> str:
    """The page as a string; pictures are drawn here unless given."""
    from vepc.observe.pictures import epc_map_figure, figure_png, occupancy_figure
    from vepc.observe.report import report_html_fragment, summary_line

    doc = result.to_dict()
    title = result.scenario.title or result.scenario.source
    if occupancy_png is None:
        occupancy_png = figure_png(occupancy_figure(result.timeline))
    if map_png is None:
        map_png = figure_png(epc_map_figure(result.recorder.snapshots, result.timeline.groups))
    verdict = summary_line(doc)
    cls = "pass" if doc["ok"] else "fail"
    desc = f"<p>{html.escape(result.scenario.description)}</p>" if result.scenario.description else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vepc: {html.escape(title)}</title>
<style>{_STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Scenario <code>{html.escape(result.scenario.source)}</code> on the vepc model: <span class="{cls}">{html.escape(verdict)}</span></p>
{desc}
<h2>Host EPC over scenario time</h2>
{_img(occupancy_png, "host EPC by owner over scenario time")}
<h2>EPC map</h2>
{_img(map_png, "EPC map: every page coloured by owner")}
<h2>Report</h2>
{report_html_fragment(doc, verbose=verbose)}
<h2>Events</h2>
<p class="note">Scenario time is the model's virtual clock: each step takes 1 ms; the events of a step are spread
evenly over it, in order.</p>
{_events_html(result)}
</body></html>
"""
