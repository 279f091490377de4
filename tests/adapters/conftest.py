"""Shared tiny-model fixtures for the adapter tests, over the one registry ``tiny_models.py``.

The ``tiny`` fixture runs every test that asks for it on every entry of
``tiny_models.TINY_MODELS`` (Gemma 3 included), in float32 AND float64; the entry's facts and
tolerances are on ``tiny.spec`` and ``tiny.*_atol``. To add a model, add a ``TinySpec`` there.

Sharing: ``tiny``, ``llama`` and ``shared_tiny(name, dtype)`` hand out ONE model per (entry,
dtype) for the whole session (built on first use), so the default tier does not rebuild a model
per test as families are added. A test must not change a shared model: its parameters, buffers,
dtype, device, training mode, hooks and prompt tokens are fingerprinted when it is handed out
and checked again after the test, which fails naming the model otherwise. A test that edits
weights, moves or casts the model gets a private copy from ``tiny_factory(name, dtype)`` (or
``make_tiny``), built fresh on every call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from tiny_models import DTYPES, TINY_MODELS, Tiny, make_tiny


def fingerprint(t: Tiny) -> tuple:
    """What a test could change in a shared tiny model: every parameter and buffer (dtype,
    device, sum and sum of squares), training mode, the number of hooks, the prompt tokens, and
    which objects the adapter's attributes are (an override left behind, a replaced list)."""
    with torch.no_grad():
        tensors = [*t.model.named_parameters(), *t.model.named_buffers()]
        state = tuple(
            (n, x.dtype, x.device, float(x.double().sum()), float(x.double().square().sum()))
            for n, x in tensors
        )
    hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in t.model.modules()
    )
    attrs = tuple(
        (k, id(v), tuple(map(id, v)) if isinstance(v, list) else ())
        for k, v in sorted(vars(t.adapter).items())
    )
    return state, t.model.training, hooks, tuple(t.tokens.tolist()), attrs


_SHARED: dict[tuple[str, torch.dtype], tuple[Tiny, tuple]] = {}


def _shared(name: str, dtype: torch.dtype) -> Tiny:
    """The session's one copy of ``(name, dtype)``, checked unchanged since it was built."""
    key = (name, dtype)
    if key not in _SHARED:
        built = make_tiny(name, dtype)
        _SHARED[key] = (built, fingerprint(built))
    t, expected = _SHARED[key]
    if fingerprint(t) != expected:
        del _SHARED[key]  # rebuilt for the next test, so one culprit fails one test
        raise AssertionError(
            f"shared tiny model {name}-{dtype} was changed by a test (weights, buffers, dtype, "
            "device, training mode, hooks, tokens or adapter attributes); a test that changes a "
            "model or its adapter must take a "
            "private copy from tiny_factory(name, dtype)"
        )
    return t


def _handed_out(name: str, dtype: torch.dtype) -> Iterator[Tiny]:
    yield _shared(name, dtype)
    _shared(name, dtype)  # after the test: still unchanged (fails this test's teardown if not)


@pytest.fixture(
    params=[(m, d) for m in TINY_MODELS for d in DTYPES],
    ids=[f"{m}-{d}" for m in TINY_MODELS for d in DTYPES],
)
def tiny(request: pytest.FixtureRequest) -> Iterator[Tiny]:
    """Every entry of ``TINY_MODELS`` in float32 and float64 (shared: read only)."""
    name, d = request.param
    yield from _handed_out(name, DTYPES[d])


@pytest.fixture(params=list(DTYPES), ids=list(DTYPES))
def llama(request: pytest.FixtureRequest) -> Iterator[Tiny]:
    """The plain tiny Llama (tied, GQA) in float32 and float64 (shared: read only)."""
    yield from _handed_out("llama-tied-gqa", DTYPES[request.param])


@pytest.fixture
def shared_tiny() -> Iterator[Callable[[str, torch.dtype], Tiny]]:
    """``shared_tiny(name, dtype)``: the session's copy of one entry (read only; checked after
    the test like ``tiny``)."""
    used: list[tuple[str, torch.dtype]] = []

    def get(name: str, dtype: torch.dtype) -> Tiny:
        used.append((name, dtype))
        return _shared(name, dtype)

    yield get
    for name, dtype in dict.fromkeys(used):
        _shared(name, dtype)


@pytest.fixture
def tiny_factory() -> Callable[[str, torch.dtype], Tiny]:
    """``tiny_factory(name, dtype)`` builds a fresh, private copy of one entry of
    ``TINY_MODELS`` (free to edit, move or cast)."""
    return make_tiny
