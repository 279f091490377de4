"""Docstring examples run and print what they show (``doctest``): the engine's modules (SCM,
effects, ablations, graph queries, toy models), the protocol's clean-run groups and the
adapters' time-step guard."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize(
    "module",
    [
        "causalnet.scm",
        "causalnet.effects",
        "causalnet.ablations",
        "causalnet.graph",
        "causalnet.toys",
        "causalnet.hydra.cleanruns",
        "causalnet.adapters.timestep",
    ],
)
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), extraglobs={"torch": torch})
    assert result.attempted > 0
    assert result.failed == 0
