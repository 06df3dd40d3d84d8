"""Where the model's time goes: cProfile of ``vepc run examples/seed_story.toml`` and of the per-page
guest touch loop, the top functions by own time ([Speed] issue: "profile first"). A full ``vepc bench``
records both in its run, and docs/performance.md shows them.

>>> rows = profile_top(lambda: sum(range(1000)), n=3)
>>> sorted(rows[0]) == ["calls", "cumtime", "function", "share", "tottime"]
True
"""

from __future__ import annotations

import cProfile
import pstats
from pathlib import Path
from typing import Callable

__all__ = ["profile_top", "run_profiles", "SEED_STORY"]

#: The scenario the [Speed] issue names (present in a checkout, not in an installed wheel).
SEED_STORY = Path(__file__).resolve().parents[3] / "examples" / "seed_story.toml"


def _where(key: tuple[str, int, str]) -> str:
    filename, line, name = key
    if "/vepc/" in filename:
        filename = "vepc/" + filename.rsplit("/vepc/", 1)[1]
    elif filename.startswith("~") or filename.startswith("<"):
        return name                                          # built-ins: "{method 'update' of ...}"
    else:
        filename = filename.rsplit("/", 1)[-1]
    return f"{filename}:{line}({name})"


def profile_top(fn: Callable[[], object], n: int = 10) -> list[dict]:
    """Run ``fn`` under cProfile; the ``n`` functions with the most own time: function, calls, own and
    cumulative seconds, and the share of the total own time."""
    prof = cProfile.Profile()
    prof.enable()
    try:
        fn()
    finally:
        prof.disable()
    stats = pstats.Stats(prof).stats                      # {key: (cc, nc, tt, ct, callers)}
    total = sum(v[2] for v in stats.values()) or 1.0
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    return [{"function": _where(k), "calls": v[1], "tottime": round(v[2], 4), "cumtime": round(v[3], 4),
             "share": round(v[2] / total, 3)} for k, v in top]


def _seed_story() -> None:
    from vepc.scenario import Scenario
    from vepc.scenario.runner import ScenarioRunner

    ScenarioRunner(Scenario.load(str(SEED_STORY))).run()


def _guest_touch(pages: int = 8192) -> Callable[[], None]:
    from vepc.bench.figures import _host, _Toucher

    toucher = _Toucher(_host("64M"), pages * 4096)
    return lambda: toucher.touch(pages)


def run_profiles() -> dict[str, list[dict]]:
    """``{"seed_story": [...], "guest_touch": [...]}`` (the first only where examples/ is present)."""
    out = {}
    if SEED_STORY.exists():
        out["seed_story"] = profile_top(_seed_story)
    out["guest_touch"] = profile_top(_guest_touch())
    return out
