"""The stateful property test (vepc.reliability.stateful) at the default suite's size, and the fuzz runner
that runs the same machine at scale (``make fuzz``)."""

from __future__ import annotations

import re
import subprocess
import sys

from hypothesis import settings

from vepc.reliability import fuzz
from vepc.reliability.stateful import PROFILE, ReliabilityMachine
from vepc.reliability.world import World

#: Random sequences of host enclaves, VMs, guest enclaves, touches, reclaim, resets, kills, forks, closes,
#: exhaustion, memory failures and REMOVE_ALL races; invariants after every step, idle at the end.
TestReliabilityMachine = ReliabilityMachine.TestCase
TestReliabilityMachine.settings = settings.get_profile(PROFILE)

SUMMARY = re.compile(r"^(\d+) sequences, (\d+) steps, (\d+) invariant checks, (\d+) violations$")


def test_fuzz_runner_prints_exactly_one_summary_line():
    out = subprocess.run([sys.executable, "-m", "vepc.reliability.fuzz", "--sequences", "3", "--steps", "6",
                          "--seed", "7"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and SUMMARY.match(lines[0]), out.stdout
    seq, steps, checks, violations = map(int, SUMMARY.match(lines[0]).groups())
    assert seq >= 3 and checks >= steps + seq and violations == 0


def test_fuzz_runner_counts_and_reports_a_violation(monkeypatch):
    """A model defect slipped in (the pool forgets to count one free page) is found, counted and returned."""
    real = World.reclaim

    def broken(self):
        self.pool.nr_free += 1
        return real(self)

    monkeypatch.setattr(World, "reclaim", broken)
    monkeypatch.setattr(World, "hog", lambda self, kib=None: self.reclaim())
    line, failure = fuzz.run(40, 30, seed=3, shrink=False)
    assert SUMMARY.match(line) and not line.endswith(" 0 violations")
    assert failure is not None and "nr_free" in str(failure)
