"""Tiny random configs of every causal-LM model type in the installed transformers.

``tiny_config(model_type)`` builds the config class of a model type directly (no hub access)
with few layers, small widths, 4 heads sharing 2 key/value heads, a small vocabulary, few
experts with top-2 routing and short attention windows. Config classes name their fields in
many ways (``n_layer``, ``num_layers``, ``d_model``, ``ffn_dim`` ...): each group of synonyms in
:data:`SIZES` is set wherever the config class declares one of its names, so a new model type
usually needs no entry of its own; :data:`OVERRIDES` holds the few that do. Per-layer lists
(``layer_types`` and every other list as long as the default stack) keep one layer of each
distinct kind, so hybrids keep an attention layer.

``scope(model_type)`` says why a type is out of scope (encoder-decoder, multimodal, draft
models that read another model's cache) or ``None``; ``tiny_model(model_type)`` builds the
seeded random model in eval mode, with norm gains around 1 and biases around 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from causalnet.errors import ModelError

#: Synonymous config fields -> tiny value. Set wherever the config class declares the name.
SIZES: dict[tuple[str, ...], Any] = {
    ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers"): 2,
    ("hidden_size", "n_embd", "d_model", "emb_dim"): 64,
    ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads"): 4,
    ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"): 2,
    ("head_dim", "kv_channels", "attention_head_dim", "dim_head"): 16,
    (
        "intermediate_size",
        "intermediate_size_mlp",
        "ffn_dim",
        "decoder_ffn_dim",
        "n_inner",
        "ffn_hidden_size",
        "dim_ff",
        "feed_forward_size",
    ): 96,
    (
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "shared_intermediate_size",
        "expert_intermediate_size",
        "expert_ffn_hidden_size",
    ): 32,
    ("vocab_size_per_layer_input", "pronunciation_vocab_size", "shape_vocab_size"): 128,
    ("hidden_size_per_layer_input", "pronunciation_embed_dim", "shape_embed_dim"): 16,
    ("index_n_heads",): 4,
    ("index_topk",): 64,
    ("index_head_dim",): 16,
    ("vocab_size", "unpadded_vocab_size"): 128,
    ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"): 64,
    ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"): 4,
    ("num_experts_per_tok", "moe_topk", "num_experts_per_token", "moe_k"): 2,
    ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"): 1,
    ("n_group", "num_expert_group", "topk_group"): 1,
    ("first_k_dense_replace", "num_dense_layers"): 1,
    ("q_lora_rank", "kv_lora_rank"): 16,
    ("qk_rope_head_dim", "qk_nope_head_dim"): 8,
    ("v_head_dim", "qk_head_dim"): 16,
    ("rotary_dim",): 8,
    ("initializer_range", "init_std"): 0.15,
}
#: Set only where the default is not None (None means "off": no window).
WINDOWS = ("sliding_window", "sliding_window_size", "window_size")
#: Small special-token ids inside the tiny vocabulary.
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

#: Per-type fields on top of the generic ones (only where the generic rules do not suffice):
#: hybrids whose attention layers are placed by other fields get one attention layer.
OVERRIDES: dict[str, dict[str, Any]] = {
    "bamba": {"attn_layer_indices": [1], "mamba_n_heads": 8, "mamba_d_head": 16},
    "dbrx": {
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
    },
    "dots3_note": {"num_key_value_heads": 4},
    "dots3_note_text": {"num_key_value_heads": 4},
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "mamba2": {"num_heads": 8},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "reformer": {"axial_pos_embds_dim": [32, 32], "axial_pos_shape": [8, 8]},
    "zamba": {"layers_block_type": ["mamba", "hybrid", "hybrid"], "num_hidden_layers": 3},
    "zamba2": {"layers_block_type": ["mamba", "hybrid"]},
    "zaya": {"num_experts_per_tok": 1},
}

#: Types out of scope that no generic rule detects, with the reason.
OUT_OF_SCOPE: dict[str, str] = {
    "fuyu": "multimodal: image patches enter the token stream through a linear projection",
    "trocr": "decoder half of the TrOCR image-to-text encoder-decoder",
    "musicgen": "audio: its input_ids are EnCodec codebook tokens, text enters by cross-attention",
    "musicgen_melody": "audio: its input_ids are EnCodec codebook tokens (MusicGen Melody)",
}


def causal_lm_types() -> dict[str, str]:
    """model_type -> causal-LM class name, from the installed transformers' auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def model_class(model_type: str) -> type:
    """The causal-LM class of ``model_type``; ModelError for a type not in the mapping."""
    import transformers

    names = causal_lm_types()
    if model_type not in names:
        raise ModelError(
            f"model type {model_type!r} is not in transformers {transformers.__version__}'s "
            f"causal-LM mapping ({len(names)} types)"
        )
    return getattr(transformers, names[model_type])


def _config_class(model_type: str) -> type:
    """The config class the causal-LM class takes (a text config for composite types)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    own = getattr(model_class(model_type), "config_class", None)
    return own if own is not None else CONFIG_MAPPING[model_type]


def _fields(cls: type) -> dict[str, Any]:
    """Declared fields of a config class with their defaults (dataclass or __init__)."""
    if dataclasses.is_dataclass(cls):
        return {f.name: None for f in dataclasses.fields(cls)} | cls().to_dict()
    return cls().to_dict()


_MODALITIES = ("vision_config", "audio_config", "vq_config", "audio_encoder", "image_config")


def scope(model_type: str) -> str | None:
    """Why ``model_type`` is not a decoder-only text model, or None when it is in scope.

    Read from the config classes: encoder-decoder configs; causal-LM classes whose config
    carries a vision / audio sub-config (multimodal); draft models whose every layer reads
    another model's key/value cache; plus :data:`OUT_OF_SCOPE`.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type in OUT_OF_SCOPE:
        return OUT_OF_SCOPE[model_type]
    cls = _config_class(model_type)
    if getattr(CONFIG_MAPPING[model_type], "is_encoder_decoder", False):
        return "encoder-decoder model: the causal-LM class is its decoder half (cross-attention)"
    subs = [k for k in getattr(cls, "sub_configs", None) or {} if k in _MODALITIES]
    if subs:
        return f"multimodal: {model_class(model_type).__name__} carries {', '.join(subs)}"
    if "Assistant" in model_class(model_type).__name__:
        return "draft (assistant) model: its layers read the target model's key/value cache"
    return None


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """A tiny random-init config of ``model_type`` (see the module docstring); no hub access.

    ``overrides`` are applied last. Raises ModelError naming the type and the config class
    when transformers rejects the config.
    """
    cls = _config_class(model_type)
    try:
        kw = _tiny_kwargs(cls) | OVERRIDES.get(model_type, {}) | overrides
        return cls(**kw)
    except Exception as e:
        raise ModelError(
            f"transformers rejects the tiny {cls.__name__} of model type {model_type!r}: "
            f"{type(e).__name__}: {e}"
        ) from e


def _tiny_kwargs(cls: type) -> dict[str, Any]:
    """The generic shrinking of one config class (its sub-configs shrunk the same way)."""
    defaults = _fields(cls)
    kw: dict[str, Any] = {}
    for names, value in SIZES.items():
        for name in names:
            if name in defaults and not isinstance(defaults[name], (bool, list, dict)):
                kw[name] = value
    if "qk_rope_head_dim" in defaults and "head_dim" in defaults:
        kw["head_dim"] = kw["qk_rope_head_dim"]  # multi-head latent attention: rotary width
    if "kv_lora_rank" in defaults and "num_key_value_heads" in kw:
        kw["num_key_value_heads"] = kw["num_attention_heads"]  # its latent keys expand per head
    for name in WINDOWS:
        if isinstance(defaults.get(name), int) and not isinstance(defaults[name], bool):
            kw[name] = 4
    vocab = kw.get("vocab_size", 128)
    for name, value in defaults.items():
        if name.endswith("token_id") and isinstance(value, int) and value >= vocab:
            kw[name] = TOKEN_IDS.get(name, vocab - 1)
    kw.update(_per_layer_fields(defaults, kw))
    if "is_decoder" in defaults:
        kw["is_decoder"] = True
    for name, sub in (getattr(cls, "sub_configs", None) or {}).items():
        if name not in _MODALITIES and dataclasses.is_dataclass(sub):
            kw[name] = sub(**_tiny_kwargs(sub))
    return kw


def _per_layer_fields(defaults: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    """Per-layer lists cut to the tiny depth, keeping one layer of each distinct kind."""
    depth_name = next((n for n in next(iter(SIZES)) if n in kw), None)
    if depth_name is None or not isinstance(defaults.get(depth_name), int):
        return {}
    full = defaults[depth_name]
    kinds = defaults.get("layer_types")
    keep: list[int] = []
    if isinstance(kinds, (list, tuple)) and len(kinds) == full:
        seen: set = set()
        keep = [i for i, k in enumerate(kinds) if not (k in seen or seen.add(k))]
    depth = max(kw[depth_name], len(keep))
    keep += [i for i in range(full) if i not in keep][: depth - len(keep)]
    keep = sorted(keep)
    out: dict[str, Any] = {depth_name: depth}
    for name, value in defaults.items():
        if isinstance(value, (list, tuple)) and len(value) == full and full > depth:
            out[name] = [value[i] for i in keep]
        elif "pattern" in name and isinstance(value, str) and len(value) == full > depth:
            out[name] = "".join(value[i] for i in keep)
    return out


#: Largest tiny model the walk builds (checked on the meta device first).
MAX_PARAMETERS = 3_000_000


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> nn.Module:
    """The seeded random causal LM of ``tiny_config(model_type)``, float32, eval mode.

    Norm gains are set around 1 and biases around 0 (seeded) so that neither is left at its
    trivial init. ModelError if the model would exceed :data:`MAX_PARAMETERS`.
    """
    cls = model_class(model_type)
    config = tiny_config(model_type, **overrides)
    with torch.device("meta"):
        n = sum(p.numel() for p in cls(config).parameters())
    if n > MAX_PARAMETERS:
        raise ModelError(
            f"the tiny {cls.__name__} of model type {model_type!r} has {n:,} parameters "
            f"(> {MAX_PARAMETERS:,}): some size field of {type(config).__name__} is not shrunk"
        )
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 1:
                continue
            leaf, owner = name.split(".")[-1], name.split(".")[-2] if "." in name else ""
            noise = torch.randn(p.shape, generator=gen)
            if leaf == "weight" and ("norm" in owner or owner.startswith("ln")):
                p.copy_(1.0 + 0.3 * noise)
            elif leaf == "bias":
                p.copy_(0.1 * noise)
    _prepare(model_type, model)
    return model.eval()


def _prepare(model_type: str, model: nn.Module) -> None:
    """Per-type set-up a model needs before its first forward."""
    if model_type == "xmod":
        model.set_default_language(next(iter(model.config.languages)))


def probe_tokens(vocab_size: int, n: int = 8, seed: int = 0) -> torch.Tensor:
    """A seeded random prompt [n] avoiding the special ids 0-2 of :data:`TOKEN_IDS`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n,), generator=gen)


__all__ = [
    "MAX_PARAMETERS",
    "OUT_OF_SCOPE",
    "OVERRIDES",
    "SIZES",
    "causal_lm_types",
    "model_class",
    "probe_tokens",
    "scope",
    "tiny_config",
    "tiny_model",
]
