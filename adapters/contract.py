"""The contract every adapter meets: a decoder's residual stream as named sites.

Sites (``docs/conventions.md``): ``embed``, ``attn.l``, ``mlp.l`` (l = 0..L-1, Hugging Face's
layer index), ``attn.l.hH``. The value of a site is what it adds to the residual stream, so
``z_final = embed + sum_l (attn.l + mlp.l)`` (paper Eq 21) and ``attn.l = sum_H attn.l.hH``.
:class:`ResidualAdapter` is what the Hydra sweep asks of any adapter -- clean runs, the pool of
site values, patches (:mod:`causalnet.adapters.records`) -- with the site names, tokens and
checks they share; :class:`Architecture` holds one decoder's shape facts and :class:`HookPoints`
the modules of a layer that an independent oracle hooks. Two kinds implement it: the
hand-written families (:class:`causalnet.adapters.base.TransformerAdapter`) and any discovered,
verified decoder (:class:`causalnet.adapters.generic.GenericAdapter`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from causalnet.errors import (
    ContextError,
    InterventionError,
    ModelError,
    NonFiniteError,
    ShapeError,
    UnknownNodeError,
)
from causalnet.sites import Site, SiteSet, is_site_set, parse_site, parse_site_set, site_in_range

from .records import CleanRun, Granularity, PatchedRun, check_granularity


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
    # Blocks that add one part, x + mixer(norm(x)) (Mamba): sites embed and mixer.l only.
    mixer_blocks: bool = False


class HookPoints(NamedTuple):
    """The Hugging Face modules of one decoder layer that the naive oracle hooks.

    - ``block``: the decoder layer; its input (first positional argument or ``hidden_states``
      keyword) is the residual stream before layer l (for layer 0: the ``embed`` site).
    - ``attn``: its output (or the first element of a tuple output) [B, T, d] is ``attn.l``.
    - ``mlp``: its output [B, T, d] is ``mlp.l``.
    - ``o_proj``: the attention output projection; its input [B, T, H * dh] is the heads'
      outputs concatenated head-major, and ``o_proj(x) = attn.l`` (an additive bias is split
      equally over the heads, as in :meth:`TransformerAdapter.head_outputs`).
    - ``mixer``: in a model of one-part blocks (``arch.mixer_blocks``), the module whose output
      is ``mixer.l``; there ``attn``, ``mlp`` and ``o_proj`` are that module too and not hooked.
    """

    block: nn.Module
    attn: nn.Module
    mlp: nn.Module
    o_proj: nn.Module
    mixer: nn.Module | None = None


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
        check_granularity(granularity)
        if granularity == "head" and self.arch.sublayer_norms:
            raise ModelError(
                f"granularity='head' is not defined for this {self.arch.family} model: a norm "
                "after the attention (attn.l = norm(o_proj(heads))) mixes its heads, so no head "
                "has an additive share of attn.l; use granularity='layer'"
            )

    def sites(self, granularity: Granularity = "layer") -> list[str]:
        """Intervenable sites in residual order: ``attn.0, mlp.0, attn.1, ...``, or with
        ``granularity="head"``: ``attn.0.h0 .. attn.0.h{H-1}, mlp.0, ...`` (HF layer index);
        in a model of one-part blocks ``mixer.0, mixer.1, ...``."""
        self._check_granularity(granularity)
        if self.arch.mixer_blocks:
            return [f"mixer.{layer}" for layer in range(self.arch.n_layers)]
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
        if s.kind != "embed" and (s.kind == "mixer") != self.arch.mixer_blocks:
            has = (
                "one-part blocks: its sites are 'embed' and 'mixer.L'"
                if self.arch.mixer_blocks
                else "attention and MLP parts: its sites are 'embed', 'attn.L', 'mlp.L', "
                "'attn.L.hH'"
            )
            raise UnknownNodeError(
                f"site {name!r} does not exist in this {self.arch.family} model, whose blocks "
                f"add {has} (L numbered 0..{n_layers - 1})"
            )
        if not site_in_range(s, n_layers, n_heads):
            raise UnknownNodeError(
                f"site {name!r} does not exist in this {self.arch.family} model "
                f"({n_layers} layers numbered 0..{n_layers - 1}, {n_heads} heads per layer "
                f"numbered 0..{n_heads - 1}); valid sites are e.g. 'embed', 'attn.0', "
                f"'attn.0.h{n_heads - 1}', 'mlp.{n_layers - 1}'"
            )
        if s.kind == "head":
            self._check_granularity("head")
        return s

    def unit(self, name: str) -> Site | SiteSet:
        """A site (:meth:`site`) or a set of sites ``a+b`` ablated together, its members in
        residual order, each checked as :meth:`site` (conventions: "Sets of sites")."""
        if not is_site_set(name):
            return self.site(name)
        unit = parse_site_set(name)
        for member in unit.members:
            self.site(member.name)
        return unit

    # ---- what clean_runs and patch are given -------------------------------------------------
    def pad_prompts(
        self, prompts: list[Tensor | str], positions: list[int] | None
    ) -> tuple[Tensor, list[Tensor], list[int]]:
        """The prompts (text or ids), cut after their positions t_b (default -1: the last
        token), right-padded with id 0 into one [B, max t_b + 1] batch; returns it, each
        prompt's whole checked ids [T_b] and the non-negative t_b. Raises ShapeError /
        ContextError naming what is wrong."""
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
        return padded, toks, ts

    def length_batches(
        self, prompts: list[Tensor], batch_tokens: int
    ) -> Iterator[tuple[list[int], Tensor, Tensor]]:
        """The prompts (ids, all checked first) sorted by length and cut into batches of at
        most ``batch_tokens`` padded tokens (a longer prompt is a batch of its own): yields the
        batch's prompt indices, its ids right-padded with 0 to its longest prompt
        [b, T_max], and each prompt's last position [b]."""
        toks = [self._check_tokens(p, ndim=1) for p in prompts]
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
            yield batch, padded, last
            start = stop

    def patch_units(
        self, clean: CleanRun, sites: list[str]
    ) -> tuple[list[tuple[Site, ...]], list[str]]:
        """The member groups of ``sites`` for :meth:`patch` (a plain site is a group of one,
        a set ``a+b`` its members in residual order) and the members' names flattened in
        order, after checking that ``clean`` is a CleanRun and ``sites`` a list."""
        if not isinstance(clean, CleanRun):
            raise InterventionError(f"patch needs a CleanRun from clean_run(), got {type(clean)}")
        if isinstance(sites, str):
            raise ShapeError(f"sites must be a list of site names, got the string {sites!r}")
        units = [self.unit(s) for s in sites]
        groups = [u.members if isinstance(u, SiteSet) else (u,) for u in units]
        return groups, [m.name for g in groups for m in g]

    def patch_values(
        self, sites: list[str], groups: list[tuple[Site, ...]], values: Tensor
    ) -> Tensor:
        """``values`` for :meth:`patch` checked -- shape [n_members, P >= 1, d], every entry
        finite -- and on the model's device and dtype."""
        names = [m.name for g in groups for m in g]
        d = self.arch.d_model
        values = torch.as_tensor(values)
        n_s = len(names)
        if n_s == 0 or values.ndim != 3 or values.shape[0] != n_s or values.shape[2] != d:
            what = "n_sites" if n_s == len(groups) else "n_members (one per member of each set)"
            raise ShapeError(
                f"values must have shape [{what}={n_s}, n_patches, d={d}] for sites "
                f"{list(sites)[:4]}{'...' if len(groups) > 4 else ''}, got {tuple(values.shape)}"
            )
        if values.shape[1] == 0:
            raise ShapeError(
                f"values for sites {list(sites)[:4]} have no patches: shape {tuple(values.shape)}"
            )
        values = values.to(device=self.device, dtype=self.dtype)
        finite = torch.isfinite(values).all(dim=(1, 2))
        if not bool(finite.all()):
            bad = names[int((~finite).nonzero()[0])]
            raise NonFiniteError(f"the values for site {bad!r} contain NaN or inf")
        return values

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
