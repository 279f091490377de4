"""Where a hand-written family also applies, the discovered path agrees with it (issue 10).

The hand-written adapters compute with their own block methods and the fast final-position
patch engine; the generic adapter hooks the model's own forward. Independent code, same
numbers: clean runs and patches agree to 1e-5 in float32 (1e-8 in float64, or the model's
``norm_atol`` where its block norms round to float32: Gemma 3) of the compared quantity's scale
(at least 1) on every tiny model of the shared registry (``tiny`` fixture, Gemma 3 included); on
the bundled SmolLM2 clean runs to 1e-5 of their scale and resample patches to 1e-4. Head
granularity where the generic adapter offers it, Gemma 3's heads under its post-attention norm
included (both define them as shares of attn.l at the norm's frozen scale; the generic adapter
refuses them only where the norm has a zero gain entry, its ``head_refusal``).
"""

from __future__ import annotations

import pytest
import torch

from causalnet.adapters import TransformerAdapter, adapt, load
from causalnet.adapters.generic import GenericAdapter

ATOL = {torch.float32: 1e-5, torch.float64: 1e-8}


def _agree(
    hand: TransformerAdapter,
    tokens: torch.Tensor,
    granularity: str,
    source: torch.Tensor | None = None,
    patch_atol: float | None = None,
    generic: GenericAdapter | None = None,
    atol: float | None = None,
) -> None:
    """Clean runs, then patches of every site: random values, or with ``source`` the site
    values of that prompt's clean run (a resample ablation)."""
    generic = adapt(hand.model, generic=True) if generic is None else generic
    assert isinstance(generic, GenericAdapter)
    assert generic.arch.parallel_residual == hand.arch.parallel_residual
    assert generic.sites(granularity) == hand.sites(granularity)
    a, b = hand.clean_run(tokens, granularity), generic.clean_run(tokens, granularity)
    atol = (atol or ATOL[hand.dtype]) * max(1.0, float(a.direct_effects.abs().max()))
    assert a.target == b.target
    assert a.centred_logit == pytest.approx(b.centred_logit, abs=atol)
    assert a.sigma == pytest.approx(b.sigma, rel=atol)
    assert (a.direct_effects - b.direct_effects).abs().max() <= atol
    assert abs(a.readout_const - b.readout_const) <= atol
    sites = hand.sites(granularity)
    gen = torch.Generator().manual_seed(5)
    values = torch.randn(len(sites), 2, hand.arch.d_model, generator=gen).to(hand.dtype)
    if source is not None:
        values = hand.clean_run(source, granularity).site_values[1:, None]
    pa, pb = hand.patch(a, sites, values), generic.patch(b, sites, values)
    atol = atol if patch_atol is None else patch_atol
    assert (pa.total_effect - pb.total_effect).abs().max() <= atol
    assert (pa.direct_effects - pb.direct_effects).abs().max() <= atol
    assert (pa.sigma - pb.sigma).abs().max() <= atol * float(pa.sigma.abs().max())


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_generic_and_hand_written_adapters_agree(tiny, granularity):
    generic = adapt(tiny.model, generic=True)
    if granularity == "head" and generic.head_refusal is not None:
        # refused exactly where heads sit under a post-attention norm (the registry's fact)
        assert tiny.spec.post_norm_heads, generic.head_refusal
        pytest.skip(f"the generic adapter refuses heads here: {generic.head_refusal}")
    _agree(tiny.adapter, tiny.tokens, granularity, generic=generic, atol=_atol(tiny))


def _atol(tiny) -> float:
    """1e-5 / 1e-8, or the float32 rounding of the model's own block norms (``norm_atol``)."""
    return max(ATOL[tiny.dtype], tiny.norm_atol if tiny.dtype == torch.float64 else 0.0)


@pytest.mark.slow
def test_generic_and_hand_written_agree_on_the_bundled_smollm2():
    hand = load("smollm2-135m")
    tokens = hand.encode("The Eiffel Tower is in the city of")
    source = hand.encode("The Colosseum is in the city of")
    # patches through 30 float32 layers: 1e-4, the tolerance of the hand-written adapter's own
    # real-model tests against the naive oracle (tests/adapters/test_real_model.py)
    _agree(hand, tokens, "layer", source=source, patch_atol=1e-4)
