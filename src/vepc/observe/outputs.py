"""Write a run's artefacts: Perfetto trace, picture, HTML page, JSON document, plain-text report.

>>> # write_outputs(result, trace="t.json", plot="epc.png", html="run.html")
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_outputs", "OutputError"]


class OutputError(OSError):
    """An output file could not be written; ``str()`` is ``"PATH: cannot write: reason"``."""

    def __init__(self, path: Path, err: OSError) -> None:
        super().__init__(err.errno, f"{path}: cannot write: {err.strerror or err}")

    def __str__(self) -> str:
        return self.strerror


def _write(path: str | Path, data: str | bytes) -> Path:
    path = Path(path)
    try:
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data, encoding="utf-8")
    except OSError as e:
        raise OutputError(path, e) from None
    return path


def write_outputs(result, *, trace: str | Path | None = None, plot: str | Path | None = None,
                  html: str | Path | None = None, json_path: str | Path | None = None,
                  text: str | Path | None = None, verbose: bool = False, title: str | None = None) -> list[Path]:
    """Write whichever outputs are asked for; returns their paths. Raises :class:`OutputError`."""
    written: list[Path] = []
    doc = None
    if json_path is not None or text is not None:
        doc = result.to_dict()
    if trace is not None:
        from vepc.observe.trace import chrome_trace

        tr = chrome_trace(result.timeline, [s.as_dict() for s in result.steps],
                          title=title or result.scenario.title or result.scenario.source)
        written.append(_write(trace, json.dumps(tr, separators=(",", ":"))))
    if plot is not None or html is not None:
        from vepc.observe.pictures import epc_map_figure, figure_png, occupancy_figure, story_figure

        if plot is not None:
            fig = story_figure(result.timeline, result.recorder.snapshots,
                               title=title or result.scenario.title or result.scenario.source)
            written.append(_write(plot, figure_png(fig)))
        if html is not None:
            from vepc.observe.html import html_page

            occ = figure_png(occupancy_figure(result.timeline))
            epc_map = figure_png(epc_map_figure(result.recorder.snapshots, result.timeline.groups))
            written.append(_write(html, html_page(result, occupancy_png=occ, map_png=epc_map, verbose=verbose)))
    if json_path is not None:
        written.append(_write(json_path, json.dumps(doc, indent=2) + "\n"))
    if text is not None:
        from vepc.observe.report import report_text

        written.append(_write(text, report_text(doc, verbose=verbose)))
    return written
