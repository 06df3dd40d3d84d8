"""Every module's docstring examples run (``doctest``): an example that no longer holds is a failure here,
not a stale line in the documentation. Modules whose examples need a real KVM guest guard themselves
(``realkvm_usable()``), so this runs everywhere."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import vepc

MODULES = sorted(m.name for m in pkgutil.walk_packages(vepc.__path__, "vepc."))


@pytest.mark.parametrize("name", MODULES)
def test_module_docstring_examples_hold(name):
    result = doctest.testmod(importlib.import_module(name), report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
