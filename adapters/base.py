"""The base class of the hand-written families: the block methods a family file implements.

A family module (``llama.py``, ``gpt2.py``, ``neox.py``, ``gptj.py``, ``gemma.py``) subclasses
:class:`TransformerAdapter` and implements the block methods marked ``@abstractmethod``, reading
the Hugging Face module's weights by reference (never copied): a short reading of its blocks.
Everything else lives once, for every family, and works through the block methods:

- :mod:`causalnet.adapters.engine` -- the full-sequence forward (:meth:`TransformerAdapter.forward`,
  :class:`FullRun`), the batched clean runs (:class:`CleanRun`) and the pool of site values;
- :mod:`causalnet.adapters.patching` -- do(site = value) at the clean run's position for many
  rows at once (:class:`PatchedRun`, :class:`FinalStep`);
- :mod:`causalnet.adapters.readout` -- the centred readout w_i, const_i (Eqs 9, 10, 24-28);
- :mod:`causalnet.adapters.blocks` -- rotary, per-head output projections, LayerNorm;
- :meth:`TransformerAdapter.hook_points` / :meth:`TransformerAdapter.final_norm_module` -- the
  Hugging Face modules the independent oracle (:mod:`causalnet.adapters.naive`) hooks.

The contract every adapter meets (sites, tokens, :class:`Architecture`, :class:`HookPoints`,
:class:`ResidualAdapter`) is :mod:`causalnet.adapters.contract`; the run records are
:mod:`causalnet.adapters.records`. Their public names are importable from here as well.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor, nn

from . import engine, patching
from .blocks import linear_head_outputs, rotate_half
from .contract import Architecture, HookPoints, ResidualAdapter
from .patching import FinalStep
from .readout import accumulation_dtype, vocab_mean
from .records import CleanRun, FullRun, Granularity, PatchedRun

__all__ = [
    "Architecture",
    "CleanRun",
    "FinalStep",
    "FullRun",
    "Granularity",
    "HookPoints",
    "PatchedRun",
    "ResidualAdapter",
    "TransformerAdapter",
    "accumulation_dtype",
    "linear_head_outputs",
    "rotate_half",
    "vocab_mean",
]


class TransformerAdapter(ResidualAdapter):
    """A Hugging Face causal LM seen as a residual stream of sites.

    Subclasses implement the block methods below; shapes use ``...`` for any leading batch dims.
    """

    arch: Architecture
    model: nn.Module  # the wrapped Hugging Face model (weights by reference)
    attn_scale: float  # softmax(q . k * attn_scale)

    # ---- the family's blocks -------------------------------------------------------------
    @abstractmethod
    def embed(self, tokens: Tensor) -> Tensor:
        """Token (+ learned position) embedding: [B, T] int64 -> [B, T, d]."""

    @abstractmethod
    def qkv(self, layer: int, resid: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Attention inputs from the residual (the block's input norm applied inside).

        resid [..., T, d], positions [T] int64 -> q [..., T, H, dh], k and v [..., T, Hkv, dh],
        rotary embedding already applied to q and k.
        """

    @abstractmethod
    def head_outputs(self, layer: int, z: Tensor) -> Tensor:
        """Per-head contributions through the output projection: [..., H, dh] -> [..., H, d].

        An output-projection bias (GPT-2, GPT-NeoX) is split equally over the heads, so the
        heads of a layer sum exactly to the layer's attention output.
        """

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        """The layer's attention output [..., H, dh] -> [..., d] (a family may fuse this)."""
        return self.head_outputs(layer, z).sum(-2)

    def attn_and_heads(self, layer: int, z: Tensor) -> tuple[Tensor, Tensor]:
        """(the layer's attention output [..., d], its heads' parts [..., H, d]) from one
        computation of the heads: their sum. A family whose attention output is not exactly the
        heads' sum (a norm after the attention that rounds on its own) returns its own output."""
        heads = self.head_outputs(layer, z)
        return heads.sum(-2), heads

    @abstractmethod
    def mlp(self, layer: int, resid: Tensor) -> Tensor:
        """The MLP's contribution from the residual it reads (its input norm inside): [..., d]."""

    @abstractmethod
    def final_scale(self, resid: Tensor) -> Tensor:
        """The final norm's scale sigma exactly as the model computes it: [..., d] -> [...]."""

    @abstractmethod
    def logits(self, resid: Tensor) -> Tensor:
        """Final norm + unembedding, as the model computes them: [..., d] -> [..., V]."""

    @abstractmethod
    def readout(self, token: int) -> tuple[Tensor, float]:
        """Centred readout direction w_i [d] and constant const_i (Eqs 9, 24; the sum rule in
        :mod:`causalnet.adapters.readout`)."""

    # ---- hooks for the naive oracle (each family implements these) --------------------------
    def hook_points(self, layer: int) -> HookPoints:
        """The Hugging Face modules of layer ``layer`` that :mod:`causalnet.adapters.naive`
        hooks (see :class:`HookPoints` for what each module's input/output must be).

        Every family overrides this; e.g. Llama returns ``(layers[l], layers[l].self_attn,
        layers[l].mlp, layers[l].self_attn.o_proj)``.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement hook_points(layer)")

    def final_norm_module(self) -> nn.Module:
        """The final norm module; its input is the final residual z^L (for the naive oracle)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement final_norm_module()")

    # ---- optional family switches -----------------------------------------------------------
    def attention_window(self, layer: int) -> int | None:
        """Sliding-window size of layer ``layer`` (a key at position s is visible from query
        position t iff s <= t and t - s < window), or None for full causal attention."""
        return None

    def centred_logit(self, resid: Tensor, token: int) -> Tensor:
        """The model's centred logit of ``token`` (Eq 9) from final residuals [..., d] -> [...],
        without the full vocabulary projection: ``(z . w_i) / sigma(z) + const_i`` (Eq 24).

        A family may override this to follow the model's own floating-point path exactly.
        """
        w, const = self.readout(token)
        return (resid @ w) / self.final_scale(resid) + const

    # ---- the forward pass, step by step ------------------------------------------------------
    def attend(
        self, layer: int, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor
    ) -> Tensor:
        """Causal softmax attention with grouped keys/values (GQA) of layer ``layer``.

        q [..., Tq, H, dh], k and v [..., Tk, Hkv, dh], positions q_pos [Tq], k_pos [Tk] ->
        z [..., Tq, H, dh] with z_h = sum_s softmax_s(q_h . k_s * attn_scale) v_s over the keys
        with s <= t (and t - s < window for a sliding-window layer). Query head h reads key/value
        head h // (H / Hkv), as Hugging Face's ``repeat_kv``. Half-precision scores are
        softmaxed in float32 (as the models' eager attention).
        """
        n_heads, n_kv = q.shape[-2], k.shape[-2]
        qg = q.unflatten(-2, (n_kv, n_heads // n_kv))  # [..., Tq, Hkv, g, dh]
        scores = torch.einsum("...qkgd,...tkd->...kgqt", qg, k) * self.attn_scale
        allowed = k_pos[None, :] <= q_pos[:, None]
        window = self.attention_window(layer)
        if window is not None:
            allowed = allowed & (q_pos[:, None] - k_pos[None, :] < window)
        scores = scores.masked_fill(~allowed, float("-inf"))
        if scores.dtype in (torch.float16, torch.bfloat16):
            probs = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
        else:
            probs = torch.softmax(scores, dim=-1)
        z = torch.einsum("...kgqt,...tkd->...qkgd", probs, v)
        return z.flatten(-3, -2)

    def attention(self, layer: int, resid: Tensor, positions: Tensor) -> Tensor:
        """Layer ``layer``'s heads before the output projection: resid [..., T, d] read at
        ``positions`` [T] -> z_heads [..., T, H, dh] (``qkv`` then :meth:`attend`)."""
        q, k, v = self.qkv(layer, resid, positions)
        return self.attend(layer, q, k, v, positions, positions)

    # ---- the shared engine (engine.py, patching.py) ------------------------------------------
    def forward(
        self, tokens: Tensor, granularity: Granularity = "layer", cache: bool = False
    ) -> FullRun:
        """The whole forward pass (Eqs 3-6) from the block methods, recording every site.

        tokens [B, T] (or [T], read as B = 1) without padding -> :class:`FullRun` with the
        logits [B, T, V], the final residual z^L, its final scale sigma, and every readout
        site's value at every position (heads instead of whole attention layers when
        ``granularity="head"``), so that ``embed + sum_l (attn.l + mlp.l) = z^L`` (Eq 21).
        Sequential residual: z += a^l; m^l = mlp(z); z += m^l. Parallel (``arch``): a^l and
        m^l both read z^{l-1}; z += a^l + m^l.
        """
        return engine.forward(self, tokens, granularity, cache)

    def clean_runs(
        self,
        prompts: list[Tensor | str],
        granularity: Granularity = "layer",
        positions: list[int] | None = None,
    ) -> list[CleanRun]:
        """:meth:`clean_run` of several prompts in one batched pass (same numbers up to float
        rounding: other matrix shapes); see :func:`causalnet.adapters.engine.clean_runs`."""
        return engine.clean_runs(self, prompts, granularity, positions)

    def final_values(
        self,
        prompts: list[Tensor],
        granularity: Granularity = "layer",
        batch_tokens: int = 1024,
    ) -> Tensor:
        """Every readout site's value at each prompt's last token: [n_prompts, R, d], the
        numbers of ``torch.stack([clean_run(p, granularity).site_values for p in prompts])``
        up to float rounding; see :func:`causalnet.adapters.engine.final_values`."""
        return engine.final_values(self, prompts, granularity, batch_tokens)

    def patch(self, clean: CleanRun, sites: list[str], values: Tensor) -> PatchedRun:
        """do(site_s = values[s, p]) at the clean run's position t, for every (s, p) at once.

        values [S, P, d] -> :class:`PatchedRun` with, per row, every readout site's direct effect
        (c . w_i) / sigma at that run's own sigma (Eq 13), the centred target logit from the
        patched final residual, and the total effect against the clean run (Eq 12).
        ``attn.l.hH = v`` replaces that head's contribution only. Only position t is recomputed,
        from the site's layer upward (:func:`causalnet.adapters.patching.patch`).
        """
        return patching.patch(self, clean, sites, values)

    def _final_step(self, clean: CleanRun) -> FinalStep:
        """The per-layer computation of :meth:`patch` for rows at the clean run's position
        (:class:`FinalStep`, from the block methods). A family may return a faster subclass
        that computes the same numbers (Llama: :class:`causalnet.adapters.llama.LlamaFinalStep`).
        """
        return FinalStep(self, clean)
