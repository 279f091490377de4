"""Ablation distributions (Appendix A, Eqs 35-38): Zero, Mean, Resample, Noise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from causalnet import Ablation, Mean, Noise, Resample, Zero
from causalnet.errors import InterventionError, ShapeError


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


NAT = torch.tensor([[1.0, 10.0], [2.0, 20.0], [4.0, 40.0], [8.0, 80.0]])  # [B=4, 2]


def test_every_ablation_has_the_common_interface() -> None:
    for abl in (Zero(), Mean(), Resample(k=2), Noise(0.1, k=3)):
        assert isinstance(abl, Ablation)
        out = abl.sample(NAT, gen())
        assert out.shape == (abl.n_draws, *NAT.shape)
        assert out.dtype == NAT.dtype
        assert repr(abl).startswith(type(abl).__name__)


def test_zero_ablation_is_zeros() -> None:
    assert torch.equal(Zero().sample(NAT, gen()), torch.zeros(1, 4, 2))


def test_mean_ablation_default_is_the_leave_one_out_mean() -> None:
    out = Mean().sample(NAT, gen())[0]
    for b in range(4):
        others = torch.cat([NAT[:b], NAT[b + 1 :]])
        assert torch.allclose(out[b], others.mean(0))


def test_mean_ablation_with_a_pool_is_the_pool_mean() -> None:
    pool = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    out = Mean(pool=pool).sample(NAT, gen())
    assert torch.equal(out, torch.tensor([1.0, 2.0]).expand(1, 4, 2))


def test_resample_default_never_uses_the_contexts_own_value() -> None:
    nat = torch.arange(5.0).unsqueeze(-1) * torch.ones(3)  # row b is all b: values identify rows
    for seed in range(20):
        out = Resample(k=4).sample(nat, gen(seed))
        for b in range(5):
            sources = out[:, b, 0].tolist()
            assert b not in sources
            assert len(set(sources)) == 4  # distinct: drawn without replacement


def test_resample_with_a_pool_draws_pool_rows() -> None:
    pool = torch.tensor([[100.0, 0.0], [200.0, 0.0], [300.0, 0.0]])
    out = Resample(pool=pool, k=3).sample(NAT, gen())
    assert out.shape == (3, 4, 2)
    for b in range(4):
        assert sorted(out[:, b, 0].tolist()) == [100.0, 200.0, 300.0]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    extra=st.integers(0, 5),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**31),
    exclude=st.booleans(),
)
def test_draw_sources_are_distinct_and_exclude_own(n, extra, k, seed, exclude) -> None:
    pool_size = n + extra
    own = torch.randint(pool_size, (n,), generator=gen(seed)) if exclude else None
    available = pool_size - (1 if exclude else 0)
    if k > available:
        with pytest.raises(InterventionError, match=f"k={k}"):
            Resample.draw_sources(n, pool_size, k, gen(seed), own=own)
        return
    idx = Resample.draw_sources(n, pool_size, k, gen(seed), own=own)
    assert idx.dtype == torch.long and idx.shape == (k, n)
    assert int(idx.min()) >= 0 and int(idx.max()) < pool_size
    for b in range(n):
        col = idx[:, b].tolist()
        assert len(set(col)) == k
        if own is not None:
            assert int(own[b]) not in col
    assert torch.equal(idx, Resample.draw_sources(n, pool_size, k, gen(seed), own=own))


def test_draw_sources_is_uniform_over_the_other_contexts() -> None:
    idx = Resample.draw_sources(2000, 4, 1, gen(0), own=torch.zeros(2000, dtype=torch.long))
    counts = torch.bincount(idx[0], minlength=4)
    assert counts[0] == 0
    assert all(abs(int(c) - 2000 / 3) < 100 for c in counts[1:])  # ~6 standard deviations


def test_sampling_is_seeded_and_reproducible() -> None:
    for abl in (Resample(k=2), Noise(1.0, k=2)):
        assert torch.equal(abl.sample(NAT, gen(3)), abl.sample(NAT, gen(3)))
        assert not torch.equal(abl.sample(NAT, gen(3)), abl.sample(NAT, gen(4)))


def test_noise_adds_gaussian_noise_with_the_given_std() -> None:
    nat = torch.zeros(1000, 4, dtype=torch.float64)
    out = Noise(2.0, k=3).sample(nat, gen())
    assert out.shape == (3, 1000, 4)
    assert abs(out.mean().item()) < 0.1
    assert abs(out.std().item() - 2.0) < 0.05
    assert torch.equal(Noise(0.0, k=2).sample(NAT, gen()), NAT.expand(2, 4, 2))


def test_bad_parameters_are_intervention_errors() -> None:
    with pytest.raises(InterventionError):
        Noise(-1.0)
    with pytest.raises(InterventionError):
        Noise(float("nan"))
    with pytest.raises(InterventionError):
        Resample(k=0)
    with pytest.raises(InterventionError):
        Noise(1.0, k=1.5)
    with pytest.raises(InterventionError, match="'h'"):
        Noise(1.0).sample(torch.ones(3, dtype=torch.long), gen(), node="h")


def test_too_small_a_batch_names_the_node() -> None:
    one = torch.ones(1, 2)
    with pytest.raises(InterventionError, match="'attn.3'"):
        Mean().sample(one, gen(), node="attn.3")
    with pytest.raises(InterventionError, match="'attn.3'"):
        Resample().sample(one, gen(), node="attn.3")
    with pytest.raises(InterventionError, match=r"k=4.*'attn.3'"):
        Resample(k=4).sample(NAT, gen(), node="attn.3")  # only 3 other contexts
    with pytest.raises(InterventionError, match="'attn.3'"):
        Resample(pool=torch.ones(2, 2), k=3).sample(NAT, gen(), node="attn.3")


def test_pool_of_the_wrong_shape_names_the_node() -> None:
    with pytest.raises(ShapeError, match="'m'"):
        Mean(pool=torch.ones(3, 5)).sample(NAT, gen(), node="m")
    with pytest.raises(ShapeError, match="'m'"):
        Resample(pool=torch.ones(3)).sample(NAT, gen(), node="m")
    with pytest.raises(InterventionError, match="'m'"):
        Mean(pool=torch.ones(0, 2)).sample(NAT, gen(), node="m")
