"""Fast patching of discovered decoders whose blocks read more than keys and values at t
(issue 11, section 1): hybrids whose cache holds linear-attention, convolution or Mamba states
(each replayed row steps from its own copy of the clean state after t - 1), blocks that hand a
second stream to the next block besides the residual (GLM-5's top-k indices, Zaya's router
states: each row carries its own), and a model whose own cached decoding is off its forward.

Oracle and tolerances as in ``test_generic_fast.py``: one plain hooked forward of the whole
prompt per (site, patch), 1e-4 (float32) and 1e-9 (float64) of max(1, |clean centred logit|).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import decoder_prompt

from causalnet.adapters import adapt, fastpatch
from causalnet.adapters.trace import reforward_patch
from causalnet.adapters.verify import check_patching


def _tokens() -> torch.Tensor:
    return decoder_prompt(9)


#: hybrids of attention and transformers' linear-attention layers (convolution / recurrent
#: states in the cache): a gated delta net (Qwen3-Next, Qwen3.5, OLMo-hybrid), short
#: convolutions (LFM), Mamba layers (Jamba), linear attention (Bailing, Lara)
HYBRIDS = [
    "lfm2",
    "lfm2_moe",
    "lfm3",
    "qwen3_next",
    "qwen3_5",
    "olmo_hybrid",
    "jamba",
    "bailing_hybrid",
    "lara_mini",
]


@pytest.mark.parametrize("name", HYBRIDS)
def test_a_hybrids_state_layers_are_replayed_from_their_clean_states(name):
    """Each replayed row steps a linear-attention / convolution / Mamba layer from its own copy
    of the clean states after t - 1: the fast path is used and equals one plain hooked forward
    of the whole prompt per patch (float32, 1e-4)."""
    from causalnet.adapters.tiny_configs import tiny_model  # noqa: PLC0415

    adapter = adapt(tiny_model(name), generic=True)
    assert adapter.fast_refusal is None, adapter.fast_refusal
    assert adapter.fast_error <= 1e-4
    assert check_patching(adapter, _tokens(), "layer", n_patches=2) <= 1e-4


def test_a_hybrid_in_float64_at_an_earlier_position_with_mixed_sites():
    """LFM (short convolutions and attention) in float64: position 5 of 9, embed, heads and
    whole layers in one call, equal to the re-forward of the prompt up to t within 1e-9; the
    clean states are untouched by the rows (patching twice gives the same numbers)."""
    from causalnet.adapters.tiny_configs import tiny_model  # noqa: PLC0415

    adapter = adapt(tiny_model("lfm3").to(torch.float64), generic=True)
    assert adapter.fast_refusal is None, adapter.fast_refusal
    clean = adapter.clean_run(_tokens(), "layer", position=5)
    sites = ["embed", "mlp.1", "attn.0.h1", "attn.1", "mlp.0", "attn.0"]
    parsed = [adapter.site(s) for s in sites]
    gen = torch.Generator().manual_seed(4)
    values = torch.randn(len(sites), 3, adapter.arch.d_model, generator=gen, dtype=torch.float64)
    got = adapter.patch(clean, sites, values)
    again = adapter.patch(clean, sites, values)
    want = reforward_patch(adapter, clean, parsed, values)
    for field in ("centred_logit", "sigma", "direct_effects", "total_effect"):
        assert (getattr(got, field) - getattr(want, field)).abs().max() <= 1e-9, field
        assert torch.equal(getattr(got, field), getattr(again, field)), field


def test_the_rows_copy_of_a_state_layer_leaves_the_clean_states_alone():
    """:func:`rows_copy` expands a batch-1 state to n rows; writing to the copy (as a step
    does) changes neither the clean states nor their bookkeeping; a state of another batch is
    refused naming the layer."""
    from transformers.cache_utils import LinearAttentionLayer  # noqa: PLC0415

    from causalnet.adapters.frozencache import rows_copy  # noqa: PLC0415
    from causalnet.errors import UnsupportedModelError  # noqa: PLC0415

    layer = LinearAttentionLayer()
    layer.update_conv_state(torch.arange(6.0).view(1, 2, 3))
    layer.update_recurrent_state(torch.ones(1, 2, 2))
    copy = rows_copy(layer, 4, 7)
    assert copy.conv_states[0].shape == (4, 2, 3)
    assert torch.equal(copy.conv_states[0][3], layer.conv_states[0][0])
    copy.update_conv_state(torch.full((4, 2, 1), -1.0))
    copy.update_recurrent_state(torch.zeros(4, 2, 2))
    copy.has_previous_state[0] = "changed"
    assert torch.equal(layer.conv_states[0], torch.arange(6.0).view(1, 2, 3))
    assert torch.equal(layer.recurrent_states[0], torch.ones(1, 2, 2))
    assert layer.has_previous_state[0] is True
    wide = LinearAttentionLayer()
    wide.update_recurrent_state(torch.ones(2, 2, 2))
    with pytest.raises(UnsupportedModelError, match="layer 7"):
        rows_copy(wide, 4, 7)


#: model types whose blocks hand a second stream to a later block besides the residual:
#: id -> (model type, config overrides, the block that takes it, its argument there). GLM-5's
#: sparse attention: the "shared" layer 2 reuses layer 1's top-k indices, 3 of the 9 positions
#: (a top-k as long as the prompt would select every position, whatever the row; layer 0's
#: indices depend on the embedding only, which no site patches). Zaya: layer 1's router adds
#: layer 0's router states.
STREAMS = {
    "glm_moe_dsa": (
        "glm_moe_dsa",
        dict(
            num_hidden_layers=3,
            layer_types=["indexed_attention"] * 3,
            mlp_layer_types=["dense"] * 3,
            indexer_types=["full", "full", "shared"],
            index_topk=3,
        ),
        2,
        "prev_topk_indices",
    ),
    "zaya": ("zaya", {}, 1, 1),
}


def _stream_run(adapter, clean, parsed, values, block, where, hand=None):
    """fast_patch with ``block``'s second-stream argument on the replay's rows [n, ...] (the
    largest of the block's calls: the capture's own forward calls it on one row), replaced in
    every call by ``hand`` tiled to the rows where given."""
    seen = []

    def hook(module, args, kwargs):
        x = kwargs[where] if isinstance(where, str) else args[where]
        seen.append(x.clone())
        if hand is None or x.shape[1:] != hand.shape[1:]:  # a forward of the whole prompt
            return None
        y = hand.expand(x.shape[0], *hand.shape[1:])
        if isinstance(where, str):
            return args, {**kwargs, where: y}
        return (*args[:where], y, *args[where + 1 :]), kwargs

    handle = adapter.parts.blocks[block].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run = fastpatch.fast_patch(adapter, clean, parsed, values)
    finally:
        handle.remove()
    return run, max(seen, key=len)


@pytest.mark.parametrize("name", list(STREAMS))
def test_a_second_stream_between_blocks_is_carried_by_each_row(name):
    """GLM-5's top-k indices and Zaya's router states go from one block to the next besides
    the residual: the capture records where (the earlier block's output 1), each replayed row
    hands the later block its own (some differ from the clean one), rows that did not run the
    earlier block (entering at its MLP or later) the clean one, and patches equal one plain
    hooked forward per patch (float32, 1e-4). Handing every row the clean stream instead is off
    by more than 1e-3."""
    from causalnet.adapters.finalrows import probe_values, relative_difference  # noqa: PLC0415
    from causalnet.adapters.replay import capture  # noqa: PLC0415
    from causalnet.adapters.tiny_configs import tiny_model  # noqa: PLC0415

    model_type, overrides, block, where = STREAMS[name]
    adapter = adapt(tiny_model(model_type, **overrides), generic=True)
    assert adapter.fast_refusal is None, adapter.fast_refusal
    assert check_patching(adapter, _tokens(), "layer", n_patches=2) <= 1e-4

    cap = capture(adapter, _tokens())
    assert cap.streams[block] == {where: (block - 1, 1)}
    stream = cap.kwargs[block][where] if isinstance(where, str) else cap.args[block][where]
    clean = adapter.clean_run(_tokens(), "layer")
    sites = adapter.sites("layer")
    parsed = [adapter.site(s) for s in sites]
    values = probe_values(adapter, clean, sites, 2, torch.Generator().manual_seed(0))
    want = reforward_patch(adapter, clean, parsed, values)
    got, rows = _stream_run(adapter, clean, parsed, values, block, where)
    assert relative_difference(got, want, clean) <= 1e-4
    if rows.dtype.is_floating_point:
        differ = (rows - stream).abs().amax(dim=(1, 2)) > 1e-3
    else:  # the same positions selected, in any order
        differ = (rows.sort(-1).values != stream.sort(-1).values).any(-1).any(-1)
    assert differ.any() and not differ.all()  # some rows carry their own, the last the clean
    handed_clean, _ = _stream_run(adapter, clean, parsed, values, block, where, hand=stream)
    assert relative_difference(handed_clean, want, clean) > 1e-3


class _Hands(torch.nn.Module):
    def forward(self, h):
        return h + 1, h[..., :2] * 2  # a second stream: [n, 1, 2]


class _Takes(torch.nn.Module):
    def forward(self, h, s):
        return (h + s.sum(-1, keepdim=True),)


def _toy_calls(stream_mode: str):
    """BlockCalls of two toy blocks: block 1 takes block 0's output 1, clean value ``s``."""
    from types import SimpleNamespace  # noqa: PLC0415

    from causalnet.adapters.replay import BlockCalls, Capture  # noqa: PLC0415
    from causalnet.adapters.tiling import HIDDEN  # noqa: PLC0415

    s = torch.full((1, 1, 2), 10.0)
    parts = SimpleNamespace(blocks=[_Hands(), _Takes()], block_names=["b.0", "b.1"])
    one = Capture([(HIDDEN,), (HIDDEN, s)], [{}, {}], [{}, {1: (0, 1)}], cache=object())
    modes = [(["same"], {}), (["same", stream_mode], {})]
    return BlockCalls(SimpleNamespace(parts=parts), one, modes)


def test_rows_that_ran_the_handing_block_carry_their_own_stream_the_others_the_clean_one():
    """Block 0 ran on the first 2 rows: at block 1 (3 rows) they carry their own stream, the
    third row (entering later) the clean one; fewer rows at block 1 than ran block 0 is
    refused (they would not be a prefix), as is a stream without a leading row dimension."""
    from causalnet.errors import UnsupportedModelError  # noqa: PLC0415

    calls = _toy_calls("expand")
    resid = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    calls(0, resid[:2])
    out = calls(1, resid)
    own = 2 * resid[:2].sum(-1, keepdim=True)  # block 0's stream: twice its input
    assert torch.equal(out[:2], resid[:2] + own)
    assert torch.equal(out[2], resid[2] + 20.0)
    with pytest.raises(
        UnsupportedModelError, match=r"b.0 \(2, 1, 2\) cannot feed block b.1 on 1 rows"
    ):
        calls(1, resid[:1])
    for mode in ("same", "repeat"):
        with pytest.raises(UnsupportedModelError, match="b.1 is called with output 1 of block b.0"):
            _toy_calls(mode)


def test_a_model_off_its_own_cache_without_the_plain_cache_falls_back_saying_so(monkeypatch):
    """Moshi's cached decoding step is not its full forward (in transformers 5.x, on this tiny
    config with a window of 4). Without the plain cache the adapter gives it
    (:mod:`causalnet.adapters.fullcache`, switched off here), no replay from its own cache can be
    exact, so patching is by re-forwards, equal to the oracle, and the refusal names the model's
    own discrepancy."""
    import causalnet.adapters.generic as generic_module  # noqa: PLC0415
    from causalnet.adapters.tiny_configs import tiny_model  # noqa: PLC0415

    monkeypatch.setattr(generic_module, "settle_cache", lambda *args: None)
    adapter = adapt(tiny_model("moshi"), generic=True)
    assert adapter.cache_note is None
    assert adapter.fast_refusal is not None
    assert "own cached decoding is off its full forward" in adapter.fast_refusal
    assert check_patching(adapter, _tokens(), "layer", n_patches=2) <= 1e-4


def test_the_cached_step_is_given_its_position_so_bamba_replays_exactly():
    """Bamba (a Mamba2 layer first, then attention) counts its cache's length on layer 0, which
    holds no positions: its own step without ``position_ids`` puts the last token at position 0
    (logits off by ~1). ``forward_step`` passes t - 1, which makes the step the full forward's
    function (float64: within 1e-6, the mixer computes in float32), so Bamba patches fast and
    equal to the hooked re-forward."""
    from causalnet.adapters.finalrows import cached_step_error  # noqa: PLC0415
    from causalnet.adapters.tiny_configs import tiny_model  # noqa: PLC0415

    model = tiny_model("bamba").double()
    ids = _tokens()[None]
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, -1]
        cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        unplaced = model(input_ids=ids[:, -1:], use_cache=True, past_key_values=cache)
    assert float((unplaced.logits[0, -1] - full).abs().max()) > 1e-2  # the model's own slip
    assert cached_step_error(model, _tokens()) < 1e-6
    adapter = adapt(tiny_model("bamba"), generic=True)
    assert adapter.fast_refusal is None
    assert check_patching(adapter, _tokens(), "layer", n_patches=2) <= 1e-4
    assert check_patching(adapter, _tokens(), "head", n_patches=2) <= 1e-4


def test_a_two_part_hybrid_with_a_time_step_clamp_is_replayed_under_the_guard():
    """Bamba (Mamba2 or attention, then an MLP, per block) with its mixers' time step clamped to
    (0.001, inf), as Zamba2's are: the fast path is used (no time step near the limit on the
    probe); with the limit then lowered to (0.001, 0.1) (Bamba's time steps are ~1.3: the scan
    clamps them all) the replay raises ClampBinds and a patch call falls back to the re-forward,
    counted, with its numbers (1e-4, float32). (Here only the ``embed`` rows step through the
    Mamba2 layer, and its output is small: the mismatch itself is shown on Zamba2 in
    test_hybrid_onepart_fast.py.)"""
    from causalnet.adapters.timestep import ClampBinds  # noqa: PLC0415
    from causalnet.adapters.tiny_configs import tiny_model  # noqa: PLC0415

    model = tiny_model("bamba")
    mixers = [m for m in model.modules() if hasattr(m, "time_step_limit")]
    for m in mixers:
        m.time_step_limit = (0.001, float("inf"))
    adapter = adapt(model, generic=True)
    assert adapter.fast_refusal is None, adapter.fast_refusal
    for m in mixers:
        m.time_step_limit = (0.001, 0.1)
    clean = adapter.clean_run(_tokens(), "layer")
    sites = adapter.sites("layer")
    gen = torch.Generator().manual_seed(1)
    values = torch.randn(len(sites), 2, adapter.arch.d_model, generator=gen)
    parsed = [adapter.site(s) for s in sites]
    with pytest.raises(ClampBinds, match="time_step_limit=\\(0.001, 0.1\\)"):
        fastpatch.fast_patch(adapter, clean, parsed, values)
    got = adapter.patch(clean, sites, values)
    assert adapter.clamp_fallbacks == 1
    want = reforward_patch(adapter, clean, parsed, values)
    scale = max(1.0, abs(clean.centred_logit))
    for field in ("centred_logit", "sigma", "direct_effects"):
        assert float((getattr(got, field) - getattr(want, field)).abs().max()) <= 1e-4 * scale
