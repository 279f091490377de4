"""A state-space model as sites: Mamba's one-part blocks x + mixer(norm(x)) (issue 11, section 3).

Oracle: :func:`causalnet.adapters.naive.naive_patch` -- the Hugging Face model itself run in
full, one batch of whole prompts per site, with a forward hook replacing the mixer's output (or
the first block's input) at position t, read out from its own full logits
(:func:`causalnet.adapters.naive.naive_readout`). Independent of the discovered engine's
hooks, of the row batching and of the recurrent state. Tolerances 1e-4 (float32) and 1e-9
(float64) of max(1, |clean centred logit|). Tiny random MambaConfig: hidden 64, 4 layers,
vocabulary 100, state 8; float64 models set ``residual_in_fp32=False`` (the flag rounds the
residual to float32, which the float64 refusal test pins).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T

from causalnet.adapters import adapt
from causalnet.adapters.generic import GenericAdapter
from causalnet.adapters.naive import naive_patch, naive_readout
from causalnet.adapters.recurrent import Prefix, check_recurrent, recurrent_patch
from causalnet.adapters.trace import reforward_patch
from causalnet.errors import ModelError, UnknownNodeError, UnsupportedModelError

ATOL = {torch.float32: 1e-4, torch.float64: 1e-9}
DTYPES = [torch.float32, torch.float64]


def tiny_mamba(dtype: torch.dtype, seed: int = 0, **kw: object) -> T.MambaForCausalLM:
    cfg = dict(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=4,
        state_size=8,
        residual_in_fp32=dtype == torch.float32,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    cfg.update(kw)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.MambaForCausalLM(T.MambaConfig(**cfg)).to(dtype).eval()


_ADAPTERS: dict[torch.dtype, GenericAdapter] = {}


def mamba(dtype: torch.dtype) -> GenericAdapter:
    if dtype not in _ADAPTERS:
        adapter = adapt(tiny_mamba(dtype))
        assert isinstance(adapter, GenericAdapter)
        _ADAPTERS[dtype] = adapter
    return _ADAPTERS[dtype]


def prompt(n: int = 9, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, 100, (n,), generator=torch.Generator().manual_seed(seed))


def patch_values(adapter: GenericAdapter, clean, sites: list[str], n: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    base = torch.stack([clean.value(s) for s in sites]).double()
    noise = torch.randn(len(sites), n, base.shape[-1], generator=gen, dtype=torch.float64)
    return (base[:, None] + noise * base.abs().amax(-1, keepdim=True)[:, None]).to(adapter.dtype)


def unrounded_centred(adapter: GenericAdapter, z: torch.Tensor, target: int) -> torch.Tensor:
    """The centred logit from final residuals z [P, d] through the model's own final norm and
    unembedding modules: Mamba's forward casts its logits to float32 (``.float()``), so in
    float64 the oracle reads the same modules' output before that cast."""
    model = adapter.model
    with torch.no_grad():
        u = model.lm_head(model.backbone.norm_f(z)).double()
    return u[:, target] - u.mean(-1)


def worst_vs_naive(adapter: GenericAdapter, clean, sites: list[str], values, run) -> float:
    """Largest difference of ``run`` from the naive oracle, relative to max(1, |centred|)."""
    worst = 0.0
    scale = max(1.0, abs(clean.centred_logit))
    for i, site in enumerate(sites):
        naive = naive_patch(adapter, clean.tokens, site, values[i], clean.position)
        centred, direct, sigma = naive_readout(adapter, naive, clean.target)
        # the model's own (float32) logits agree to float32 rounding
        assert float((run.centred_logit[i] - centred).abs().max()) <= 1e-5 * scale
        if adapter.dtype == torch.float64:
            centred = unrounded_centred(adapter, naive.resid_final, clean.target)
        for got, want in (
            (run.centred_logit[i], centred),
            (run.sigma[i], sigma),
            (run.direct_effects[i], direct),
        ):
            worst = max(worst, float((got.double() - want.double()).abs().max()))
    return worst / scale


def test_discovery_finds_one_part_blocks_with_mixer_sites_and_no_heads():
    adapter = mamba(torch.float32)
    p = adapter.parts
    assert p.one_part and p.mixer_names == [f"backbone.layers.{i}.mixer" for i in range(4)]
    assert p.gamma == [1.0] * 4 and p.final_norm.name == "backbone.norm_f"
    assert adapter.sites() == ["mixer.0", "mixer.1", "mixer.2", "mixer.3"]
    assert adapter.readout_sites() == ["embed", "mixer.0", "mixer.1", "mixer.2", "mixer.3"]
    with pytest.raises(ModelError, match="no mixer is split into heads"):
        adapter.sites("head")
    with pytest.raises(UnknownNodeError, match="one-part blocks"):
        adapter.site("attn.0")
    with pytest.raises(UnknownNodeError, match="'mixer.0'"):
        adapter.clean_run(prompt()).value("mlp.1")


@pytest.mark.parametrize("dtype", DTYPES)
def test_verification_holds_eq21_logits_and_readout_at_every_position(dtype):
    v = mamba(dtype).verification
    assert max(v.blocks) <= v.tolerance and v.eq21 <= v.tolerance
    assert v.logits <= v.readout_tolerance and v.readout <= v.readout_tolerance
    assert v.heads is None


def test_clean_run_direct_effects_sum_to_the_models_centred_logit():
    adapter = mamba(torch.float64)
    tokens = prompt()
    clean = adapter.clean_run(tokens)
    with torch.no_grad():
        logits = adapter.model(input_ids=tokens[None]).logits[0, -1].double()
    assert clean.target == int(logits.argmax())
    want = float(logits[clean.target] - logits.mean())
    assert abs(clean.centred_logit - want) <= 1e-5 * max(1.0, abs(want))  # float32 logits
    total = float(clean.direct_effects.sum()) + clean.readout_const
    assert abs(total - clean.centred_logit) <= 1e-5 * max(1.0, abs(want))  # float32 norm


def test_float64_with_residual_in_fp32_is_refused_naming_the_block_and_the_flag():
    with pytest.raises(
        UnsupportedModelError, match=r"block backbone\.layers\.\d.*residual_in_fp32"
    ):
        adapt(tiny_mamba(torch.float64, residual_in_fp32=True))


def test_a_block_that_is_not_input_plus_one_part_is_refused_naming_it():
    model = tiny_mamba(torch.float32)
    # block 2 scales its output: y = 1.1 (x + mixer), so y - x is no part's output times gamma
    model.backbone.layers[2].register_forward_hook(lambda module, args, out: out * 1.1)
    with pytest.raises(UnsupportedModelError) as info:
        adapt(model)
    msg = str(info.value)
    assert "block backbone.layers.2" in msg and "gamma * one of its submodules" in msg
    assert "alpha * attn + beta * mlp" in msg  # the pair it looked for first


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("position", [-1, 0, 4])
def test_reforward_patch_agrees_with_the_naive_oracle(dtype, position):
    adapter = mamba(dtype)
    clean = adapter.clean_run(prompt(), position=position)
    sites = adapter.readout_sites()
    values = patch_values(adapter, clean, sites)
    run = reforward_patch(adapter, clean, [adapter.site(s) for s in sites], values)
    assert worst_vs_naive(adapter, clean, sites, values, run) <= ATOL[dtype]


#: The recurrent replay's tolerance: 1e-4 in float32; in float64 the precision of Mamba's own
#: single step, which computes its state update in float32 (``dt.float()``, ``state.float()``).
REPLAY_ATOL = {torch.float32: 1e-4, torch.float64: 1e-7}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("position", [-1, 0, 1, 4])
def test_recurrent_replay_agrees_with_the_naive_oracle(dtype, position):
    adapter = mamba(dtype)
    clean = adapter.clean_run(prompt(), position=position)
    sites = adapter.readout_sites()[::-1]  # any order: rows are sorted and put back
    values = patch_values(adapter, clean, sites, n=3)
    run = recurrent_patch(adapter, clean, [adapter.site(s) for s in sites], values)
    assert run.sites == sites and run.direct_effects.shape == (5, 3, 5)
    assert worst_vs_naive(adapter, clean, sites, values, run) <= REPLAY_ATOL[dtype]


def test_float32_adapter_patches_through_the_checked_recurrent_replay():
    adapter = mamba(torch.float32)
    assert adapter.fast_refusal is None and adapter.fast_error <= 1e-5
    clean = adapter.clean_run(prompt(12, seed=8))
    sites = adapter.readout_sites()
    values = patch_values(adapter, clean, sites)
    run = adapter.patch(clean, sites, values)
    replay = recurrent_patch(adapter, clean, [adapter.site(s) for s in sites], values)
    assert torch.equal(run.centred_logit, replay.centred_logit)
    assert worst_vs_naive(adapter, clean, sites, values, run) <= ATOL[torch.float32]
    # a set (hooked re-forward, every member patched) whose mixer.1 keeps its clean value is
    # the single patch of mixer.2 (recurrent replay)
    pair = torch.stack([clean.value("mixer.1")[None].expand(2, -1), values[3]])
    both = adapter.patch(clean, ["mixer.1+mixer.2"], pair)
    assert both.sites == ["mixer.1+mixer.2"]
    assert float((both.total_effect[0] - run.total_effect[3]).abs().max()) <= 1e-4


def test_float64_adapter_refuses_the_float32_step_and_patches_exactly_by_reforward():
    """Mamba's own step computes in float32 (``dt.float()``, ``exp``): in float64 the adapter
    sees the float32 operations (before any probe) and patches by the re-forward, one row per
    forward, as the oracle computes it."""
    adapter = mamba(torch.float64)
    assert "lower precision" in adapter.fast_refusal
    clean = adapter.clean_run(prompt(12, seed=8))
    sites = adapter.readout_sites()
    values = patch_values(adapter, clean, sites)
    run = adapter.patch(clean, sites, values)
    parsed = [adapter.site(s) for s in sites]
    want = reforward_patch(adapter, clean, parsed, values, rows_per_forward=1)
    assert torch.equal(run.centred_logit, want.centred_logit)
    assert worst_vs_naive(adapter, clean, sites, values, run) <= ATOL[torch.float64]


def test_the_probe_check_refuses_a_replay_that_disagrees(monkeypatch):
    adapter = mamba(torch.float32)
    real = Prefix.rows_cache

    def stale(self, cache, layer, n):  # states of the wrong prefix: zeroed
        out = real(self, cache, layer, n)
        for attr in ("conv_states", "recurrent_states"):
            for i, state in getattr(out.layers[layer], attr).items():
                getattr(out.layers[layer], attr)[i] = torch.zeros_like(state)
        return out

    monkeypatch.setattr(Prefix, "rows_cache", stale)
    why, err = check_recurrent(adapter, prompt())
    assert why is not None and "disagrees with its full forward" in why and err > 1e-4
