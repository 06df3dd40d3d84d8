"""``vepc bench``: how fast the model is, next to what bounds it on the same machine.

Each figure is measured together with a *limit* taken in the same run -- the machine's own rate for the
same work done the cheapest way (the kernel's anonymous page faults, numpy writing the same metadata
rows, hashlib SHA-256, AES-GCM) -- and reported as value, limit, ratio and goal. Value and limit are
measured alternately and repeated; the medians are reported. Memory figures run in a fresh subprocess
each, so that one measurement's peak RSS does not carry into the next.

>>> from vepc.bench import run_bench
>>> # run_bench(quick=True)["figures"][0]["name"]  -> 'guest touch per page'

See docs/performance.md for what each figure measures and what limits it.
"""

from __future__ import annotations

from vepc.bench.figures import Figure, Sizes, run_bench

__all__ = ["Figure", "Sizes", "run_bench"]
