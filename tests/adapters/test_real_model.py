"""The bundled real model, SmolLM2-135M-Instruct (slow tier: ``pytest -m slow``).

Loaded through the verified cache (``$CAUSALNET_CACHE``, built from the GGUF on first use,
~20 s). Tolerances (float32, logits of magnitude ~10-30, 30 layers): adapter vs Hugging Face
logits 1e-3; exact identities of the adapter's own arithmetic 1e-3 (relative 1e-5 for the
residual stream, whose entries reach ~1e3); fast patch vs the naive hooked Hugging Face
re-forward 1e-4 (measured differences are ~1e-5).
"""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from causalnet.adapters import load
from causalnet.adapters import loading as L
from causalnet.adapters.naive import naive_patch, naive_readout

pytestmark = pytest.mark.slow

# known_1000 prompts (first 100) whose top-1 token is the first token of " " + attribute:
# 20 of the first 100 (279 of all 1,209, measured once with the float32 cache).
TOP1_TRUE_FIRST_100 = [6, 7, 12, 15, 21, 29, 40, 49, 50, 52, 53, 55, 56, 59, 70, 78, 81, 90, 97, 99]


@pytest.fixture(scope="module")
def smol():
    return load("smollm2-135m")


@pytest.fixture(scope="module")
def records() -> list[dict]:
    text = resources.files("causalnet.data").joinpath("known_1000.json").read_text()
    return json.loads(text)


def test_the_bundled_model_loads_from_a_verified_cache(smol):
    bundle = L.BUNDLED["smollm2-135m"]
    assert L.verify_cache(L.cache_root() / "smollm2-135m", L.gguf_path(bundle)) is None
    arch = smol.arch
    assert (arch.family, arch.n_layers, arch.d_model, arch.n_heads, arch.n_kv_heads) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert arch.vocab_size == 49152
    assert smol.model.lm_head.weight is smol.model.model.embed_tokens.weight  # tied


def test_cached_weights_equal_the_gguf_dequantised_ones(smol):
    from transformers import AutoModelForCausalLM

    gguf = L.gguf_path(L.BUNDLED["smollm2-135m"])
    ref = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    ).eval()
    ours = smol.model.state_dict()
    for name, tensor in ref.state_dict().items():
        assert torch.equal(ours[name], tensor), name
    tokens = smol.encode("The Eiffel Tower is located in the city of")
    with torch.no_grad():
        expect = ref(input_ids=tokens[None]).logits
    assert (smol.forward(tokens).logits - expect).abs().max() <= 1e-3


def test_encode_adds_no_bos_as_the_tokenizer_does(smol):
    ids = smol.encode("The Eiffel Tower is located in the city of").tolist()
    assert ids[0] == 504 and len(ids) == 10  # "The", no <|im_start|>
    assert smol.first_token(" Paris") == smol.tokenizer(" Paris")["input_ids"][0]


def test_forward_matches_hugging_face_and_sites_sum_to_the_residual(smol):
    tokens = smol.encode("Catalonia belongs to the continent of")
    run = smol.forward(tokens, granularity="head")
    with torch.no_grad():
        ref = smol.model(input_ids=tokens[None]).logits
    assert (run.logits - ref).abs().max() <= 1e-3
    total = torch.stack(list(run.values.values())).sum(0)
    # Eq 21; the residual reaches |z| ~ 1e3 (first position), so float32 rounding is relative
    assert (total - run.resid_final).abs().max() <= 1e-5 * run.resid_final.abs().max()
    layers = smol.forward(tokens).values
    heads = sum(run.values[f"attn.17.h{h}"] for h in range(9))
    assert (heads - layers["attn.17"]).abs().max() <= 1e-4


def test_clean_direct_effects_sum_to_the_models_centred_logit(smol):
    tokens = smol.encode("The capital of Roman Republic is")
    clean = smol.clean_run(tokens)
    with torch.no_grad():
        logits = smol.model(input_ids=tokens[None]).logits[0, -1]
    assert clean.target == int(logits.argmax()) == smol.first_token(" Rome")
    centred = float(logits[clean.target] - logits.mean())
    assert abs(clean.centred_logit - centred) <= 1e-3
    assert abs(float(clean.direct_effects.sum()) + clean.readout_const - centred) <= 1e-3


@pytest.mark.parametrize("known_id", [6, 21])
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_patch_matches_the_naive_hooked_reforward(smol, records, known_id, granularity):
    tokens = smol.encode(records[known_id]["prompt"])
    clean = smol.clean_run(tokens, granularity=granularity)
    sources = [smol.clean_run(smol.encode(records[j]["prompt"])) for j in (300, 301, 302)]
    sites = ["embed", "mlp.5", "attn.18.h3", "mlp.29"]
    sites += ["attn.0", "attn.18"] if granularity == "layer" else ["attn.0.h8"]
    values = torch.stack([torch.stack([s.value(site) for s in sources]) for site in sites])
    run = smol.patch(clean, sites, values)
    for i, site in enumerate(sites):
        naive = naive_patch(smol, tokens, site, values[i], granularity=granularity)
        centred, direct, sigma = naive_readout(smol, naive, clean.target)
        assert (run.centred_logit[i] - centred).abs().max() <= 1e-4, site
        assert (run.total_effect[i] - (centred - clean.centred_logit)).abs().max() <= 1e-4, site
        assert (run.direct_effects[i] - direct).abs().max() <= 1e-4, site
        assert (run.sigma[i] - sigma).abs().max() <= 1e-4, site
    assert run.total_effect.abs().max() > 0.1  # the interventions did something


def test_top1_equals_the_true_attribute_on_the_first_100_prompts(smol, records):
    hits = []
    by_length: dict[int, list[dict]] = {}
    for r in records[:100]:
        by_length.setdefault(len(smol.encode(r["prompt"])), []).append(r)
    for group in by_length.values():
        tokens = torch.stack([smol.encode(r["prompt"]) for r in group])
        top = smol.forward(tokens).logits[:, -1].argmax(-1).tolist()
        hits += [
            r["known_id"]
            for r, t in zip(group, top, strict=True)
            if t == smol.first_token(" " + r["attribute"])
        ]
    assert sorted(hits) == TOP1_TRUE_FIRST_100
