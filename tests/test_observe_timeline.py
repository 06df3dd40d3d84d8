"""The timeline reads the host EPC per owner from the event stream: it must agree with the kernel's own
per-page state at every step boundary, across NUMA nodes, batch events, zombies and guest kernels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vepc.events import EventKind
from vepc.observe.timeline import build_timeline, display_times
from vepc.scenario import Scenario
from vepc.scenario.runner import ScenarioRunner

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_with_snapshots(scenario: Scenario):
    return ScenarioRunner(scenario, snapshot_steps={s.index for s in scenario.steps}).run()


def assert_stream_matches_state(result) -> None:
    tl = result.timeline
    assert tl.warnings == []
    for snap in result.recorder.snapshots[:-1]:
        index = int(snap.label.split()[2].rstrip(":"))
        from_state = {k: v for k, v in snap.counts().items() if v}
        from_stream = {k: v for k, v in tl.at_step_end(index).items() if v}
        assert from_stream == from_state, f"step {index}"
    pool = result.machine.kernel.pool
    assert tl.final_free_by_node == {n: pool.node_free(n) for n in pool.nodes}
    assert tl.final["free"] == pool.nr_free


@pytest.mark.parametrize("name", ["seed_story.toml", "lazy_guest_efault.toml", "no_reclaim_for_vms.toml"])
def test_the_stream_agrees_with_the_kernel_state_after_every_step(name):
    assert_stream_matches_state(run_with_snapshots(Scenario.load(EXAMPLES / name)))


def test_batch_allocations_and_frees_across_nodes_are_counted_per_node():
    # A host process touching 3 MiB of /dev/sgx_vepc takes the batch path (fault_range, alloc_batch): node 0
    # runs dry after 2 MiB, the rest comes from node 1; releasing it frees both nodes in one batch.
    s = Scenario.from_toml('[host]\nepc = ["2M@0", "2M@1"]\n[[step]]\ndo = "touch"\nname = "raw"\nsize = "3M"\n'
                           '[[step]]\ndo = "destroy"\nname = "raw"\n')
    r = run_with_snapshots(s)
    assert_stream_matches_state(r)
    tl = r.timeline
    j = int(np.searchsorted(tl.samples_ns, tl.steps[0][3], side="right")) - 1
    assert {n: int(tl.free_by_node[n][j]) for n in tl.nodes} == {0: 0, 1: 256}
    assert int(tl.pages["raw (host vepc)"][j]) == 768


def test_guest_kernel_events_are_not_host_pages():
    s = Scenario.load(EXAMPLES / "seed_story.toml")
    r = ScenarioRunner(s).run()
    assert r.recorder.guest_rows                                 # guests spoke ...
    tl = r.timeline
    step3 = tl.at_step_end(3)
    assert step3["web"] == step3["db"] == 1024                   # ... but each VM is its 4 MiB of host EPC


def test_display_times_spread_each_tick_and_stop_at_step_boundaries():
    assert display_times([0, 0, 0, 0], 4).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert display_times([5, 5, 9], 20, ticks=[5, 7, 9, 20]).tolist() == [6.0, 7.0, 20.0]


def test_a_timeline_of_a_bare_machine():
    from vepc.machine import Machine
    from vepc.observe.recorder import Recorder

    m = Machine.build(epc=["1M@0", "1M@1"])
    tl = build_timeline(Recorder(m))
    assert tl.final["free"] == 512 and tl.final["unsanitized"] == 0
    assert tl.pages["unsanitized"][0] == 512                     # before the boot-time sanitisation


def test_a_guests_batched_events_are_noted_as_that_guests_like_single_ones():
    """recorder._GuestEvents: rows a guest kernel appends with emit_many carry the guest's name, as rows
    from emit do (a batch path in a guest must not make its events look like the host's)."""
    from vepc.events import EventKind, EventLog
    from vepc.observe.recorder import _GuestEvents

    log, sources = EventLog(), {}
    log.emit(EventKind.EPC_ALLOC, 1, 0)                          # a host row
    guest = _GuestEvents(log, "vm0", sources)
    guest.emit(EventKind.EPC_ALLOC, 2, 5)
    guest.emit_many(EventKind.ENCL_ADD, 2, [6, 7], range(0, 8192, 4096))
    assert len(log) == 4 and sources == {1: "vm0", 2: "vm0", 3: "vm0"}
    guest.rows.append((log.now, int(EventKind.EPC_FREE), 2, 5, 1, 0, 0, None))   # a hot path's inline emit
    assert len(log) == 5 and sources[4] == "vm0" and guest.rows[4] == log.rows[4] and len(guest.rows) == 5


def test_an_allocation_through_a_guests_stream_is_noted_as_that_guests():
    """epc_pool.alloc appends its EPC_ALLOC row inline (no emit call): through a guest's stream the row
    must still be the guest's, or the timeline would count the guest's EPC as host pages."""
    from vepc.machine import Machine
    from vepc.observe.recorder import Recorder

    m = Machine.build(epc=["1M@0"])
    rec = Recorder(m)
    pool = m.kernel.pool
    pool.events = rec.guest_events("vm0")
    page = pool.alloc(None, reclaim=False)
    assert page >= 0 and m.events.rows[-1][1] == int(EventKind.EPC_ALLOC)
    assert rec.source_of(len(m.events) - 1) == "vm0"
