"""Fast patching of hybrids whose every block is one part (Zamba, Zamba2, Nemotron-H): the blocks
replayed at t from the model's own cache, state layers, key/value layers, both, or none
(issue 11, section 1; :mod:`causalnet.adapters.stepcalls`).

Oracles: :func:`causalnet.adapters.verify.check_patching` (one plain hooked forward of the whole
prompt per patch), :func:`causalnet.adapters.trace.reforward_patch` (the hooked re-forward) and,
for ``embed``, :func:`causalnet.adapters.naive.naive_patch` (a pre-hook on the first decoder
layer, read out from the model's own logits). None uses the cache or the row batching.
Tolerances 1e-4 (float32) and 1e-9 (float64) of max(1, |clean centred logit|). Tiny random
models of :func:`causalnet.adapters.tiny_configs.tiny_model`: Zamba (Mamba, hybrid, hybrid),
Zamba2 (Mamba2, hybrid), Nemotron-H (Mamba2, MoE, attention, MoE).

Zamba2's and Nemotron-H's Mamba2 mixers clamp the time step in their scan but not in their
step: they are replayed under a guard that sends a call with a row the scan would clamp to the
re-forward (:mod:`causalnet.adapters.timestep`); the same models with the clamp lifted
(``time_step_limit = (0, inf)`` on every mixer, the default of Mamba2) compute one function in
both and are replayed with no guard: ``"zamba2-lifted"``, ``"nemotron_h-lifted"``.
"""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import (
    DummyLayer,
    DynamicLayer,
    LinearAttentionAndFullAttentionLayer,
    LinearAttentionLayer,
    StaticLayer,
)

from causalnet.adapters import adapt, recurrent
from causalnet.adapters.generic import GenericAdapter
from causalnet.adapters.naive import naive_patch, naive_readout
from causalnet.adapters.recurrent import Prefix, check_recurrent, recurrent_patch
from causalnet.adapters.stepcalls import layer_kind
from causalnet.adapters.timestep import ClampBinds, clamps, step_mismatch
from causalnet.adapters.tiny_configs import tiny_model
from causalnet.adapters.trace import reforward_patch
from causalnet.adapters.verify import check_patching
from causalnet.errors import UnsupportedModelError

FAST = ["zamba", "zamba2-lifted", "nemotron_h-lifted"]
CLAMPED = ["zamba2", "nemotron_h"]
#: the cache's layer kinds of each tiny model: what the replay must carry per block
KINDS = {
    "zamba": ["state", "state+kv", "state+kv"],
    "zamba2-lifted": ["state", "state+kv"],
    "nemotron_h-lifted": ["state", "none", "kv", "none"],
}

_ADAPTERS: dict[tuple[str, torch.dtype], GenericAdapter] = {}


def hybrid(name: str, dtype: torch.dtype = torch.float32) -> GenericAdapter:
    """The adapter of the tiny model of type ``name`` (``"-lifted"``: every mixer's time-step
    clamp lifted to (0, inf))."""
    if (name, dtype) not in _ADAPTERS:
        model = tiny_model(name.removesuffix("-lifted")).to(dtype)
        if name.endswith("-lifted"):
            mixers = [m for m in model.modules() if hasattr(m, "time_step_limit")]
            assert mixers
            for m in mixers:
                m.time_step_limit = (0.0, float("inf"))
        adapter = adapt(model, generic=True)
        assert isinstance(adapter, GenericAdapter) and adapter.parts.one_part
        _ADAPTERS[name, dtype] = adapter
    return _ADAPTERS[name, dtype]


def prompt(n: int = 9, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 60, (n,), generator=torch.Generator().manual_seed(seed))


def site_scale_values(adapter: GenericAdapter, clean, sites: list[str], n: int = 3):
    """Patch values [S, n, d]: each site's clean value plus noise of its own scale."""
    gen = torch.Generator().manual_seed(5)
    base = torch.stack([clean.value(s) for s in sites]).double()
    noise = torch.randn(len(sites), n, base.shape[-1], generator=gen, dtype=torch.float64)
    return (base[:, None] + noise * base.abs().amax(-1, keepdim=True)[:, None]).to(adapter.dtype)


@pytest.mark.parametrize("name", FAST)
def test_a_one_part_hybrid_is_patched_fast_and_agrees_with_one_forward_per_patch(name):
    adapter = hybrid(name)
    assert adapter.fast_refusal is None, adapter.fast_refusal
    assert adapter.fast_error is not None and adapter.fast_error <= 1e-5
    assert check_patching(adapter, prompt(), "layer", n_patches=2) <= 1e-4


@pytest.mark.parametrize("name", FAST)
def test_the_cache_layers_of_each_block_are_carried_by_kind(name):
    """State layers, key/value layers, both (Zamba's hybrid blocks) and none (Nemotron-H's MLP
    blocks) are all recognised."""
    adapter = hybrid(name)
    pre = Prefix(adapter, prompt(5))
    assert pre.kinds == KINDS[name]


@pytest.mark.parametrize("name", FAST)
def test_an_earlier_position_with_embed_and_mixers_mixed_equals_the_reforward(name):
    """Position 5 of 9, ``embed`` among the mixers in one call: equal to the re-forward of the
    prompt up to t (1e-4, float32); the ``embed`` row equals the naive oracle (the first
    decoder layer's input patched: Zamba's ``original_hidden_states`` stays the clean embedding,
    as in the replay); patching twice gives the same numbers (the clean cache is untouched)."""
    adapter = hybrid(name)
    clean = adapter.clean_run(prompt(), "layer", position=5)
    mixers = adapter.sites("layer")
    sites = [mixers[-1], "embed", *mixers[:-1]]
    values = site_scale_values(adapter, clean, sites)
    got = adapter.patch(clean, sites, values)
    again = adapter.patch(clean, sites, values)
    want = reforward_patch(adapter, clean, [adapter.site(s) for s in sites], values)
    scale = max(1.0, abs(clean.centred_logit))
    for field in ("centred_logit", "sigma", "direct_effects", "total_effect"):
        diff = float((getattr(got, field) - getattr(want, field)).abs().max())
        assert diff <= 1e-4 * scale, (field, diff)
        assert torch.equal(getattr(got, field), getattr(again, field)), field
    i = sites.index("embed")
    naive = naive_patch(adapter, clean.tokens, "embed", values[i], clean.position)
    centred, direct, sigma = naive_readout(adapter, naive, clean.target)
    assert float((got.centred_logit[i] - centred).abs().max()) <= 1e-4 * scale
    assert float((got.direct_effects[i] - direct).abs().max()) <= 1e-4 * scale


@pytest.mark.parametrize("name", CLAMPED)
def test_a_step_that_skips_the_scans_time_step_clamp_is_replayed_under_a_guard(name):
    """Zamba2's and Nemotron-H's mixers clamp the time step in the scan only: the fast path is
    used (the guard names no unreadable mixer) and patches equal one forward per patch."""
    adapter = hybrid(name)
    found, why = clamps(adapter.model)
    assert why is None and found and all(c.low == 0.001 for c in found)
    assert adapter.fast_refusal is None, adapter.fast_refusal
    assert check_patching(adapter, prompt(), "layer", n_patches=2) <= 1e-4


def _clamp_case():
    """Zamba2 at position 5 of 9 with patches of the sites' own scale: a row's time step falls
    below time_step_limit (0.001) there, so the scan clamps it and the step would not."""
    adapter = hybrid("zamba2")
    clean = adapter.clean_run(prompt(), "layer", position=5)
    sites = ["mixer.1", "embed", "mixer.0"]
    values = site_scale_values(adapter, clean, sites)
    parsed = [adapter.site(s) for s in sites]
    return adapter, clean, sites, parsed, values


def test_the_time_step_clamp_mismatch_is_real(monkeypatch):
    """Why the guard: replayed without it, Zamba2's step is off the re-forward by more than the
    float32 tolerance in :func:`_clamp_case` (the probe at the last position alone would have let
    it through)."""
    adapter, clean, sites, parsed, values = _clamp_case()
    monkeypatch.setattr(recurrent, "clamps", lambda model: ([], None))
    why, err = check_recurrent(adapter, prompt())
    assert why is None and err <= 1e-5  # the probe alone does not see it
    got = recurrent_patch(adapter, clean, parsed, values)
    want = reforward_patch(adapter, clean, parsed, values)
    diff = float((got.centred_logit - want.centred_logit).abs().max())
    assert diff > 1e-4 * max(1.0, abs(clean.centred_logit))


def test_a_row_whose_time_step_the_scan_clamps_is_patched_by_the_reforward():
    """With the guard the replay raises ClampBinds naming the mixer, and ``adapter.patch`` gives
    the re-forward's numbers (1e-4 of max(1, |centred logit|), float32), counting the fallback.
    (On this tiny random Zamba2 the clamp binds for 7-12% of the clean run's time steps: most of
    its patch calls fall back.)"""
    adapter, clean, sites, parsed, values = _clamp_case()
    with pytest.raises(ClampBinds, match=r"model\.layers\.\d\.mamba is outside"):
        recurrent_patch(adapter, clean, parsed, values)
    before = adapter.clamp_fallbacks
    got = adapter.patch(clean, sites, values)
    assert adapter.clamp_fallbacks == before + 1
    want = reforward_patch(adapter, clean, parsed, values)
    scale = max(1.0, abs(clean.centred_logit))
    for field in ("centred_logit", "sigma", "direct_effects", "total_effect"):
        assert float((getattr(got, field) - getattr(want, field)).abs().max()) <= 1e-4 * scale


def test_where_no_time_step_is_clamped_the_guarded_replay_stays_fast_and_exact():
    """Zamba2 with every dt_bias raised by 8 (each time step far above 0.001, the clamp still in
    place): the guarded replay never falls back, and equals the re-forward at position 5 with
    patches of the sites' own scale (1e-4, float32)."""
    model = tiny_model("zamba2")
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "time_step_limit"):
                m.dt_bias += 8.0
    adapter = adapt(model, generic=True)
    assert adapter.fast_refusal is None
    clean = adapter.clean_run(prompt(), "layer", position=5)
    sites = ["mixer.1", "embed", "mixer.0"]
    values = site_scale_values(adapter, clean, sites)
    parsed = [adapter.site(s) for s in sites]
    got = recurrent_patch(adapter, clean, parsed, values)  # raises ClampBinds if it binds
    want = reforward_patch(adapter, clean, parsed, values)
    scale = max(1.0, abs(clean.centred_logit))
    for field in ("centred_logit", "sigma", "direct_effects", "total_effect"):
        assert float((getattr(got, field) - getattr(want, field)).abs().max()) <= 1e-4 * scale
    adapter.patch(clean, sites, values)
    assert adapter.clamp_fallbacks == 0


def test_a_clamped_mixer_whose_time_step_cannot_be_read_is_refused():
    """A mixer that clamps but whose input projection is not [gate, x, B, C, dt] (here its
    num_heads no longer matches) cannot be guarded: the fast path is refused naming it, and
    patching is the exact re-forward."""
    model = tiny_model("zamba2")
    mixer = next(m for m in model.modules() if hasattr(m, "time_step_limit"))
    mixer.num_heads += 1
    found, why = clamps(model)
    assert found == [] and "cannot be guarded" in why and "in_proj" in why
    assert step_mismatch(model) == why


@pytest.mark.parametrize("name", ["zamba", "zamba2-lifted"])
def test_float64_refuses_a_step_that_computes_in_float32_and_patches_exactly(name):
    """Zamba's and Zamba2's own single steps compute their state update partly in float32
    (``A_log.float()``, ``dt.float()``; Zamba2's scan also clamps dt below at time_step_min and
    its step does not): in float64 the adapter sees the float32 operations before any probe
    (``low_precision_ops``) and patching is the exact re-forward, one row per forward."""
    adapter = hybrid(name, torch.float64)
    assert "lower precision" in adapter.fast_refusal
    assert check_patching(adapter, prompt(), "layer", n_patches=2) <= 1e-9


def test_the_probe_check_refuses_stale_keys_and_values(monkeypatch):
    """A replay whose attention reads the wrong earlier keys (zeros) is refused: the check can
    fail on the key/value layers, not only on the states."""
    adapter = hybrid("zamba")
    real = Prefix.rows_cache

    def stale(self, cache, layer, n):
        out = real(self, cache, layer, n)
        if "kv" in self.kinds[layer]:
            out.layers[layer].keys = torch.zeros_like(out.layers[layer].keys)
        return out

    monkeypatch.setattr(Prefix, "rows_cache", stale)
    why, err = check_recurrent(adapter, prompt())
    assert why is not None and "disagrees with its full forward" in why and err > 1e-4


def test_cache_layer_kinds_and_refusals():
    kv = DynamicLayer()
    kv.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    both = LinearAttentionAndFullAttentionLayer()
    both.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    assert layer_kind(DummyLayer(), 0) == "none"
    assert layer_kind(kv, 1) == "kv"
    assert layer_kind(LinearAttentionLayer(), 2) == "state"
    assert layer_kind(both, 3) == "state+kv"
    static = StaticLayer(max_cache_len=8)
    static.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    with pytest.raises(UnsupportedModelError, match="layer 4 .StaticLayer. keeps keys"):
        layer_kind(static, 4)
    with pytest.raises(UnsupportedModelError, match="layer 5 .object. holds neither"):
        layer_kind(object(), 5)


def test_a_block_called_with_an_earlier_blocks_output_is_refused():
    """A tensor flowing from block k's output into block l > k besides the residual stream
    would reach the rows clean: refused naming both blocks."""
    pre = Prefix.__new__(Prefix)
    pre.names = ["b0", "b1", "b2"]
    out0 = torch.randn(1, 1, 4)
    pre.args = [(), (), ()]
    pre.kwargs = [{}, {}, {"extra": [out0.clone()]}]
    with pytest.raises(UnsupportedModelError, match="block b2 is called with block b0's output"):
        pre._refuse_flows([out0, torch.randn(1, 1, 4), None])
    pre.kwargs[2] = {"extra": [torch.randn(1, 1, 4)]}
    pre._refuse_flows([out0, torch.randn(1, 1, 4), None])


def test_a_probe_whose_time_steps_the_scan_clamps_does_not_refuse_the_model():
    """Zamba2 with every dt_bias lowered to -10 (every time step ~5e-5, below 0.001: the scan
    clamps them all). The fast check's probe runs with the clamps lifted, so it checks the
    replay and passes; the limits are restored after it; each patch call then falls back
    through the guard, with the re-forward's numbers (1e-4, float32)."""
    model = tiny_model("zamba2")
    mixers = [m for m in model.modules() if hasattr(m, "time_step_limit")]
    with torch.no_grad():
        for m in mixers:
            m.dt_bias.fill_(-10.0)
    adapter = adapt(model, generic=True)
    assert adapter.fast_refusal is None, adapter.fast_refusal
    assert all(m.time_step_limit == (0.001, float("inf")) for m in mixers)
    clean = adapter.clean_run(prompt(), "layer")
    sites = adapter.sites("layer")
    values = site_scale_values(adapter, clean, sites, n=2)
    got = adapter.patch(clean, sites, values)
    assert adapter.clamp_fallbacks == 1
    want = reforward_patch(adapter, clean, [adapter.site(s) for s in sites], values)
    scale = max(1.0, abs(clean.centred_logit))
    for field in ("centred_logit", "sigma", "direct_effects"):
        assert float((getattr(got, field) - getattr(want, field)).abs().max()) <= 1e-4 * scale
