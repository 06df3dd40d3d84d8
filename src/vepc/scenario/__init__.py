"""Scenarios: a host, VMs and steps in a TOML file, run on the model with one report of everything.

>>> from vepc.scenario import Scenario, run_scenario
>>> result = run_scenario(Scenario.from_toml('[host]\\nepc = ["8M@0"]\\n'))
>>> result.exit_status
0

The file format and the ``--json`` schema: ``docs/scenarios.md``.
"""

from vepc.scenario.runner import RunResult, ScenarioRunner, StepResult, run_scenario
from vepc.scenario.spec import HostSpec, Scenario, ScenarioError, Step, VmSpec, parse_size
from vepc.scenario.synthetic import synthetic_enclave, throwaway_key

__all__ = ["Scenario", "ScenarioError", "HostSpec", "VmSpec", "Step", "parse_size", "run_scenario",
           "ScenarioRunner", "RunResult", "StepResult", "synthetic_enclave", "throwaway_key"]
