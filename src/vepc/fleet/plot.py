"""The fleet picture: one bar per host, stacked by what holds its EPC (each VM, host enclaves, free), with
the VMs the scheduler refused and those that failed on their host named underneath.

>>> # fleet_figure(result).savefig("fleet.png")
"""

from __future__ import annotations

__all__ = ["fleet_figure", "write_fleet_plot"]


def fleet_figure(result):
    from vepc.observe.pictures import _figure

    hosts = result.hosts
    fig = _figure(max(7.0, 0.9 * len(hosts) + 4), 5.0)
    ax = fig.add_subplot(1, 1, 1)
    mib = 1 << 20
    cmap = fig.colormaps["tab20"] if hasattr(fig, "colormaps") else None
    for i, h in enumerate(hosts):
        bottom = 0.0
        for j, v in enumerate(h["vms"]):
            height = v["epc_committed_bytes"] / mib
            if height:
                color = cmap(j % 20) if cmap is not None else None
                ax.bar(i, height, bottom=bottom, color=color, edgecolor="white", linewidth=0.5)
                if height >= 0.06 * h["epc_bytes"] / mib:
                    ax.text(i, bottom + height / 2, v["name"], ha="center", va="center", fontsize=7)
                bottom += height
        if h["host_enclave_bytes"]:
            ax.bar(i, h["host_enclave_bytes"] / mib, bottom=bottom, color="white", edgecolor="#555555", hatch="//",
                   label="host enclaves" if not any(x["host_enclave_bytes"] for x in hosts[:i]) else None)
            bottom += h["host_enclave_bytes"] / mib
        ax.bar(i, h["free_bytes"] / mib, bottom=bottom, color="#e8e8e8", edgecolor="white",
               label="free" if i == 0 else None)
    ax.set_xticks(range(len(hosts)), [h["name"] for h in hosts], rotation=30 if len(hosts) > 6 else 0)
    ax.set_ylabel("EPC (MiB)")
    s = result.spec
    ax.set_title(f"{s.title or s.source}\npolicy {s.policy}, {len(s.vms)} VMs on {len(hosts)} hosts", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.subplots_adjust(right=0.83)
    notes = []
    if result.refused:
        notes.append("refused by the scheduler: " + ", ".join(v["name"] for v in result.refused))
    if result.failed:
        notes.append("failed on their host: " + ", ".join(f"{v['name']} ({v['host']})" for v in result.failed))
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=8, va="bottom")
        fig.subplots_adjust(bottom=0.12 + 0.05 * len(notes))
    return fig


def write_fleet_plot(result, path) -> None:
    fleet_figure(result).savefig(path)
