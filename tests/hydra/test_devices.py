"""Models dispatched by accelerate (device_map) under the adapter's fast patching.

No GPU here, so the split is over the CPU and the DISK: offloaded layers keep their weights on the
meta device and accelerate's hooks stream them in -- the same dispatch machinery that spreads a
model over GPUs. Every test checks that the weights really are offloaded, then that the
dispatched adapter's clean run and fast patching equal the unsplit model's and the naive oracle
(hooked full forwards of the dispatched Hugging Face model itself) to 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from accelerate import dispatch_model
from accelerate.hooks import AlignDevicesHook
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTJConfig,
    GPTJForCausalLM,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
)

from causalnet.adapters import adapt, load
from causalnet.adapters.naive import naive_patch, naive_readout
from causalnet.errors import CausalNetError
from causalnet.hydra.devices import (
    DispatchedAdapter,
    Placement,
    auto_device_map,
    dispatch_adapter,
    keep_outer_together,
    load_dispatched,
)
from causalnet.hydra.store import ResultsStore
from causalnet.hydra.sweep import SweepConfig, run_sweep
from tiny_lm import byte_tokenizer, save_tiny_llama, write_prompts

ATOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("devices")
    save_tiny_llama(root / "model")
    write_prompts(root / "prompts.jsonl", 8)
    return root


def split_map(model: nn.Module, layers: list[str], disk: set[str]) -> dict[str, str]:
    """A device map of whole modules: every decoder layer and every module beside the layers'
    ancestors, each on "cpu" or (if named in ``disk``) on "disk"."""
    ancestors = {name.rsplit(".", i)[0] for name in layers for i in range(1, name.count(".") + 1)}
    ancestors.add("")
    out = {}
    for name, _ in model.named_modules():
        if name not in ancestors and name.rpartition(".")[0] in ancestors:
            out[name] = "disk" if name in disk else "cpu"
    return out


def layer_names(model: nn.Module, adapter) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(adapter.hook_points(i).block)] for i in range(adapter.arch.n_layers)]


def offloaded(model: nn.Module) -> set[str]:
    """Names of the parameters held on the meta device (streamed in by accelerate's hooks)."""
    return {n for n, p in model.named_parameters() if p.device.type == "meta"}


def check_against_reference(split, ref, tokens: torch.Tensor, granularity: str) -> None:
    """Clean run and fast patch of ``split`` == ``ref`` (same weights, one device) == naive."""
    c_split = split.clean_run(tokens, granularity=granularity)
    c_ref = ref.clean_run(tokens, granularity=granularity)
    assert c_split.target == c_ref.target
    torch.testing.assert_close(c_split.direct_effects, c_ref.direct_effects, atol=ATOL, rtol=0)
    assert c_split.centred_logit == pytest.approx(c_ref.centred_logit, abs=ATOL)
    sites = ref.sites(granularity)
    d = ref.arch.d_model
    values = torch.randn(len(sites), 3, d, generator=torch.Generator().manual_seed(1))
    p_split = split.patch(c_split, sites, values)
    p_ref = ref.patch(c_ref, sites, values)
    torch.testing.assert_close(p_split.direct_effects, p_ref.direct_effects, atol=ATOL, rtol=0)
    torch.testing.assert_close(p_split.total_effect, p_ref.total_effect, atol=ATOL, rtol=0)
    for s in (0, len(sites) // 2, len(sites) - 1):  # first, middle and last site vs the oracle
        run = naive_patch(split, tokens, sites[s], values[s], granularity=granularity)
        centred, direct, _ = naive_readout(split, run, c_split.target)
        torch.testing.assert_close(
            centred - c_split.centred_logit, p_split.total_effect[s], atol=ATOL, rtol=0
        )
        torch.testing.assert_close(direct, p_split.direct_effects[s], atol=ATOL, rtol=0)


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=256, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def _neox() -> nn.Module:
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=256,
        max_position_embeddings=64,
        rotary_pct=0.5,
        use_parallel_residual=True,
    )
    return GPTNeoXForCausalLM(config).eval()


def _gptj() -> nn.Module:
    torch.manual_seed(0)
    config = GPTJConfig(
        n_embd=32, n_layer=3, n_head=4, rotary_dim=4, vocab_size=256, n_positions=64
    )
    return GPTJForCausalLM(config).eval()


def _llama(folder: Path) -> nn.Module:
    return load(str(folder / "model")).model


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox", "gptj"])
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_layers_and_final_norm_offloaded_to_disk_patch_equal_unsplit_and_naive(
    family, granularity, folder, tmp_path
):
    builders = {"llama": lambda: _llama(folder), "gpt2": _gpt2, "neox": _neox, "gptj": _gptj}
    model = builders[family]()
    ref = adapt(model, byte_tokenizer())
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    layers = layer_names(model, ref)
    final_norm = next(n for n, m in model.named_modules() if m is ref.final_norm_module())
    device_map = split_map(model, layers, disk={layers[1], layers[2], final_norm})
    # a second copy with the same weights, dispatched; the reference stays whole on the CPU
    twin = type(model)(model.config).eval()
    twin.load_state_dict(reference)
    twin = dispatch_model(twin, device_map, offload_dir=str(tmp_path / "offload"))
    split = dispatch_adapter(twin, byte_tokenizer())
    assert isinstance(split, DispatchedAdapter)
    on_meta = offloaded(twin)
    assert any(n.startswith(layers[2] + ".") for n in on_meta)  # really offloaded
    assert any(n.startswith(final_norm + ".") for n in on_meta)
    assert not any(n.startswith(layers[0] + ".") for n in on_meta)
    tokens = torch.tensor([5, 71, 3, 200, 42, 9, 17])
    check_against_reference(split, ref, tokens, granularity)
    assert offloaded(twin) == on_meta  # the weights went back to the disk after each call


def test_auto_device_map_with_max_memory_splits_cpu_and_disk_and_patches_exactly(folder):
    path = folder / "model"
    device_map = auto_device_map(path, max_memory={"cpu": 120_000})
    assert "disk" in device_map.values() and "cpu" in device_map.values()
    split = load_dispatched(path, max_memory={"cpu": 120_000})
    assert isinstance(split, DispatchedAdapter)
    assert split.model.hf_device_map == device_map
    assert offloaded(split.model)
    ref = load(str(path))
    check_against_reference(split, ref, ref.encode("Paris 3 is the capital of"), "layer")


def test_model_on_one_device_gets_the_plain_adapter(folder):
    adapter = load_dispatched(folder / "model")  # fits: no hooks, nothing offloaded
    assert not isinstance(adapter, DispatchedAdapter)
    assert not offloaded(adapter.model)


def test_sweep_over_an_offloaded_model_equals_the_unsplit_sweep(folder, tmp_path):
    config = SweepConfig(model=str(folder / "model"), prompts=str(folder / "prompts.jsonl"), k=3)
    ref = ResultsStore(run_sweep(config, tmp_path / "ref", progress=False))
    split = load_dispatched(folder / "model", max_memory={"cpu": 120_000})
    assert offloaded(split.model)
    got = ResultsStore(run_sweep(config, tmp_path / "split", adapter=split, progress=False))
    effects, ref_effects = got.load_effects(), ref.load_effects()
    pd.testing.assert_frame_equal(effects, ref_effects, check_exact=False, rtol=0, atol=ATOL)
    pd.testing.assert_frame_equal(
        got.load_readouts(), ref.load_readouts(), check_exact=False, rtol=0, atol=ATOL
    )


def test_device_auto_in_a_sweep_config_loads_through_accelerate(folder, tmp_path):
    common = dict(model=str(folder / "model"), prompts=str(folder / "prompts.jsonl"), k=3)
    ref = ResultsStore(run_sweep(SweepConfig(**common), tmp_path / "cpu", progress=False))
    auto = ResultsStore(
        run_sweep(SweepConfig(**common, device="auto"), tmp_path / "auto", progress=False)
    )
    assert auto.load_run()["args"]["device"] == "auto"
    pd.testing.assert_frame_equal(auto.load_effects(), ref.load_effects())


def test_keep_outer_together_moves_only_the_modules_outside_the_layers():
    layers = ["model.layers.0", "model.layers.1", "model.layers.2"]
    device_map = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": 1,
        "model.layers.2.self_attn": 1,
        "model.layers.2.mlp": "cpu",
        "model.norm": "cpu",
        "lm_head": 1,
    }
    fixed = keep_outer_together(device_map, layers, "model.embed_tokens")
    assert fixed == {**device_map, "model.norm": 0, "lm_head": 0}
    grouped = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "disk"}
    assert keep_outer_together(grouped, layers, "model.embed_tokens") == {
        "model.embed_tokens": "cpu",
        "model.layers": "disk",
        "model.norm": "cpu",
    }
    assert keep_outer_together({"": 0}, layers, "model.embed_tokens") == {"": 0}
    with pytest.raises(CausalNetError, match="embed_tokens"):
        keep_outer_together({"model.layers": 0}, layers, "model.embed_tokens")


def _fake_device(module: nn.Module, device: torch.device) -> None:
    """Give ``module`` and its sub-modules the accelerate hook that dispatch_model would attach
    for ``device``, without running its init (which would move the weights there): this checks
    the bookkeeping only, so no such device is needed."""
    for sub in module.modules():
        sub._hf_hook = AlignDevicesHook(execution_device=device)


def test_placement_refuses_outer_modules_or_one_layer_on_several_devices(folder):
    adapter = adapt(_llama(folder))
    model = adapter.model
    blocks = [adapter.hook_points(i).block for i in range(adapter.arch.n_layers)]
    placement = Placement(model, blocks)
    assert placement.main == torch.device("cpu") and not placement.is_split
    _fake_device(model.model.layers[1], torch.device("cuda", 1))
    placement = Placement(model, blocks)  # a whole layer elsewhere: fine
    assert placement.layers[1] == torch.device("cuda", 1) and placement.is_split
    _fake_device(model.model.layers[2].mlp, torch.device("cuda", 1))
    with pytest.raises(CausalNetError, match="decoder layer 2"):
        Placement(model, blocks)
    for sub in model.model.layers[2].mlp.modules():
        del sub._hf_hook
    _fake_device(model.lm_head, torch.device("cuda", 1))
    with pytest.raises(CausalNetError, match="outside the decoder layers"):
        Placement(model, blocks)


def test_rotary_embedding_hook_computes_on_the_layers_device_during_layer_methods(folder, tmp_path):
    ref = load(str(folder / "model"))
    model = _llama(folder)
    layers = layer_names(model, adapt(model))
    model = dispatch_model(
        model, split_map(model, layers, {layers[2]}), offload_dir=str(tmp_path / "off")
    )
    hook = model.model.rotary_emb._hf_hook
    # Stand-in for "the rotary embedding sits on another GPU than the layer": its hook would
    # send the layer's inputs to the meta device, and q * cos would fail, were it not retargeted.
    hook.execution_device = torch.device("meta")
    split = dispatch_adapter(model, byte_tokenizer())
    tokens = torch.tensor([5, 71, 3, 200, 42, 9, 17])
    clean, clean_ref = split.clean_run(tokens), ref.clean_run(tokens)
    torch.testing.assert_close(clean.direct_effects, clean_ref.direct_effects, atol=ATOL, rtol=0)
    values = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(2))
    got = split.patch(clean, ["attn.0", "mlp.1"], values)
    want = ref.patch(clean_ref, ["attn.0", "mlp.1"], values)
    torch.testing.assert_close(got.total_effect, want.total_effect, atol=ATOL, rtol=0)
    assert hook.execution_device == torch.device("meta")  # restored after each call
    cos, _ = model.model.rotary_emb(torch.zeros(1, 3, 32), torch.arange(3)[None])
    assert cos.device.type == "meta"  # outside a layer method the hook does move its inputs
