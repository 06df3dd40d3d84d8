"""Pictures of the host EPC (matplotlib, Agg canvas; no pyplot, so no global backend is touched).

* :func:`occupancy_figure` -- EPC pages over scenario time, stacked by owner (host enclaves, VA pages,
  each VM, zombie SECS, poisoned, free), with the free pages of each NUMA node below; read from the event
  stream through :class:`~vepc.observe.timeline.Timeline`.
* :func:`epc_map_figure` -- every EPC page as a cell coloured by its owner or state, one panel per
  snapshot (:class:`~vepc.observe.recorder.Snapshot`), one block of rows per EPC section. Large EPCs
  are drawn with several pages per cell (the commonest owner of the cell's pages).
* :func:`story_figure` -- both in one image (``vepc run --plot``).

>>> # png = figure_png(story_figure(result.timeline, result.recorder.snapshots))
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from vepc.arch.constants import PAGE_SIZE
from vepc.observe.recorder import (
    GROUP_DIRTY, GROUP_FREE, GROUP_HOST_ENCLAVES, GROUP_OTHER, GROUP_POISONED, GROUP_VA, GROUP_ZOMBIE, Snapshot,
)
from vepc.observe.timeline import Timeline

__all__ = ["colours_for", "occupancy_figure", "epc_map_figure", "story_figure", "figure_png", "save_figure",
           "MAP_COLUMNS"]

#: Cells per row of the EPC map (128 pages = 512 KiB per row at one page per cell).
MAP_COLUMNS = 128
#: At most this many rows of cells over all sections; beyond, a cell stands for several pages.
MAP_MAX_ROWS = 192

_FIXED_COLOURS = {
    GROUP_FREE: "#e9e9e9",
    GROUP_HOST_ENCLAVES: "#3b6fb6",
    GROUP_VA: "#9cc3e6",
    GROUP_ZOMBIE: "#e0201b",
    GROUP_POISONED: "#111111",
    GROUP_DIRTY: "#c7a27c",
    GROUP_OTHER: "#8c564b",
}
_VM_PALETTE = ["#2ca25f", "#f28e2b", "#8e6bbf", "#17becf", "#bcbd22", "#e377c2", "#7f7f7f", "#6b8e23"]


def colours_for(groups: list[str]) -> dict[str, str]:
    """A colour per group: fixed ones for the kernel's kinds, a palette for VMs in order of appearance.

    >>> colours_for(["host enclaves", "web", "free"])
    {'host enclaves': '#3b6fb6', 'web': '#2ca25f', 'free': '#e9e9e9'}
    """
    out, i = {}, 0
    for g in groups:
        if g in _FIXED_COLOURS:
            out[g] = _FIXED_COLOURS[g]
        else:
            out[g] = _VM_PALETTE[i % len(_VM_PALETTE)]
            i += 1
    return out


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _mib(pages) -> np.ndarray:
    return np.asarray(pages, dtype=np.float64) * PAGE_SIZE / (1 << 20)


def _steps_post(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Staircase form: each value holds until the next sample (the state after an event stays)."""
    if len(x) < 2:
        return x, y
    xs = np.repeat(x, 2)[1:]
    ys = np.repeat(y, 2)[:-1]
    return xs, ys


def _draw_occupancy(ax, ax_free, tl: Timeline, colours: dict[str, str]) -> None:
    x = tl.samples_ns / 1e6                                      # scenario time in ms
    shown = [g for g in tl.groups if g != GROUP_FREE and tl.pages[g].any()]
    ys = [_steps_post(x, _mib(tl.pages[g]))[1] for g in shown] + [_steps_post(x, _mib(tl.pages[GROUP_FREE]))[1]]
    labels = shown + [GROUP_FREE]
    ax.stackplot(_steps_post(x, x)[0], *ys, labels=labels, colors=[colours[g] for g in labels], linewidth=0)
    total = _mib(tl.total_pages)
    ax.set_ylim(0, float(total) * 1.08 if total else 1)
    ax.set_ylabel("host EPC (MiB)")
    ax.axhline(float(total), color="#555555", linewidth=0.8, linestyle="--")
    for index, label, start, end in tl.steps:
        ax.axvline(start / 1e6, color="#777777", linewidth=0.5, linestyle=":")
        ax_free.axvline(start / 1e6, color="#777777", linewidth=0.5, linestyle=":")
        ax.text((start + end) / 2e6, float(total) * 1.04, str(index), ha="center", va="center", fontsize=7,
                color="#333333")
    # One-page events vanish in the stack: mark them.
    marks = {"VEPC_ZOMBIE": ("zombie SECS", "v", _FIXED_COLOURS[GROUP_ZOMBIE]),
             "VEPC_ZOMBIE_FREED": ("zombie freed", "^", "#555555"),
             "VEPC_REMOVE_ALL": ("REMOVE_ALL", "d", "#444444"),
             "SIGBUS": ("SIGBUS", "X", "#000000")}
    done = set()
    for n in tl.notable:
        if n.kind in marks and n.source is None:
            label, marker, colour = marks[n.kind]
            ax.plot([n.ns / 1e6], [float(total) * 0.985], marker=marker, color=colour, markersize=6, linestyle="none",
                    label=label if label not in done else None, clip_on=False)
            done.add(label)
    ax.set_xlim(0, max(float(x[-1]) if len(x) else 1.0, 1.0))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title("Host EPC by owner over scenario time (numbers: steps)", fontsize=10, loc="left")
    for node in tl.nodes:
        ax_free.plot(x, _mib(tl.free_by_node[node]), drawstyle="steps-post", linewidth=1.2, label=f"node {node}")
    ax_free.set_ylabel("free (MiB)")
    ax_free.set_xlabel("scenario time (ms of the virtual clock; one step = 1 ms)")
    ax_free.set_xlim(ax.get_xlim())
    ax_free.set_ylim(bottom=0)
    ax_free.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, title="free EPC",
                   title_fontsize=8)
    ax.tick_params(labelbottom=False)


def occupancy_figure(tl: Timeline, title: str | None = None):
    """EPC occupancy over scenario time (a matplotlib ``Figure``)."""
    fig = _figure(11, 5.2)
    gs = fig.add_gridspec(2, 1, height_ratios=[3, 1], hspace=0.08, left=0.07, right=0.80, top=0.90, bottom=0.11)
    ax = fig.add_subplot(gs[0])
    ax_free = fig.add_subplot(gs[1], sharex=ax)
    colours = colours_for(tl.groups)
    _draw_occupancy(ax, ax_free, tl, colours)
    if title:
        fig.suptitle(title, fontsize=12, x=0.07, ha="left")
    return fig


def _cells(snap: Snapshot, pages_per_cell: int) -> list[tuple[np.ndarray, tuple[int, int, int]]]:
    """Per section: a (rows, MAP_COLUMNS) array of group codes (-1 past the end)."""
    out = []
    ngroups = len(snap.names)
    for first, npages, node in snap.sections:
        g = snap.groups[first:first + npages].astype(np.int64)
        ncells = -(-npages // pages_per_cell)
        if pages_per_cell > 1:
            pad = ncells * pages_per_cell - npages
            gp = np.concatenate([g, np.full(pad, -1)]).reshape(ncells, pages_per_cell)
            onehot = np.zeros((ncells, ngroups), dtype=np.int32)
            for code in range(ngroups):
                onehot[:, code] = (gp == code).sum(axis=1)
            # Free pages must not hide what shares a cell with them: prefer any owner present.
            onehot[:, 0] = np.where(onehot[:, 1:].sum(axis=1) > 0, 0, onehot[:, 0])
            g = onehot.argmax(axis=1)
        rows = -(-ncells // MAP_COLUMNS)
        grid = np.full(rows * MAP_COLUMNS, -1, dtype=np.int64)
        grid[:ncells] = g
        out.append((grid.reshape(rows, MAP_COLUMNS), (first, npages, node)))
    return out


def _draw_map(ax, snap: Snapshot, colours: dict[str, str], pages_per_cell: int, show_labels: bool) -> None:
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap(["#ffffff"] + [colours.get(n, "#8c564b") for n in snap.names])
    blocks = _cells(snap, pages_per_cell)
    gap = 1
    rows_total = sum(b.shape[0] for b, _ in blocks) + gap * (len(blocks) - 1)
    img = np.full((rows_total, MAP_COLUMNS), -1, dtype=np.int64)
    y = 0
    for i, (grid, (first, npages, node)) in enumerate(blocks):
        img[y:y + grid.shape[0]] = grid
        if show_labels:
            ax.text(-2, y + grid.shape[0] / 2 - 0.5, f"section {i}\nnode {node}\n{npages * PAGE_SIZE >> 20} MiB",
                    ha="right", va="center", fontsize=7)
        y += grid.shape[0] + gap
    ax.imshow(img + 1, cmap=cmap, vmin=0, vmax=len(snap.names), interpolation="nearest", aspect="auto")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(_wrap(snap.label, 44), fontsize=8)


def _wrap(text: str, width: int) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width)) or text


def _map_legend(fig, snaps: list[Snapshot], colours: dict[str, str], anchor) -> None:
    from matplotlib.patches import Patch

    present: dict[str, None] = {GROUP_FREE: None}
    for s in snaps:
        for name, n in s.counts().items():
            if n:
                present[name] = None
    for fixed in (GROUP_ZOMBIE, GROUP_POISONED, GROUP_VA):
        present.setdefault(fixed, None)
    handles = [Patch(facecolor=colours.get(n, "#8c564b"), edgecolor="#999999", label=n) for n in present]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=anchor, fontsize=8, frameon=False, title="EPC page",
               title_fontsize=8)


def _pages_per_cell(snaps: list[Snapshot]) -> int:
    if not snaps:
        return 1
    rows = sum(-(-n // MAP_COLUMNS) for _, n, _ in snaps[0].sections)
    need = max(1, math.ceil(rows / MAP_MAX_ROWS))
    return 1 << (need - 1).bit_length()                    # a power of two: rows of round sizes


def _map_note(ppc: int) -> str:
    kib = ppc * PAGE_SIZE * MAP_COLUMNS >> 10
    return (f"EPC map: one cell = {'one page' if ppc == 1 else f'{ppc} pages'}, "
            f"one row = {kib} KiB; a zombie or poisoned page is a single red or black cell")


def epc_map_figure(snaps: list[Snapshot], groups: list[str] | None = None):
    """The EPC map of each snapshot, side by side (a matplotlib ``Figure``)."""
    snaps = list(snaps)[-4:]
    names = groups or list(dict.fromkeys(n for s in snaps for n in s.names))
    colours = colours_for(names)
    ppc = _pages_per_cell(snaps)
    fig = _figure(11, 5.5)
    n = max(len(snaps), 1)
    gs = fig.add_gridspec(1, n, left=0.08, right=0.82, top=0.84, bottom=0.06, wspace=0.08)
    for i, s in enumerate(snaps):
        _draw_map(fig.add_subplot(gs[0, i]), s, colours, ppc, show_labels=(i == 0))
    _map_legend(fig, snaps, colours, (0.83, 0.84))
    fig.suptitle(_map_note(ppc), fontsize=9, x=0.08, ha="left")
    return fig


def story_figure(tl: Timeline, snaps: list[Snapshot], title: str | None = None):
    """Occupancy over time above the EPC maps: the picture ``vepc run --plot`` and ``vepc demo`` write."""
    snaps = list(snaps)[-4:]
    fig = _figure(12, 10.5)
    outer = fig.add_gridspec(2, 1, height_ratios=[1.0, 1.05], hspace=0.22, left=0.08, right=0.80, top=0.93,
                             bottom=0.03)
    top = outer[0].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.08)
    ax = fig.add_subplot(top[0])
    ax_free = fig.add_subplot(top[1], sharex=ax)
    names = list(dict.fromkeys([*tl.groups, *(n for s in snaps for n in s.names)]))
    colours = colours_for(names)
    _draw_occupancy(ax, ax_free, tl, colours)
    ppc = _pages_per_cell(snaps)
    bottom = outer[1].subgridspec(1, max(len(snaps), 1), wspace=0.08)
    for i, s in enumerate(snaps):
        _draw_map(fig.add_subplot(bottom[0, i]), s, colours, ppc, show_labels=(i == 0))
    pos = outer[1].get_position(fig)
    _map_legend(fig, snaps, colours, (0.81, pos.y1))
    fig.text(0.08, pos.y1 + 0.035, _map_note(ppc), fontsize=9, ha="left")
    if title:
        fig.suptitle(title, fontsize=13, x=0.08, ha="left")
    return fig


def figure_png(fig) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def save_figure(fig, path: str | Path) -> Path:
    """Write the figure as PNG to ``path``."""
    path = Path(path)
    path.write_bytes(figure_png(fig))
    return path
