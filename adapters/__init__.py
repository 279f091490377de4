"""Transformer adapters: a Hugging Face causal LM seen as a residual stream of sites.

Usage::

    from causalnet.adapters import load
    adapter = load("smollm2-135m")                      # the bundled real model, no download
    clean = adapter.clean_run(adapter.encode("The Eiffel Tower is in the city of"))
    clean.direct_effects                                 # Delta_unembed per site (Eq 10)
    run = adapter.patch(clean, ["attn.18"], values)      # do(attn.18 = v), values [1, P, d]

:func:`adapt` wraps a model object you already have; :func:`load` also reads a local Hugging Face
folder. The family is picked from ``model.config.model_type`` (:data:`SUPPORTED_FAMILIES`); any
other decoder is discovered and verified (:mod:`causalnet.adapters.discover`,
:mod:`causalnet.adapters.verify`) and runs on :class:`causalnet.adapters.generic.GenericAdapter`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from causalnet.errors import UnsupportedModelError

from .base import TransformerAdapter
from .contract import Architecture, HookPoints, ResidualAdapter
from .discover import Declaration, Decomposition
from .records import CleanRun, FullRun, Granularity, PatchedRun

# model_type -> (adapter module, adapter class, what it covers)
_FAMILIES: dict[str, tuple[str, str, str]] = {
    "llama": ("llama", "LlamaAdapter", "Llama family (LlamaForCausalLM, SmolLM2)"),
    "mistral": ("llama", "LlamaAdapter", "Llama family (MistralForCausalLM)"),
    "qwen2": ("llama", "LlamaAdapter", "Llama family (Qwen2ForCausalLM)"),
    "gpt2": ("gpt2", "GPT2Adapter", "GPT-2 (GPT2LMHeadModel)"),
    "gpt_neox": ("neox", "NeoXAdapter", "GPT-NeoX / Pythia (GPTNeoXForCausalLM)"),
    "gptj": ("gptj", "GPTJAdapter", "GPT-J (GPTJForCausalLM)"),
    "gemma3_text": (
        "gemma",
        "GemmaAdapter",
        "Gemma 3 text (Gemma3ForCausalLM; norms after the sublayers, layer granularity only)",
    ),
}

#: ``config.model_type`` values that :func:`adapt` handles, with the family they map to.
SUPPORTED_FAMILIES: dict[str, str] = {k: v[2] for k, v in _FAMILIES.items()}


def adapt(
    model: nn.Module,
    tokenizer: Any = None,
    declare: Declaration | None = None,
    generic: bool = False,
) -> ResidualAdapter:
    """Wrap a causal LM (weights by reference) in an adapter; the model is put in eval mode.

    A ``model.config.model_type`` with a hand-written family (:data:`SUPPORTED_FAMILIES`) gets
    that family's adapter (the fast patch engine). Any other decoder -- or any model with
    ``generic=True``, or one whose parts are named by ``declare`` (a :class:`Declaration`, for
    a model that is not a transformers model) -- gets a :class:`GenericAdapter`: its residual
    stream is discovered from the model itself and verified numerically on a probe before use;
    UnsupportedModelError names the block and the identity that failed otherwise.
    """
    import importlib

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _FAMILIES or generic or declare is not None:
        from .generic import GenericAdapter

        try:
            return GenericAdapter(model, tokenizer, declare=declare)
        except UnsupportedModelError as err:
            listed = ", ".join(f"{k!r} ({v})" for k, v in SUPPORTED_FAMILIES.items())
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type={model_type!r}) could not be adapted: "
                f"{err}. Hand-written families: {listed}"
            ) from err
    module_name, class_name, _ = _FAMILIES[model_type]
    module = importlib.import_module(f".{module_name}", __name__)
    adapter = getattr(module, class_name)(model, tokenizer)
    model.eval()
    return adapter


def load(
    name_or_path_or_model: str | nn.Module,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: Any = None,
) -> TransformerAdapter:
    """An adapter for ``"smollm2-135m"`` (the bundled model), a local Hugging Face folder, or
    a model object. Nothing is ever downloaded; see :mod:`causalnet.adapters.loading`."""
    from .loading import load as _load

    return _load(name_or_path_or_model, dtype=dtype, device=device, tokenizer=tokenizer)


__all__ = [
    "SUPPORTED_FAMILIES",
    "Architecture",
    "CleanRun",
    "FullRun",
    "Granularity",
    "HookPoints",
    "PatchedRun",
    "ResidualAdapter",
    "TransformerAdapter",
    "Declaration",
    "Decomposition",
    "adapt",
    "load",
]
