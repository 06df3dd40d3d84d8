"""``python -m vepc.reliability.fuzz --sequences N``: run the stateful property test many times.

It drives :class:`~vepc.reliability.stateful.ReliabilityMachine` (the machine the test suite runs with a
small profile) for ``N`` random sequences of up to ``--steps`` operations and prints exactly one line::

    N sequences, N steps, N invariant checks, N violations

A violation stops the run; Hypothesis then shrinks it to a minimal sequence, which goes to stderr (with
the blob to replay it), and the exit status is 1. ``make fuzz`` runs this with a large N.

Example::

    python -m vepc.reliability.fuzz --sequences 200 --steps 40 --seed 1
"""

from __future__ import annotations

import argparse
import sys
import traceback

__all__ = ["main", "run"]


def run(sequences: int, steps: int = 50, seed: int | None = None, shrink: bool = True) -> tuple[str, BaseException | None]:
    """Run the machine; returns the summary line and the failure (None when every invariant held)."""
    from hypothesis import Phase, settings
    from hypothesis.stateful import run_state_machine_as_test

    from vepc.reliability.stateful import FUZZ_PROFILE, STATS, ReliabilityMachine

    STATS.reset()
    phases = [Phase.generate, Phase.shrink] if shrink else [Phase.generate]
    s = settings(settings.get_profile(FUZZ_PROFILE), max_examples=sequences, stateful_step_count=steps, phases=phases)
    failure: BaseException | None = None
    try:
        if seed is None:
            run_state_machine_as_test(ReliabilityMachine, settings=s)
        else:
            _run_seeded(ReliabilityMachine, s, seed)
    except Exception as e:                # an invariant violation or a model bug: report, do not hide
        failure = e
        if not STATS.violations:
            STATS.violations = 1          # a crash of the model counts as a violation too
    return STATS.line(), failure


def _run_seeded(machine, s, seed: int) -> None:
    """``run_state_machine_as_test`` with a fixed Hypothesis seed (reproducible runs)."""
    from hypothesis import seed as hseed
    try:
        from hypothesis.stateful import get_state_machine_test
    except ImportError:                   # an internal helper; without it the run is just not seeded
        from hypothesis.stateful import run_state_machine_as_test
        run_state_machine_as_test(machine, settings=s)
        return
    test = get_state_machine_test(machine, settings=s, _min_steps=0, _flaky_state={"selecting_rule": False})
    hseed(seed)(test)()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vepc.reliability.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--sequences", type=int, default=200, help="random operation sequences to run (default 200)")
    p.add_argument("--steps", type=int, default=50, help="maximum operations per sequence (default 50)")
    p.add_argument("--seed", type=int, default=None, help="Hypothesis seed, for a reproducible run")
    p.add_argument("--no-shrink", action="store_true", help="report a violation as found, without shrinking it")
    args = p.parse_args(argv)
    if args.sequences <= 0 or args.steps <= 0:
        p.error("--sequences and --steps must be positive")
    line, failure = run(args.sequences, args.steps, args.seed, shrink=not args.no_shrink)
    print(line, flush=True)
    if failure is not None:
        print("".join(traceback.format_exception(failure)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
