"""Neuron readouts (issue 13, §3): each neuron's direct effect, before and after an ablation,
read from the model's own down projection and summing exactly to the MLP site's direct effect.

Tolerance: float64, 1e-10 against the fast patch engine's direct effects (an independent path:
the adapter's block methods, not the hooked Hugging Face forward the readouts use).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from causalnet.adapters import adapt
from causalnet.errors import InterventionError, ModelError
from causalnet.hydra.neurons import down_projection, neuron_readouts, top_neurons
from tiny_lm import OTHER_FAMILIES

TOKENS = torch.tensor([5, 77, 3, 200, 41, 9, 120])


def _randomised(model: nn.Module) -> nn.Module:
    """Biases ~0.1 and norm gains ~1 randomised (so the bias term is exercised), float64."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                noise = torch.randn(p.shape, generator=gen)
                p.copy_(1 + 0.3 * noise if "ln" in name or "norm" in name else 0.1 * noise)
    return model.double().eval()


BUILDERS = {
    **OTHER_FAMILIES,
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=256,
            mlp_bias=True,
        )
    ),
}


@pytest.fixture(scope="module", params=["llama", "gpt2", "gpt_neox", "gptj"])
def adapter(request: pytest.FixtureRequest):
    torch.manual_seed(0)
    return adapt(_randomised(BUILDERS[request.param]()))


@pytest.mark.parametrize("site", ["attn.1", "mlp.0"])
def test_neurons_sum_to_the_mlp_direct_effect_of_the_patch_engine(adapter, site):
    """sum_n a_n (W_out[:, n] . w_i) / sigma + (b . w_i) / sigma equals the MLP site's direct
    effect from the fast engine, in the clean run and averaged over the ablated runs."""
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(3, adapter.arch.d_model, generator=gen, dtype=torch.float64)
    readout = neuron_readouts(adapter, TOKENS, [1, 2], site, values)
    clean = adapter.clean_run(TOKENS)
    patched = adapter.patch(clean, [site], values[None])
    assert readout.target == clean.target
    for layer in (1, 2):
        j = clean.readout_sites.index(f"mlp.{layer}")
        rows = readout.neurons[readout.neurons["layer"] == layer]
        info = readout.layers.set_index("layer").loc[layer]
        assert info["bias_direct_effect_clean"] != 0.0
        clean_sum = rows["direct_effect_clean"].sum() + info["bias_direct_effect_clean"]
        ablated_sum = rows["direct_effect_ablated"].sum() + info["bias_direct_effect_ablated"]
        assert clean_sum == pytest.approx(float(clean.direct_effects[j]), abs=1e-10)
        assert ablated_sum == pytest.approx(
            float(patched.direct_effects[0, :, j].mean()), abs=1e-10
        )
        assert info["max_identity_error"] < 1e-12
    assert (readout.neurons["delta_de"].abs() > 1e-6).any()


def test_top_neurons_name_the_largest_erasers_and_their_changes(adapter):
    values = torch.zeros(1, adapter.arch.d_model, dtype=torch.float64)
    neurons = neuron_readouts(adapter, TOKENS, [2], "attn.2", values).neurons
    top = top_neurons(neurons, n=2)
    assert top["role"].tolist() == ["erases"] * 2 + ["erases more"] * 2 + ["erases less"] * 2
    erases = top[top["role"] == "erases"]["direct_effect_clean"]
    assert erases.max() <= neurons["direct_effect_clean"].nsmallest(3).iloc[1] + 1e-15
    assert top[top["role"] == "erases less"]["delta_de"].min() >= neurons["delta_de"].median()


def test_a_hook_that_changes_the_mlp_after_its_down_projection_is_caught():
    """The sum check is real: an MLP output doubled after the down projection (a forward hook)
    breaks the identity and raises, naming the layer."""
    torch.manual_seed(0)
    adapter = adapt(_randomised(OTHER_FAMILIES["gpt2"]()))
    handle = adapter.hook_points(1).mlp.register_forward_hook(lambda m, a, out: 2 * out)
    try:
        with pytest.raises(InterventionError, match="layer 1"):
            neuron_readouts(adapter, TOKENS, [1], "attn.0", torch.zeros(1, 32).double())
    finally:
        handle.remove()


def test_neuron_readouts_refuse_what_they_cannot_split():
    torch.manual_seed(0)
    gemma = adapt(OTHER_FAMILIES["gemma3_text"]().eval())
    with pytest.raises(ModelError, match="norm after the MLP"):
        down_projection(gemma, 0)
    arch = SimpleNamespace(sublayer_norms=False, n_layers=1, family="toy")
    odd = SimpleNamespace(
        arch=arch, hook_points=lambda layer: SimpleNamespace(mlp=nn.Sequential(nn.Linear(2, 2)))
    )
    with pytest.raises(ModelError, match="no linear down projection"):
        down_projection(odd, 0)
    with pytest.raises(ModelError, match="layer 3 does not exist"):
        down_projection(odd, 3)
