"""The fingerprint of an in-memory model (:func:`causalnet.hydra.fingerprints.adapter_fingerprint`):
the same weights give the same string, any changed weight another, and every parameter size
works (a float32 ``linspace`` of sample indices ran past the end of a 28,311,552-element
embedding, SmolLM2's size)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from causalnet.hydra.fingerprints import adapter_fingerprint


def _adapter(n_rows: int, d: int, seed: int = 0) -> SimpleNamespace:
    torch.manual_seed(seed)
    return SimpleNamespace(model=nn.Embedding(n_rows, d))


def test_a_parameter_whose_float32_sample_index_rounds_past_its_end_is_fingerprinted():
    adapter = _adapter(49152, 576)  # numel - 1 = 28,311,551 rounds to 28,311,552 in float32
    assert float(torch.tensor(49152 * 576 - 1, dtype=torch.float32)) == 49152 * 576
    fp = adapter_fingerprint(adapter)  # IndexError before the float64 indices
    assert fp.startswith("adapter:") and len(fp) == len("adapter:") + 64


def test_the_same_weights_give_the_same_fingerprint_and_one_changed_weight_another():
    a, b = _adapter(300, 7), _adapter(300, 7)
    assert adapter_fingerprint(a) == adapter_fingerprint(b)
    with torch.no_grad():
        b.model.weight[123, 4] += 1e-3  # not among the 64 sampled values: the bit sum moves
    assert adapter_fingerprint(a) != adapter_fingerprint(b)
