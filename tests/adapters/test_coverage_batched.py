"""Batched clean runs on every working discovered type (the sweep's groups of prompts,
:mod:`causalnet.hydra.cleanruns`): two prompts of different lengths in one padded forward give
each prompt its own clean run and, where the cache can be cut exactly, its own cache
(:func:`causalnet.adapters.frozencache.prefix_caches`). Patches from them agree with the hooked
re-forward of each prompt alone (:func:`causalnet.adapters.trace.reforward_patch`, one forward
per row): centred logit, sigma and direct effects within 1e-4 of max(1, |value|) in float32;
the clean site values, logits and centred logit with the prompt's own clean run within 1e-5 of
their scale, the same target. About 25 s:
slow tier.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from coverage_record import RECORD, working

from causalnet.adapters import adapt
from causalnet.adapters.generic import GenericAdapter
from causalnet.adapters.tiny_configs import probe_tokens, tiny_model
from causalnet.adapters.trace import reforward_patch

DISCOVERED = working("GenericAdapter")


@pytest.mark.slow
@pytest.mark.skipif(
    RECORD["transformers"] != transformers.__version__,
    reason="the record was taken with another transformers",
)
@pytest.mark.parametrize("model_type", DISCOVERED)
def test_patches_from_a_batched_clean_run_equal_each_prompts_own_re_forward(model_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(model_type)
    adapter = adapt(model)
    assert isinstance(adapter, GenericAdapter)
    vocab = min(int(model.get_output_embeddings().weight.shape[0]), 128)
    tokens = probe_tokens(vocab)
    prompts = [tokens[:5], tokens[:8].flip(0)]
    sites = adapter.sites()
    gen = torch.Generator().manual_seed(0)
    for prompt, run in zip(prompts, adapter.clean_runs(prompts), strict=True):
        alone = adapter.clean_run(prompt)
        scale = max(1.0, float(alone.site_values.abs().max()))
        assert float((run.site_values - alone.site_values).abs().max()) <= 1e-5 * scale
        # the batch's logits are its prompts' own at their last positions (projected there
        # alone where the model slices by logits_to_keep positions: hooks.call_model)
        assert run.target == alone.target
        top = max(1.0, float(alone.logits.abs().max()))
        assert float((run.logits - alone.logits).abs().max()) <= 1e-5 * top
        assert abs(run.centred_logit - alone.centred_logit) <= 1e-5 * top
        values = torch.randn(len(sites), 2, adapter.arch.d_model, generator=gen)
        values = values.to(adapter.dtype)
        got = adapter.patch(run, sites, values)
        want = reforward_patch(adapter, alone, [adapter.site(s) for s in sites], values)
        for name in ("centred_logit", "sigma", "direct_effects"):
            a, b = getattr(got, name).double(), getattr(want, name).double()
            off = float((a - b).abs().max()) / max(1.0, float(b.abs().max()))
            assert off <= 1e-4, f"{model_type} {name}: {off:.2e}"
