"""The speed paths (issue #5) compute what the plain paths compute.

- ``kernels``: oneDNN linears (fused SiLU / gating) vs ``torch.nn.functional`` (float32 1e-5);
  autograd falls back to ``F.linear``.
- ``LlamaFinalStep`` (rotary folded into the prefix keys, per-head direct effects through
  W_O^T w) vs the generic ``FinalStep`` from the block methods: 1e-12 in float64, 1e-5 in
  float32, layer and head granularity, GQA/MQA, biases, sliding window, rope scaling.
- Padding, not oracles: ``final_values`` (right-padded, length-sorted batches, no vocabulary
  projection) and ``clean_runs`` (right-padded batch) vs ``clean_run`` of each prompt alone --
  which is ``clean_runs`` on a batch of one, the same block methods: these pin that padding and
  batching change nothing. The oracle for the batched paths is the Hugging Face model itself:
  its logits and the values its own hooked forward records (``naive_patch``), in
  ``test_batched_runs_match_the_models_own_forward``.
- ``vocab_mean`` is recomputed when the unembedding changes in place.
"""

from __future__ import annotations

import platform

import pytest
import torch
from tiny_models import TINY_MODELS, VOCAB
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from causalnet.adapters import adapt, kernels
from causalnet.adapters.llama import LlamaFinalStep
from causalnet.adapters.naive import naive_patch
from causalnet.adapters.patching import FinalStep
from causalnet.adapters.readout import vocab_mean

# the registry's models: all of them, and those the hand-written Llama adapter takes
LLAMA_FAMILY = [name for name, spec in TINY_MODELS.items() if spec.adapter == "LlamaAdapter"]
ALL_TINY = list(TINY_MODELS)
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def test_onednn_kernels_equal_torch_functional():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(53, 70, generator=gen)
    w = torch.randn(90, 70, generator=gen) / 8
    b = torch.randn(90, generator=gen)
    other = torch.randn(53, 90, generator=gen)
    ref = F.linear(x, w, b)
    assert (kernels.linear(x, w, b) - ref).abs().max() <= 1e-5
    assert (kernels.linear(x, w) - F.linear(x, w)).abs().max() <= 1e-5
    assert (kernels.linear_silu(x, w, b) - F.silu(ref)).abs().max() <= 1e-5
    assert (kernels.linear_mul(x, other, w, b) - ref * other).abs().max() <= 1e-5
    x3 = x.view(1, 53, 70)
    assert (kernels.linear(x3, w, b) - ref[None]).abs().max() <= 1e-5


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or not torch.backends.mkldnn.is_available(),
    reason="oneDNN's fused linear ops are expected on x86-64 builds with mkldnn only",
)
def test_onednn_is_used_for_float32_on_this_cpu():
    assert kernels.status().startswith("oneDNN"), kernels.status()
    with kernels.reference_kernels():
        assert kernels.status().startswith("torch.nn.functional")
    assert kernels.status().startswith("oneDNN")


def test_kernels_keep_autograd_through_the_plain_path():
    w = torch.nn.Parameter(torch.randn(4, 3))
    x = torch.randn(2, 3)
    kernels.linear_silu(x, w).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", LLAMA_FAMILY)
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_llama_final_step_equals_the_generic_step(shared_tiny, name, dtype, granularity):
    tiny = shared_tiny(name, dtype)
    a = tiny.adapter
    for position in (-1, 3, 0):
        clean = a.clean_run(tiny.tokens, granularity=granularity, position=position)
        assert isinstance(a._final_step(clean), LlamaFinalStep)
        sites = a.sites(granularity) + ["embed"]
        gen = torch.Generator().manual_seed(7)
        values = torch.randn(len(sites), 3, a.arch.d_model, generator=gen, dtype=dtype)
        fast = a.patch(clean, sites, values)
        a._final_step = lambda c: FinalStep(a, c)  # the block-method step, on this instance
        try:
            plain = a.patch(clean, sites, values)
        finally:
            del a._final_step
        tol = TOL[dtype]
        assert (fast.direct_effects - plain.direct_effects).abs().max() <= tol * 10
        assert (fast.centred_logit - plain.centred_logit).abs().max() <= tol * 10
        assert (fast.sigma - plain.sigma).abs().max() <= tol * 10


def test_llama_final_step_with_scaled_rotary_tables():
    """yarn scales cos/sin by attention_factor != 1: the self score carries D = cos^2 + sin^2."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    )
    model = LlamaForCausalLM(config).double().eval()
    a = adapt(model)
    tokens = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(1))
    clean = a.clean_run(tokens)
    step = a._final_step(clean)
    assert isinstance(step, LlamaFinalStep)
    assert (step.weight - 1).abs().max() > 1e-3  # the scaling is really there
    sites = a.sites()
    values = torch.randn(len(sites), 2, 64, dtype=torch.float64)
    fast = a.patch(clean, sites, values)
    a._final_step = lambda c: FinalStep(a, c)
    plain = a.patch(clean, sites, values)
    assert (fast.direct_effects - plain.direct_effects).abs().max() <= 1e-11
    assert (fast.centred_logit - plain.centred_logit).abs().max() <= 1e-11


@pytest.mark.parametrize("name", ALL_TINY)
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_final_values_padding_and_length_sorting_change_no_prompts_values(
    shared_tiny, name, granularity
):
    """Padding / batching (not an oracle): final_values in batches of 1, a few and all prompts
    equals clean_run on each prompt alone (same block methods), float64 1e-10 (or the float32
    rounding of the model's own norms inside the blocks, ``norm_atol``, where larger)."""
    tiny = shared_tiny(name, torch.float64)
    tol = max(1e-10, tiny.norm_atol)
    a = tiny.adapter
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (5, 1, 9, 3, 9, 6, 2)]
    expect = torch.stack([a.clean_run(p, granularity=granularity).site_values for p in prompts])
    for batch_tokens in (1, 12, 1000):  # one prompt per batch, a few, all at once
        got = a.final_values(prompts, granularity=granularity, batch_tokens=batch_tokens)
        assert got.shape == expect.shape
        assert (got - expect).abs().max() <= tol


def test_final_values_padding_changes_nothing_in_float32_either(shared_tiny):
    """Padding / batching in float32 (not an oracle): other matrix shapes, 1e-5."""
    tiny = shared_tiny("llama-tied-gqa", torch.float32)
    a = tiny.adapter
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (4, 8, 2, 7)]
    expect = torch.stack([a.clean_run(p).site_values for p in prompts])
    assert (a.final_values(prompts) - expect).abs().max() <= 1e-5


def test_block_methods_on_onednn_equal_the_modules_own_calls(shared_tiny):
    tiny = shared_tiny("llama-untied-bias", torch.float32)
    fast = tiny.adapter.forward(tiny.tokens, granularity="head")
    with kernels.reference_kernels():
        plain = tiny.adapter.forward(tiny.tokens, granularity="head")
    assert (fast.logits - plain.logits).abs().max() <= 1e-5
    for site, value in fast.values.items():
        assert (value - plain.values[site]).abs().max() <= 1e-5, site


def test_vocab_mean_is_recomputed_after_an_in_place_edit():
    w = torch.randn(10, 4)
    first = vocab_mean(w)
    assert vocab_mean(w) is first  # cached
    with torch.no_grad():
        w[0] += 100.0
    again = vocab_mean(w)
    assert torch.allclose(again, w.mean(0)) and not torch.allclose(again, first)


@pytest.mark.skipif(
    not kernels.status().startswith("oneDNN"), reason="packing is part of the oneDNN path only"
)
def test_packed_weight_copies_follow_edits_and_are_freed_with_the_weight():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=gen)
    x = torch.randn(5, 32, generator=gen)
    held = kernels.packed_bytes()
    assert (kernels.linear(x, w) - F.linear(x, w)).abs().max() <= 1e-5
    assert kernels.packed_bytes() == held + w.numel() * 4  # one packed copy, accounted
    with torch.no_grad():
        w.mul_(-2.0)  # an in-place edit: the copy must not be reused
    assert (kernels.linear(x, w) - F.linear(x, w)).abs().max() <= 1e-5
    w.data = torch.randn(64, 32, generator=gen)  # a replaced storage
    assert (kernels.linear(x, w) - F.linear(x, w)).abs().max() <= 1e-5
    assert kernels.packed_bytes() == held + w.numel() * 4
    del w
    assert kernels.packed_bytes() == held  # dropped with the weight


def test_packing_off_uses_the_plain_weights(monkeypatch):
    monkeypatch.setenv("CAUSALNET_PACKED_WEIGHTS", "0")
    w = torch.randn(16, 8)
    held = kernels.packed_bytes()
    x = torch.randn(3, 8)
    assert (kernels.linear(x, w) - F.linear(x, w)).abs().max() <= 1e-5
    assert kernels.packed_bytes() == held


@pytest.mark.parametrize("name", ALL_TINY)
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_clean_runs_right_padding_changes_no_prompts_run(shared_tiny, name, granularity):
    """Padding (not an oracle): a right-padded batch of prompts cut at other positions gives
    each prompt the run clean_run gives it alone -- which is clean_runs on a batch of one.
    float64 1e-10 (or the model's ``norm_atol`` where its block norms round to float32)."""
    tiny = shared_tiny(name, torch.float64)
    a, tol = tiny.adapter, max(1e-10, tiny.norm_atol)
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (6, 1, 9, 4)]
    positions = [-1, 0, 5, -2]
    batched = a.clean_runs(prompts, granularity, positions)
    for p, pos, got in zip(prompts, positions, batched, strict=True):
        ref = a.clean_run(p, granularity, pos)
        assert (got.position, got.target, got.readout_sites) == (
            ref.position,
            ref.target,
            ref.readout_sites,
        )
        assert abs(got.centred_logit - ref.centred_logit) <= tol
        assert abs(got.sigma - ref.sigma) <= tol
        for field in ("logits", "site_values", "direct_effects", "readout_dir"):
            assert (getattr(got, field) - getattr(ref, field)).abs().max() <= tol, field
        for field in ("_resid_pre", "_resid_mid", "_attn", "_heads", "_mlp"):
            assert (getattr(got, field) - getattr(ref, field)).abs().max() <= tol, field
        for k_got, k_ref in zip(got._k + got._v, ref._k + ref._v, strict=True):
            assert k_got.shape == k_ref.shape and torch.allclose(k_got, k_ref, rtol=0, atol=tol)
        # and the patch engine reads them the same way
        sites = a.sites(granularity)[:3]
        values = torch.randn(3, 2, a.arch.d_model, generator=gen, dtype=torch.float64)
        diff = (
            a.patch(got, sites, values).direct_effects - a.patch(ref, sites, values).direct_effects
        )
        assert diff.abs().max() <= tol


def test_clean_runs_checks_its_arguments(shared_tiny):
    from causalnet.errors import ContextError, ShapeError

    a = shared_tiny("llama-tied-gqa", torch.float32).adapter
    with pytest.raises(ShapeError, match="one position per prompt"):
        a.clean_runs([torch.tensor([1, 2])], positions=[0, 1])
    with pytest.raises(ShapeError, match="at least one prompt"):
        a.clean_runs([])
    with pytest.raises(ContextError, match="out of range"):
        a.clean_runs([torch.tensor([1, 2]), torch.tensor([3])], positions=[-1, 1])


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_batched_runs_match_the_models_own_forward(tiny, granularity):
    """The oracle for the padded paths: per prompt of a right-padded batch, clean_runs' logits
    equal the Hugging Face model's own logits on that prompt alone, and clean_runs' and
    final_values' site values equal what the model's own hooked forward records at that
    position (naive_patch doing do(embed = its value)). Tolerances: the shared tiny-model
    ones (logits 1e-4 / 1e-10, values 1e-4 / 1e-9 in float32 / float64)."""
    a, model = tiny.adapter, tiny.model
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (6, 1, 9)]
    positions = [-1, 0, 5]
    runs = a.clean_runs(prompts, granularity, positions)
    final = a.final_values(prompts, granularity=granularity, batch_tokens=1000)
    for i, (p, pos, run) in enumerate(zip(prompts, positions, runs, strict=True)):
        t = pos % len(p)
        with torch.no_grad():
            logits = model(input_ids=p[None, : t + 1], use_cache=False).logits[0, -1]
        assert run.target == int(logits.argmax())
        assert (run.logits - logits).abs().max() <= tiny.logit_atol
        hooked = naive_patch(a, p, "embed", run.value("embed")[None], t, granularity)
        for j, site in enumerate(run.readout_sites):
            assert (run.site_values[j] - hooked.site_values[site][0]).abs().max() <= (
                tiny.patch_atol
            ), site
        if pos == -1:  # final_values reads out at the last token
            embed = final[i, run.readout_sites.index("embed")][None]
            last = naive_patch(a, p, "embed", embed, -1, granularity)
            got = torch.stack([last.site_values[site][0] for site in run.readout_sites])
            assert (final[i] - got).abs().max() <= tiny.patch_atol
