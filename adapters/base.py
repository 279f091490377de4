"""Shared machinery of the transformer adapters: a decoder's residual stream as sites.

CONTRACT (filled in by the adapter work; the abstract block methods are fixed):

A family module (``llama.py``, ``gpt2.py``, ``neox.py``) subclasses :class:`TransformerAdapter`
and implements the block methods marked ``@abstractmethod``, reading the Hugging Face module's
weights by reference (never copied). Everything else -- the full-sequence forward, the cached
clean run, the batched fast patching, the readouts -- lives here once, for every family.

Sites (``docs/conventions.md``): ``embed``, ``attn.l``, ``mlp.l`` (l = 0..L-1, Hugging Face's
layer index), ``attn.l.hH``. The value of a site is what it adds to the residual stream, so
``z_final = embed + sum_l (attn.l + mlp.l)`` (paper Eq 21) and ``attn.l = sum_H attn.l.hH``.

Readout (Eqs 9, 10, 24-28): ``readout(i)`` returns ``(w_i, const_i)`` with ``w_i`` the centred
readout direction and ``const_i`` the term that belongs to no site, such that for any run with
final-norm scale ``sigma``:  centred logit_i = sum_sites (c_site . w_i) / sigma + const_i.
RMSNorm with gain G:  w_i = G * (W_U[i] - mean_j W_U[j]),  const_i = 0 (+ a centred lm_head
bias if the model has one). LayerNorm with gain g, bias b: the centring over the hidden dimension
is folded into the direction, w_i = centre(g * u_i) with u_i = W_U[i] - mean_j W_U[j] (so
c . w_i = centre(c) . (g * u_i)), and const_i = b . u_i (+ centred lm_head bias).

SHARED MACHINERY (below the block methods; works for every family through them):

- :meth:`TransformerAdapter.forward` -- the whole forward pass built from the block methods,
  recording every site's value at every position (:class:`FullRun`).
- :meth:`TransformerAdapter.clean_run` -- ONE cached clean run per prompt (:class:`CleanRun`):
  target i = argmax of the clean logits (Eq 10), the readout w_i, every readout site's value and
  direct effect (c . w_i) / sigma at the clean sigma (Delta_unembed, Eqs 10, 24-28), plus the
  per-layer keys/values and residuals that patching reuses.
- :meth:`TransformerAdapter.patch` -- do(site = value) at the clean run's position (Eq 11) for
  many (site, patch) rows at once (:class:`PatchedRun`): only the final position is recomputed,
  from the site's layer upward, layer-synchronously over all rows; each row is read out at its
  own final scale (``docs/conventions.md``, "Which sigma"), its total effect is Eq 12 and its
  readout sites' direct effects are the ablated direct effects of Eq 13.
- :meth:`TransformerAdapter.hook_points` / :meth:`TransformerAdapter.final_norm_module` -- the
  Hugging Face modules the independent oracle (:mod:`causalnet.adapters.naive`) hooks.
"""

from __future__ import annotations

import bisect
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from causalnet.errors import (
    CausalNetError,
    ContextError,
    InterventionError,
    ModelError,
    NonFiniteError,
    ShapeError,
    UnknownNodeError,
)
from causalnet.sites import Site, parse_site

Granularity = Literal["layer", "head"]


@dataclass(frozen=True)
class Architecture:
    """The shape facts of one decoder, read from its config."""

    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    vocab_size: int
    parallel_residual: bool  # attn.l and mlp.l both read the residual before layer l
    norm: Literal["rms", "layer"]
    # A norm after each sublayer (Gemma 3): attn.l = norm(o_proj(heads)), so the heads have
    # no additive shares of attn.l and head granularity is refused.
    sublayer_norms: bool = False


class HookPoints(NamedTuple):
    """The Hugging Face modules of one decoder layer that the naive oracle hooks.

    - ``block``: the decoder layer; its input (first positional argument or ``hidden_states``
      keyword) is the residual stream before layer l (for layer 0: the ``embed`` site).
    - ``attn``: its output (or the first element of a tuple output) [B, T, d] is ``attn.l``.
    - ``mlp``: its output [B, T, d] is ``mlp.l``.
    - ``o_proj``: the attention output projection; its input [B, T, H * dh] is the heads'
      outputs concatenated head-major, and ``o_proj(x) = attn.l`` (an additive bias is split
      equally over the heads, as in :meth:`TransformerAdapter.head_outputs`).
    """

    block: nn.Module
    attn: nn.Module
    mlp: nn.Module
    o_proj: nn.Module


@dataclass
class FullRun:
    """A full-sequence forward pass from the block methods (:meth:`TransformerAdapter.forward`).

    ``values`` maps every readout site (``embed``, ``attn.l`` or its heads, ``mlp.l``; in residual
    order) to its value at every position [B, T, d], so that
    ``resid_final = sum(values.values())`` (Eq 21). The ``*_cache`` lists (one entry per layer)
    are filled only with ``cache=True``: keys and values after the rotary embedding
    [B, T, Hkv, dh], the heads' pre-projection outputs ``z_heads`` [B, T, H, dh], the residual
    each layer's attention reads (``resid_pre``) and the one its MLP reads (``resid_mid``; equal
    to ``resid_pre`` for parallel-residual models), and the MLP outputs are in ``values``.
    """

    tokens: Tensor  # [B, T] int64
    logits: Tensor  # [B, T, V], as the model computes them
    resid_final: Tensor  # [B, T, d]: z^L before the final norm
    sigma: Tensor  # [B, T]: the final norm's scale
    values: dict[str, Tensor]  # readout site -> [B, T, d]
    granularity: Granularity
    k_cache: list[Tensor] | None = None
    v_cache: list[Tensor] | None = None
    z_heads: list[Tensor] | None = None
    resid_pre: list[Tensor] | None = None
    resid_mid: list[Tensor] | None = None


@dataclass
class CleanRun:
    """One prompt's clean run, cached once and reused by every later question.

    Read out at ``position`` t (non-negative index into ``tokens``) at the clean final scale
    ``sigma``: ``target`` i = argmax_j logits_j (Eq 10); ``readout_dir`` w_i and
    ``readout_const`` (module docstring); ``site_values`` [R, d] are the readout sites' values at
    t (``readout_sites``, ``embed`` first); ``direct_effects`` [R] =
    ``site_values @ w_i / sigma`` (Delta_unembed, Eq 10; the direct effect of Eqs 24-28);
    ``centred_logit`` = logits[i] - mean_j logits[j] (Eq 9) from the model's full logits, so
    ``direct_effects.sum() + readout_const == centred_logit`` up to rounding (Eq 21, 24).

    The private fields cache, per layer l, what :meth:`TransformerAdapter.patch` reuses: keys
    and values of the positions before t, the residual read by layer l's attention and MLP at t,
    and the clean attention, head and MLP outputs at t.
    """

    tokens: Tensor  # [T] int64, the whole prompt
    position: int  # t, non-negative
    granularity: Granularity
    readout_sites: list[str]
    target: int
    logits: Tensor  # [V] at t
    sigma: float
    readout_dir: Tensor  # [d]
    readout_const: float
    site_values: Tensor  # [R, d]
    direct_effects: Tensor  # [R]
    centred_logit: float
    _k: list[Tensor] = field(repr=False, default_factory=list)  # per layer [t, Hkv, dh]
    _v: list[Tensor] = field(repr=False, default_factory=list)  # per layer [t, Hkv, dh]
    _resid_pre: Tensor | None = field(repr=False, default=None)  # [L, d]
    _resid_mid: Tensor | None = field(repr=False, default=None)  # [L, d]
    _attn: Tensor | None = field(repr=False, default=None)  # [L, d]
    _heads: Tensor | None = field(repr=False, default=None)  # [L, H, d]
    _mlp: Tensor | None = field(repr=False, default=None)  # [L, d]

    def value(self, site: str) -> Tensor:
        """The clean value at t [d] of any site (``embed``, ``attn.l``, ``attn.l.hH``, ``mlp.l``),
        whatever the granularity of the run -- the source of mean and resample ablations."""
        s = parse_site(site)
        assert self._attn is not None and self._heads is not None and self._mlp is not None
        n_layers, n_heads = self._heads.shape[0], self._heads.shape[1]
        bad_layer = s.kind != "embed" and not 0 <= s.layer < n_layers
        bad_head = s.kind == "head" and not 0 <= s.head < n_heads
        if bad_layer or bad_head:
            raise UnknownNodeError(
                f"site {site!r} does not exist in a model with {n_layers} layers and {n_heads} "
                f"heads (valid e.g. 'embed', 'attn.0', 'attn.0.h0', 'mlp.{n_layers - 1}')"
            )
        if s.kind == "embed":
            return self.site_values[0]
        if s.kind == "attn":
            return self._attn[s.layer]
        if s.kind == "head":
            return self._heads[s.layer, s.head]
        return self._mlp[s.layer]


@dataclass
class PatchedRun:
    """The runs do(site_s = values[s, p]) at the clean run's position (Eq 11), one per row.

    Each run is read out at its own final scale ``sigma`` (docs/conventions.md, "Which sigma"):
    ``direct_effects[s, p, r]`` = (c_r . w_i) / sigma[s, p] for every readout site r of the clean
    run (Eq 13: the ablated direct effects); ``centred_logit[s, p]`` is the model's centred logit
    of the clean target computed from the patched final residual (not by summing direct
    effects), and ``total_effect = centred_logit - clean.centred_logit`` (Eqs 12, 14-18).
    """

    sites: list[str]
    readout_sites: list[str]
    direct_effects: Tensor  # [S, P, R]
    sigma: Tensor  # [S, P]
    centred_logit: Tensor  # [S, P]
    total_effect: Tensor  # [S, P]


class ResidualAdapter(ABC):
    """What every adapter offers the Hydra sweep: a decoder's residual stream as sites.

    Two kinds subclass it: :class:`TransformerAdapter` (the hand-written families, with block
    methods and the fast patch engine) and :class:`causalnet.adapters.generic.GenericAdapter`
    (any decoder, its parts discovered and verified numerically, patched by hooked
    re-forwards). Both give :class:`CleanRun` and :class:`PatchedRun` records with the same
    meaning; this base holds the site names, the tokens and the checks they share.
    """

    arch: Architecture
    model: nn.Module  # the wrapped model (weights by reference)
    tokenizer: Any = None

    @abstractmethod
    def clean_runs(
        self,
        prompts: list[Tensor | str],
        granularity: Granularity = "layer",
        positions: list[int] | None = None,
    ) -> list[CleanRun]:
        """One :class:`CleanRun` per prompt, read out at its position (default: the last)."""

    @abstractmethod
    def final_values(
        self, prompts: list[Tensor], granularity: Granularity = "layer", batch_tokens: int = 1024
    ) -> Tensor:
        """Every readout site's value at each prompt's last token: [n_prompts, R, d]."""

    @abstractmethod
    def patch(self, clean: CleanRun, sites: list[str], values: Tensor) -> PatchedRun:
        """do(site_s = values[s, p]) at the clean run's position, one run per (s, p)."""

    # ---- the clean run -----------------------------------------------------------------------
    def clean_run(
        self, tokens: Tensor | str, granularity: Granularity = "layer", position: int = -1
    ) -> CleanRun:
        """The prompt's clean run, read out at ``position`` t (default: the last token).

        target i = argmax_j pi_t[j] (Eq 10); w_i, const_i = :meth:`readout` (Eqs 9, 24);
        ``direct_effects`` = site_values @ w_i / sigma with sigma = sigma(z^L_t) frozen at the
        clean run (Delta_unembed, Eq 10); ``centred_logit`` = pi_t[i] - mean_j pi_t[j] (Eq 9).
        Only tokens[: t + 1] matter (causal masking); the rest of the prompt is kept in
        ``tokens`` but not run. ``tokens`` may be a string (then :meth:`encode` is used).
        """
        return self.clean_runs([tokens], granularity, [position])[0]

    # ---- sites -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _check_granularity(self, granularity: str) -> None:
        """'layer' or 'head'; 'head' only where heads add up to their layer's output."""
        _check_granularity(granularity)
        if granularity == "head" and self.arch.sublayer_norms:
            raise ModelError(
                f"granularity='head' is not defined for this {self.arch.family} model: a norm "
                "after the attention (attn.l = norm(o_proj(heads))) mixes its heads, so no head "
                "has an additive share of attn.l; use granularity='layer'"
            )

    def sites(self, granularity: Granularity = "layer") -> list[str]:
        """Intervenable sites in residual order: ``attn.0, mlp.0, attn.1, ...``, or with
        ``granularity="head"``: ``attn.0.h0 .. attn.0.h{H-1}, mlp.0, ...`` (HF layer index)."""
        self._check_granularity(granularity)
        out: list[str] = []
        for layer in range(self.arch.n_layers):
            if granularity == "head":
                out += [f"attn.{layer}.h{h}" for h in range(self.arch.n_heads)]
            else:
                out.append(f"attn.{layer}")
            out.append(f"mlp.{layer}")
        return out

    def readout_sites(self, granularity: Granularity = "layer") -> list[str]:
        """``["embed"] + sites(granularity)``: these sum to the final residual (Eq 21)."""
        return ["embed"] + self.sites(granularity)

    def site(self, name: str) -> Site:
        """Parse a site name and check it exists in this model (UnknownNodeError otherwise)."""
        s = parse_site(name)
        n_layers, n_heads = self.arch.n_layers, self.arch.n_heads
        bad_layer = s.kind != "embed" and not 0 <= s.layer < n_layers
        bad_head = s.kind == "head" and not 0 <= s.head < n_heads
        if bad_layer or bad_head:
            raise UnknownNodeError(
                f"site {name!r} does not exist in this {self.arch.family} model "
                f"({n_layers} layers numbered 0..{n_layers - 1}, {n_heads} heads per layer "
                f"numbered 0..{n_heads - 1}); valid sites are e.g. 'embed', 'attn.0', "
                f"'attn.0.h{n_heads - 1}', 'mlp.{n_layers - 1}'"
            )
        if s.kind == "head":
            self._check_granularity("head")
        return s

    # ---- tokens ------------------------------------------------------------------------------
    def encode(self, prompt: str) -> Tensor:
        """The prompt's token ids [T] exactly as the Hugging Face model normally sees them.

        BOS handling: the tokenizer's own default (``tokenizer(prompt)``, i.e.
        ``add_special_tokens=True``): tokenizers that add a BOS (Llama-2, Mistral) add it,
        those that do not (GPT-2, GPT-NeoX, SmolLM2) add nothing.
        """
        tok = self._tokenizer()
        if not isinstance(prompt, str) or not prompt:
            raise ContextError(f"empty prompt {prompt!r}: a prompt needs at least one token")
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        if len(ids) == 0:
            raise ContextError(f"prompt {prompt!r} encodes to no tokens")
        return torch.tensor(ids, dtype=torch.long)

    def first_token(self, text: str) -> int:
        """The first token id of ``text`` without special tokens (e.g. of ``" " + attribute``)."""
        tok = self._tokenizer()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if not text or len(ids) == 0:
            raise ContextError(f"text {text!r} encodes to no tokens")
        return int(ids[0])

    def _tokenizer(self) -> Any:
        tok = getattr(self, "tokenizer", None)
        if tok is None:
            raise ModelError(
                f"{type(self).__name__} has no tokenizer: pass one to adapt(model, tokenizer) "
                "or give token ids instead of text"
            )
        return tok

    def _check_tokens(self, tokens: Tensor | list[int], ndim: int) -> Tensor:
        """Token ids as int64 on the model's device, 1-D ([T]) or 2-D ([B, T]) as asked."""
        t = torch.as_tensor(tokens)
        if t.ndim == 1 and ndim == 2:
            t = t[None]
        if t.ndim == 2 and ndim == 1 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != ndim:
            want = "[T]" if ndim == 1 else "[B, T]"
            raise ShapeError(f"tokens must have shape {want}, got {tuple(t.shape)}")
        if t.numel() == 0 or t.shape[-1] == 0:
            raise ContextError(f"empty prompt: tokens of shape {tuple(t.shape)}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ShapeError(f"tokens must be integer ids, got dtype {t.dtype}")
        t = t.to(device=self.device, dtype=torch.long)
        bad = (t < 0) | (t >= self.arch.vocab_size)
        if bool(bad.any()):
            raise ContextError(
                f"token id {int(t[bad][0])} is outside the vocabulary [0, {self.arch.vocab_size})"
            )
        return t


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
        """Centred readout direction w_i [d] and constant const_i (see the module docstring)."""

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

    def layer_step(self, layer: int, resid: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """One decoder layer on full sequences: resid z^{l-1} [..., T, d] -> (a^l, m^l), Eqs 4-6.

        Sequential: m^l = mlp(z^{l-1} + a^l); parallel residual: m^l = mlp(z^{l-1}). The
        caller adds both: z^l = z^{l-1} + a^l + m^l.
        """
        a = self.attn_output(layer, self.attention(layer, resid, positions))
        mid = resid if self.arch.parallel_residual else resid + a
        return a, self.mlp(layer, mid)

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
        self._check_granularity(granularity)
        tokens = self._check_tokens(tokens, ndim=2)
        run = self._run_layers(tokens, granularity, cache)
        with torch.no_grad():
            run.logits = self.logits(run.resid_final)
        return run

    def _run_layers(
        self, tokens: Tensor, granularity: Granularity, cache: bool, at: Tensor | None = None
    ) -> FullRun:
        """:meth:`forward` without the vocabulary projection (``logits`` left empty): the
        clean run needs the logits at one position only, the pool of site values none. With
        ``at`` [B] (one position per sequence) the site values are kept at those positions
        only ([B, d] instead of [B, T, d])."""
        n_layers, n_heads = self.arch.n_layers, self.arch.n_heads
        rows = None if at is None else torch.arange(tokens.shape[0], device=tokens.device)

        def keep(x: Tensor) -> Tensor:
            return x if at is None else x[rows, at]

        with torch.no_grad():
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            z = self.embed(tokens)
            values: dict[str, Tensor] = {"embed": keep(z)}
            k_cache: list[Tensor] = []
            v_cache: list[Tensor] = []
            zh_cache: list[Tensor] = []
            pre_cache: list[Tensor] = []
            mid_cache: list[Tensor] = []
            for layer in range(n_layers):
                q, k, v = self.qkv(layer, z, positions)
                zh = self.attend(layer, q, k, v, positions, positions)
                a = self.attn_output(layer, zh)
                if granularity == "head":
                    hc = self.head_outputs(layer, zh)
                    for h in range(n_heads):
                        values[f"attn.{layer}.h{h}"] = keep(hc[..., h, :])
                else:
                    values[f"attn.{layer}"] = keep(a)
                pre = z
                if self.arch.parallel_residual:
                    m = self.mlp(layer, z)
                    mid = z
                    z = z + a + m
                else:
                    z = z + a
                    mid = z
                    m = self.mlp(layer, z)
                    z = z + m
                values[f"mlp.{layer}"] = keep(m)
                if cache:
                    k_cache.append(k)
                    v_cache.append(v)
                    zh_cache.append(zh)
                    pre_cache.append(pre)
                    mid_cache.append(mid)
            sigma = self.final_scale(z)
        return FullRun(
            tokens=tokens,
            logits=z.new_empty(0),
            resid_final=z,
            sigma=sigma,
            values=values,
            granularity=granularity,
            k_cache=k_cache if cache else None,
            v_cache=v_cache if cache else None,
            z_heads=zh_cache if cache else None,
            resid_pre=pre_cache if cache else None,
            resid_mid=mid_cache if cache else None,
        )

    def clean_runs(
        self,
        prompts: list[Tensor | str],
        granularity: Granularity = "layer",
        positions: list[int] | None = None,
    ) -> list[CleanRun]:
        """:meth:`clean_run` of several prompts in one batched pass (same numbers up to float
        rounding: other matrix shapes).

        The prompts, cut at their positions t_b, are right-padded to the longest and run
        together: attention is causal, so no real position reads a padded (later) one, and
        positions are absolute. On a CPU the weights are then read from memory once for the
        batch instead of once per prompt (a clean run of ~10 tokens is bound by that), and the
        vocabulary projection of the readout positions is one matrix product.
        """
        self._check_granularity(granularity)
        if positions is None:
            positions = [-1] * len(prompts)
        if len(positions) != len(prompts) or not prompts:
            raise ShapeError(
                f"clean_runs needs one position per prompt and at least one prompt, got "
                f"{len(prompts)} prompts and {len(positions)} positions"
            )
        toks: list[Tensor] = []
        ts: list[int] = []
        for tokens, position in zip(prompts, positions, strict=True):
            if isinstance(tokens, str):
                tokens = self.encode(tokens)
            tokens = self._check_tokens(tokens, ndim=1)
            n = tokens.shape[0]
            if not isinstance(position, int) or not -n <= position < n:
                raise ContextError(
                    f"position {position!r} is out of range for a prompt of {n} tokens "
                    f"(valid: {-n}..{n - 1})"
                )
            toks.append(tokens)
            ts.append(position % n)
        padded = torch.zeros(len(toks), max(ts) + 1, dtype=torch.long, device=self.device)
        for b, (tokens, t) in enumerate(zip(toks, ts, strict=True)):
            padded[b, : t + 1] = tokens[: t + 1]
        run = self._run_layers(padded, granularity, cache=True)
        assert run.k_cache is not None and run.v_cache is not None and run.z_heads is not None
        assert run.resid_pre is not None and run.resid_mid is not None
        readout_sites = self.readout_sites(granularity)
        n_layers = self.arch.n_layers
        rows = torch.arange(len(toks), device=self.device)
        at = torch.tensor(ts, device=self.device)
        acc = accumulation_dtype(self.dtype)
        out: list[CleanRun] = []
        with torch.no_grad():
            final = run.resid_final[rows, at]  # [B, d]
            all_logits = self.logits(final)  # [B, V]
            sigmas = self.final_scale(final.to(acc))
            values = torch.stack([run.values[s][rows, at] for s in readout_sites], dim=1)
            heads = torch.stack(
                [self.head_outputs(layer, zh[rows, at]) for layer, zh in enumerate(run.z_heads)],
                dim=1,
            )  # [B, L, H, d]
            attn = torch.stack(
                [self.attn_output(layer, zh[rows, at]) for layer, zh in enumerate(run.z_heads)],
                dim=1,
            )  # [B, L, d]
            pre = torch.stack([r[rows, at] for r in run.resid_pre], dim=1)
            mid = torch.stack([r[rows, at] for r in run.resid_mid], dim=1)
            mlp = torch.stack([run.values[f"mlp.{lay}"][rows, at] for lay in range(n_layers)], 1)
            for b, (tokens, t) in enumerate(zip(toks, ts, strict=True)):
                logits = all_logits[b]
                target = int(torch.argmax(logits))
                w, const = self.readout(target)
                site_values = values[b]
                out.append(
                    CleanRun(
                        tokens=tokens,
                        position=t,
                        granularity=granularity,
                        readout_sites=readout_sites,
                        target=target,
                        logits=logits,
                        sigma=float(sigmas[b]),
                        readout_dir=w,
                        readout_const=float(const),
                        site_values=site_values,
                        direct_effects=site_values.to(acc) @ w.to(acc) / sigmas[b],
                        centred_logit=float(logits[target].to(acc) - logits.to(acc).mean()),
                        _k=[k[b, :t].clone() for k in run.k_cache],
                        _v=[v[b, :t].clone() for v in run.v_cache],
                        _resid_pre=pre[b],
                        _resid_mid=mid[b],
                        _attn=attn[b],
                        _heads=heads[b],
                        _mlp=mlp[b],
                    )
                )
        return out

    def final_values(
        self,
        prompts: list[Tensor],
        granularity: Granularity = "layer",
        batch_tokens: int = 1024,
    ) -> Tensor:
        """Every readout site's value at each prompt's last token: [n_prompts, R, d].

        The numbers of ``torch.stack([clean_run(p, granularity).site_values for p in prompts])``
        (up to float rounding: other matrix shapes), for many prompts at once -- the pool of a
        sweep's ablation values. Prompts sorted by length are cut into batches of at most
        ``batch_tokens`` padded tokens, right-padded to their batch's longest prompt, and run
        through the layers without the vocabulary projection. Right padding is exact: attention
        is causal, so a real position never reads a padded (later) one, and positions (rotary
        or learned) are absolute, the same as the prompt's alone.
        """
        self._check_granularity(granularity)
        toks = [self._check_tokens(p, ndim=1) for p in prompts]
        sites = self.readout_sites(granularity)
        out = torch.empty(
            len(toks), len(sites), self.arch.d_model, dtype=self.dtype, device=self.device
        )
        order = sorted(range(len(toks)), key=lambda i: len(toks[i]))
        start = 0
        while start < len(order):
            stop = start + 1
            while stop < len(order) and (stop - start + 1) * len(toks[order[stop]]) <= batch_tokens:
                stop += 1
            batch = order[start:stop]
            padded = torch.zeros(
                len(batch), len(toks[batch[-1]]), dtype=torch.long, device=self.device
            )
            for row, i in enumerate(batch):
                padded[row, : len(toks[i])] = toks[i]
            last = torch.tensor([len(toks[i]) - 1 for i in batch], device=self.device)
            run = self._run_layers(padded, granularity, cache=False, at=last)
            index = torch.tensor(batch, device=self.device)
            with torch.no_grad():
                out[index] = torch.stack([run.values[s] for s in sites], dim=1)
            start = stop
        return out

    # ---- fast patching -----------------------------------------------------------------------
    def patch(self, clean: CleanRun, sites: list[str], values: Tensor) -> PatchedRun:
        """do(site_s = values[s, p]) at the clean run's position t, for every (s, p) at once.

        values [S, P, d] -> :class:`PatchedRun` with, per row, every readout site's direct effect
        (c . w_i) / sigma at that run's own sigma (Eq 13), the centred target logit from the
        patched final residual, and the total effect against the clean run (Eq 12).
        ``attn.l.hH = v`` replaces that head's contribution only: attn.l becomes
        clean attn.l - clean head + v. Patching a whole ``attn.l`` is refused for a
        head-granularity clean run (its heads would have no values to read out).

        How it is fast (and still exact): an intervention at t in layer l changes nothing at
        positions before t and nothing below l, so only position t is recomputed, from the
        site's layer upward, against the clean run's cached keys/values of the earlier
        positions. Rows are sorted by entry layer, so the rows active at layer l are a
        contiguous prefix that grows with l, and every block method runs once per layer on
        that whole prefix. The vocabulary projection is never computed: the readout is linear.
        """
        if not isinstance(clean, CleanRun):
            raise InterventionError(f"patch needs a CleanRun from clean_run(), got {type(clean)}")
        if isinstance(sites, str):
            raise ShapeError(f"sites must be a list of site names, got the string {sites!r}")
        parsed = [self.site(s) for s in sites]
        d, n_layers = self.arch.d_model, self.arch.n_layers
        if len(clean._k) != n_layers or clean.site_values.shape[-1] != d:
            raise InterventionError("this CleanRun was made by a different model")
        n_sites = len(parsed)
        values = torch.as_tensor(values)
        if n_sites == 0 or values.ndim != 3 or values.shape[0] != n_sites or values.shape[2] != d:
            raise ShapeError(
                f"values must have shape [n_sites={n_sites}, n_patches, d={d}] for sites "
                f"{list(sites)[:4]}{'...' if n_sites > 4 else ''}, got {tuple(values.shape)}"
            )
        n_patch = values.shape[1]
        if n_patch == 0:
            raise ShapeError(
                f"values for sites {list(sites)[:4]} have no patches: shape {tuple(values.shape)}"
            )
        values = values.to(device=self.device, dtype=self.dtype)
        finite = torch.isfinite(values).all(dim=(1, 2))
        if not bool(finite.all()):
            bad = sites[int((~finite).nonzero()[0])]
            raise NonFiniteError(f"the values for site {bad!r} contain NaN or inf")
        head_gran = clean.granularity == "head"
        if head_gran:
            for s in parsed:
                if s.kind == "attn":
                    raise InterventionError(
                        f"cannot patch the whole layer {s.name!r} in a head-granularity clean "
                        "run: its heads would have no values to read out; patch its heads "
                        f"('{s.name}.h0', ...) or use a clean run with granularity='layer'"
                    )
        with torch.no_grad():
            return self._patch(clean, parsed, values, head_gran)

    def _final_step(self, clean: CleanRun) -> FinalStep:
        """The per-layer computation of :meth:`patch` for rows at the clean run's position
        (:class:`FinalStep`, from the block methods). A family may return a faster subclass
        that computes the same numbers (Llama: :class:`causalnet.adapters.llama.LlamaFinalStep`).
        """
        return FinalStep(self, clean)

    def _patch(
        self, clean: CleanRun, parsed: list[Site], values: Tensor, head_gran: bool
    ) -> PatchedRun:
        """The layer-synchronous engine behind :meth:`patch` (see its docstring).

        Rows (site s, patch p) are sorted by entry key e(s) = -1 (embed), 2l (attn.l or its
        heads), 2l + 1 (mlp.l). At layer l the rows with e < 2l are running: their attention at
        t is recomputed (:class:`FinalStep`); the rows with e = 2l enter with their patched
        attention output; all rows with e <= 2l then run the MLP (sequential residual), and the
        rows with e = 2l + 1 enter with their patched MLP output. ``num[r, j]`` accumulates
        c_j . w_i, the numerator of readout site j's direct effect in row r; it starts at the
        clean values (sites below a row's entry are unchanged) and is divided by each row's own
        sigma at the end.
        """
        assert clean._resid_pre is not None and clean._resid_mid is not None
        assert clean._attn is not None and clean._heads is not None and clean._mlp is not None
        n_sites, n_patch, d = values.shape
        n_rows = n_sites * n_patch
        n_heads = self.arch.n_heads
        dev = values.device
        col = {name: j for j, name in enumerate(clean.readout_sites)}
        w = clean.readout_dir
        acc = accumulation_dtype(values.dtype)
        w_acc = w.to(acc)

        def dot(x: Tensor) -> Tensor:  # c . w_i, accumulated in float32 (float64 for float64)
            return x.to(acc) @ w_acc

        # Entry key: embed -1; attention site of layer l: 2l; MLP site of layer l: 2l + 1.
        keys = [-1 if s.kind == "embed" else 2 * s.layer + (s.kind == "mlp") for s in parsed]
        order = sorted(range(n_sites), key=keys.__getitem__)
        sorted_keys = [keys[i] for i in order]
        order_t = torch.tensor(order, device=dev)
        vals = values[order_t].reshape(n_rows, d)
        row_head = torch.tensor([parsed[i].head for i in order], device=dev)
        row_head = row_head.repeat_interleave(n_patch)

        def bound(k: int) -> int:  # number of rows whose entry key is < k
            return bisect.bisect_left(sorted_keys, k) * n_patch

        num = dot(clean.site_values).expand(n_rows, -1).clone()  # c . w_i per row and readout
        vals_w = dot(vals)
        z = torch.empty(n_rows, d, dtype=values.dtype, device=dev)
        n_embed = bound(0)
        z[:n_embed] = vals[:n_embed]
        num[:n_embed, col["embed"]] = vals_w[:n_embed]
        parallel = self.arch.parallel_residual
        step = self._final_step(clean)
        for layer in range(self.arch.n_layers):
            run, a_end, m_end = bound(2 * layer), bound(2 * layer + 1), bound(2 * layer + 2)
            if m_end == 0:
                continue
            mcol = col[f"mlp.{layer}"]
            hcol = col[f"attn.{layer}.h0"] if head_gran else -1
            acol = -1 if head_gran else col[f"attn.{layer}"]
            pre = clean._resid_pre[layer]
            # 1. rows already running: recompute attention at t against the cached prefix.
            a_run = None
            if run > 0:
                a_run, head_num = step.attention(layer, z[:run], head_gran)
                if head_gran:
                    assert head_num is not None
                    num[:run, hcol : hcol + n_heads] = head_num
                else:
                    num[:run, acol] = dot(a_run)
            # 2. rows entering at this layer's attention: their patched attention output.
            a_ent = None
            if a_end > run:
                v = vals[run:a_end]
                heads = row_head[run:a_end]
                is_head = heads >= 0
                a_ent = v.clone()
                if bool(is_head.any()):
                    hsel = heads[is_head]
                    a_ent[is_head] = clean._attn[layer] - clean._heads[layer, hsel] + v[is_head]
                if head_gran:  # all entering attention rows are heads here
                    rows = torch.arange(run, a_end, device=dev)
                    num[rows, hcol + heads] = vals_w[run:a_end]
                else:
                    num[run:a_end, acol] = dot(a_ent)
            if not parallel:
                if a_run is not None:
                    z[:run] += a_run
                if a_ent is not None:
                    torch.add(pre, a_ent, out=z[run:a_end])
                if a_end > 0:
                    m = step.mlp(layer, z[:a_end])
                    num[:a_end, mcol] = dot(m)
                    z[:a_end] += m
                if m_end > a_end:  # rows entering at this layer's MLP
                    torch.add(clean._resid_mid[layer], vals[a_end:m_end], out=z[a_end:m_end])
                    num[a_end:m_end, mcol] = vals_w[a_end:m_end]
            else:
                if a_run is not None:
                    m = step.mlp(layer, z[:run])  # reads the same residual as the attention
                    num[:run, mcol] = dot(m)
                    z[:run] += a_run + m
                if a_ent is not None:
                    z[run:a_end] = pre + a_ent + clean._mlp[layer]
                if m_end > a_end:
                    z[a_end:m_end] = pre + clean._attn[layer] + vals[a_end:m_end]
                    num[a_end:m_end, mcol] = vals_w[a_end:m_end]
        sigma = self.final_scale(z.to(acc))
        direct = num / sigma[:, None]
        if acc == z.dtype:  # float32 / float64: the model's own final-norm path
            centred = self.centred_logit(z, clean.target)
        else:  # half precision: Eq 24 from the final residual, accumulated in float32
            centred = dot(z) / sigma + clean.readout_const
        inv = torch.argsort(order_t)
        n_read = len(clean.readout_sites)
        direct = direct.view(n_sites, n_patch, n_read)[inv]
        sigma = sigma.view(n_sites, n_patch)[inv]
        centred = centred.view(n_sites, n_patch)[inv]
        return PatchedRun(
            sites=[s.name for s in parsed],
            readout_sites=list(clean.readout_sites),
            direct_effects=direct,
            sigma=sigma,
            centred_logit=centred,
            total_effect=centred - clean.centred_logit,
        )


class FinalStep:
    """One decoder layer at the clean run's position t for N rows of residuals: the inner loop
    of :meth:`TransformerAdapter.patch`, made once per call, from the block methods.

    An intervention at t changes nothing at the positions s < t, so row r's heads at layer l are

        z_{r,h} = sum_{s<t} p_{r,h,s} v_s + p_{r,h,t} v_{r,t},
        p_{r,h,.} = softmax( [q_{r,h} . k_s * scale]_{s<t visible},  q_{r,h} . k_{r,t} * scale )

    with the keys/values k_s, v_s of the earlier positions from the clean run (shared by all
    rows; a sliding window keeps t - s < window) and the row's own q, k, v at t (query head h
    reads key/value head h // (H / Hkv), as ``repeat_kv``). The prefix scores and values are
    batched matrix products over the key/value heads, so the prefix is never copied per row.
    Half-precision scores are softmaxed in float32, as in :meth:`TransformerAdapter.attend`.

    Subclasses may compute q and k in another frame (:meth:`rows_qkv`, :meth:`prefix_keys`,
    :meth:`self_score_weight`) as long as the scores are the same numbers.
    """

    def __init__(self, adapter: TransformerAdapter, clean: CleanRun) -> None:
        self.adapter = adapter
        self.clean = clean
        self.t = clean.position
        self.readout_dir = clean.readout_dir
        self.scale = adapter.attn_scale
        self.positions = torch.tensor([self.t], device=clean.readout_dir.device)
        self._prefixes: dict[int, tuple[Tensor, Tensor]] = {}

    def visible(self, layer: int) -> slice:
        """The cached positions s < t that position t attends to at ``layer``."""
        window = self.adapter.attention_window(layer)
        return slice(0 if window is None else max(0, self.t - window + 1), self.t)

    def prefix_keys(self, layer: int, keys: Tensor) -> Tensor:
        """The clean keys of the visible earlier positions [t', Hkv, dh] in the frame of
        :meth:`rows_qkv`'s queries (here: as cached)."""
        return keys

    def self_score_weight(self, layer: int) -> Tensor | None:
        """A weight D [dh] with q_t . k_t = sum_j q'_j k'_j D_j in the frame of
        :meth:`rows_qkv` (None: D = 1)."""
        return None

    def rows_qkv(self, layer: int, resid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [N, H, dh], k and v [N, Hkv, dh] of the rows at t (``qkv`` of the block methods)."""
        q, k, v = self.adapter.qkv(layer, resid[:, None, :], self.positions)
        return q[:, 0], k[:, 0], v[:, 0]

    def _prefix(self, layer: int) -> tuple[Tensor, Tensor]:
        """Scaled keys and values of the visible earlier positions, [Hkv, t', dh] each, cached
        per layer."""
        if layer not in self._prefixes:
            span = self.visible(layer)
            k = self.prefix_keys(layer, self.clean._k[layer][span]) * self.scale
            v = self.clean._v[layer][span]
            self._prefixes[layer] = (k.transpose(0, 1).contiguous(), v.transpose(0, 1).contiguous())
        return self._prefixes[layer]

    def heads(self, layer: int, resid: Tensor) -> Tensor:
        """The heads' outputs before the output projection: resid [N, d] -> z [N, H, dh].

        Layout: per key/value head, the scores are [t' + 1, N * g] (positions, then rows x
        query heads of the group): the softmax runs over the short position axis with the long
        row axis contiguous (20x faster than softmaxing rows of t' + 1 on a CPU), and both
        products are batched matrix products with the long axis outermost.
        """
        q, k, v = self.rows_qkv(layer, resid)
        k_prev, v_prev = self._prefix(layer)  # [Hkv, t', dh] each
        n, n_heads, d_head = q.shape
        n_kv = k.shape[1]
        group = n_heads // n_kv
        qg = q.reshape(n, n_kv, group, d_head).transpose(0, 1)  # [Hkv, N, g, dh]
        qg = qg.reshape(n_kv, n * group, d_head)  # one copy of the queries, head-major
        weight = self.self_score_weight(layer)
        k_self = k.transpose(0, 1)[:, :, None, :] * self.scale  # [Hkv, N, 1, dh]
        if weight is not None:
            k_self = k_self * weight
        s_self = (qg.view(n_kv, n, group, d_head) * k_self).sum(-1)  # [Hkv, N, g]
        scores = torch.cat(  # [Hkv, t' + 1, N * g]
            [torch.bmm(k_prev, qg.transpose(1, 2)), s_self.view(n_kv, 1, n * group)], dim=1
        )
        if scores.dtype in (torch.float16, torch.bfloat16):
            probs = torch.softmax(scores.float(), dim=1).to(scores.dtype)
        else:
            probs = torch.softmax(scores, dim=1)
        t_prev = k_prev.shape[1]
        z = torch.bmm(probs[:, :t_prev].transpose(1, 2), v_prev)  # [Hkv, N * g, dh]
        z = z.view(n_kv, n, group, d_head)
        p_self = probs[:, t_prev].view(n_kv, n, group, 1)
        z.addcmul_(p_self, v.transpose(0, 1)[:, :, None, :])
        return z.transpose(0, 1).reshape(n, n_heads, d_head)

    def attention(self, layer: int, resid: Tensor, per_head: bool) -> tuple[Tensor, Tensor | None]:
        """The attention output a [N, d] of the rows and, with ``per_head``, each head's
        direct-effect numerator (head contribution . w_i) [N, H] (else None)."""
        zh = self.heads(layer, resid)
        if not per_head:
            return self.adapter.attn_output(layer, zh), None
        contrib = self.adapter.head_outputs(layer, zh)  # [N, H, d]
        w = self.readout_dir
        return contrib.sum(-2), contrib.to(accumulation_dtype(w.dtype)) @ w.to(
            accumulation_dtype(w.dtype)
        )

    def mlp(self, layer: int, resid: Tensor) -> Tensor:
        """The MLP's contribution m [N, d] of the rows (``mlp`` of the block methods)."""
        return self.adapter.mlp(layer, resid)


def linear_head_outputs(o_proj: nn.Linear, z: Tensor, n_heads: int) -> Tensor:
    """Each head's term of an ``nn.Linear`` output projection: ``W_O[:, H] z_H + b_O / H``,
    [..., H, dh] -> [..., H, d]; they sum to ``o_proj(concat_H z_H)`` (a bias split equally)."""
    w_o = o_proj.weight.view(o_proj.out_features, n_heads, -1)  # [d, H, dh]
    out = torch.einsum("...hk,dhk->...hd", z, w_o)
    if o_proj.bias is not None:
        out = out + o_proj.bias / n_heads
    return out


def rotate_half(x: Tensor) -> Tensor:
    """``[x1 | x2] -> [-x2 | x1]`` over the last dimension: the rotary convention of Llama,
    GPT-NeoX and Gemma (``x * cos + rotate_half(x) * sin``)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype readouts accumulate in: float64 for float64 models, else float32 (so half-
    precision models get float32 direct effects, sigma and centred logits)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_VOCAB_MEANS: dict[int, tuple[weakref.ref, tuple, Tensor]] = {}


def vocab_mean(w_u: Tensor) -> Tensor:
    """``mean_j W_U[j]`` [d] of an unembedding matrix [V, d], computed once per weight.

    Every readout needs it (the centring of Eq 9) and it reads the whole [V, d] matrix, so it
    is cached per tensor, keyed by its storage, shape, dtype, device and in-place version counter
    (an edited or replaced weight is averaged again).
    """
    key = (w_u.data_ptr(), tuple(w_u.shape), w_u.dtype, w_u.device, w_u._version)
    hit = _VOCAB_MEANS.get(id(w_u))
    if hit is not None and hit[0]() is w_u and hit[1] == key:
        return hit[2]
    with torch.no_grad():
        mean = w_u.mean(0)
    ident = id(w_u)

    def forget(_: weakref.ref) -> None:
        _VOCAB_MEANS.pop(ident, None)

    _VOCAB_MEANS[ident] = (weakref.ref(w_u, forget), key, mean)
    return mean


def _check_granularity(granularity: str) -> None:
    if granularity not in ("layer", "head"):
        raise CausalNetError(f"granularity must be 'layer' or 'head', got {granularity!r}")
