"""The protocol's bookkeeping (Eqs 33, 34) and its exact identity on synthetic readouts."""

import pytest
import torch

from causalnet.errors import ShapeError
from causalnet.hydra.protocol import decompose

READOUTS = ["embed", "attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2"]


def _runs(seed: int, sites: list[str], n_patches: int):
    """Readouts of a fake model whose runs decompose exactly: total = sum of Delta_DE."""
    g = torch.Generator().manual_seed(seed)
    de_clean = torch.randn(len(READOUTS), generator=g, dtype=torch.float64)
    de_abl = de_clean + torch.randn(
        len(sites), n_patches, len(READOUTS), generator=g, dtype=torch.float64
    )
    total = (de_abl - de_clean).sum(-1)
    return de_clean, de_abl, total


@pytest.mark.parametrize("parallel", [False, True])
def test_identity_total_equals_self_plus_compensation_plus_upstream(parallel):
    sites = ["attn.0", "mlp.0", "attn.1", "mlp.1", "attn.2", "mlp.2"]
    de_clean, de_abl, total = _runs(0, sites, 5)
    dec = decompose(sites, READOUTS, de_clean, de_abl, total, parallel)
    assert dec.identity_residual().abs().max() < 1e-12  # float64


def test_compensatory_effect_sums_delta_de_over_downstream_sites_only():
    de_clean = torch.zeros(len(READOUTS), dtype=torch.float64)
    de_abl = torch.tensor([[[10.0, -2.0, 3.0, 5.0, -7.0, 11.0, 13.0]]], dtype=torch.float64)
    dec = decompose(["attn.1"], READOUTS, de_clean, de_abl, de_abl.sum(-1), False)
    assert float(dec.delta_self) == 5.0
    assert float(dec.compensatory_attn) == 11.0  # attn.2
    assert float(dec.compensatory_mlp) == -7.0 + 13.0  # mlp.1, mlp.2
    assert float(dec.delta_upstream) == 10.0 - 2.0 + 3.0  # embed, attn.0, mlp.0


def test_decompose_rejects_readouts_of_the_wrong_shape():
    with pytest.raises(ShapeError, match="de_ablated"):
        decompose(
            ["attn.0"], READOUTS, torch.zeros(7), torch.zeros(1, 2, 6), torch.zeros(1, 2), False
        )
    with pytest.raises(ShapeError, match="de_clean"):
        decompose(
            ["attn.0"], READOUTS, torch.zeros(6), torch.zeros(1, 2, 7), torch.zeros(1, 2), False
        )
