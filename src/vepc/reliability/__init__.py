"""Reliability tooling: the model attacked, overloaded and checked after every step.

* :mod:`vepc.reliability.world` -- a host with apps, VMs, forked children and EPC hogs, the operations the
  tests perform on it (through the public API) and the checks after each: the kernel invariants of
  :mod:`vepc.kernel.invariants` on the host (with EPCM and every VM's EPT) and every trusted guest, plus
  "poisoned pages are never reused", "no WARN", "host enclaves intact", "no PROVISIONKEY without the
  capability";
* :mod:`vepc.reliability.hostile` -- a guest issuing random and malformed ENCLS through its vCPUs;
* :mod:`vepc.reliability.stateful` -- the Hypothesis state machine over all of it (needs Hypothesis);
* :mod:`vepc.reliability.fuzz` -- ``python -m vepc.reliability.fuzz --sequences N`` (``make fuzz``);
* :mod:`vepc.reliability.enclaves` -- small signed enclaves for all of the above.

>>> from vepc.reliability.world import World
>>> w = World()
>>> w.start_vm([(64, True, 0)]), w.check(), w.teardown()
('running', [], [])
"""
