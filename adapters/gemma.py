"""Gemma 3 (``Gemma3ForCausalLM``, text) as a residual stream of sites: norms after the sublayers.

The residual stream, block by block (Gemma's RMSNorm ``n(x) = x / sigma(x) * (1 + g)`` computed
in float32 everywhere)::

    z^0    = embed_tokens[x_t] * sqrt(d)                                          (embed)
    q,k,v  = {q,k,v}_proj( input_layernorm(z^{l-1}) );  q, k <- rotary(q_norm(q)), rotary(k_norm(k))
    a^l    = post_attention_layernorm( o_proj( softmax(q k^T * s + mask) v ) )   (attn.l)
    m^l    = post_feedforward_layernorm( down( gelu(gate(x)) * up(x) ) ),
             x = pre_feedforward_layernorm(z^{l-1} + a^l)                         (mlp.l)
    z^l    = z^{l-1} + a^l + m^l                                                  (Eq 4)
    pi_t   = norm(z^L_t) W_U^T                                                    (Eq 3, tied)

A site's value is what it adds to the residual stream, so attn.l and mlp.l are the *normed*
sublayer outputs (the project's convention for norms after the sublayer).

Heads (docs/conventions.md, "Heads under a norm after the attention"): with o = sum_h o_h the
output projection's per-head terms, attn.l = gamma * o / sigma(o), gamma = 1 + g, and head h's
value is its share at the run's own post-attention scale, ``attn.l.hH = gamma * o_h / sigma(o)``
(the shares sum to attn.l). Patching head h to v sets its pre-norm term to the one whose share
at the clean scale is v, ``o_h' = o_h + (v - share_h) * sigma(o) / gamma`` (coordinates with
gamma = 0 keep o_h), recomputes o' and the norm with its own sigma(o'); the patched run's heads
of that layer are read out as shares at sigma(o'). ``s`` is
``query_pre_attn_scalar ** -0.5``; the layers alternate sliding-window and full attention
(``layer_types``), each with its own rotary tables, taken from the model's rotary module.
The readout (Eqs 9, 10, 24-28) is ``w_i = (1 + G) * (W_U[i] - mean_j W_U[j])``, ``const_i = 0``.
Soft-capped attention or final logits (Gemma 2) are refused: the final cap is not linear, so
direct effects would not sum to the logit.

Weights are read from the Hugging Face modules by reference at every call, never copied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from causalnet.errors import CausalNetError, InterventionError, ModelError

from .base import (
    Architecture,
    CleanRun,
    FinalStep,
    HookPoints,
    PatchedRun,
    TransformerAdapter,
)
from .blocks import linear_head_outputs, rotate_half
from .readout import accumulation_dtype, centred_unembed

#: Rope types whose cos/sin tables depend on the position only (not on the sequence length).
_STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
)


def _check_modules(body: nn.Module) -> None:
    """Refuse a model whose layers are not the plain modules this file's math describes."""
    norm_class = type(body.norm)
    if norm_class.__name__ != "Gemma3RMSNorm":
        raise ModelError(f"GemmaAdapter: norm is a {norm_class.__name__}, expected Gemma3RMSNorm")
    for i, layer in enumerate(body.layers):
        attn = layer.self_attn
        parts = {name: (getattr(layer, name), norm_class) for name in _NORMS}
        parts |= {f"self_attn.{n}": (getattr(attn, n), norm_class) for n in ("q_norm", "k_norm")}
        projections = ("q_proj", "k_proj", "v_proj", "o_proj")
        parts |= {f"self_attn.{n}": (getattr(attn, n), nn.Linear) for n in projections}
        for name, (module, kind) in parts.items():
            if type(module) is not kind:
                raise ModelError(
                    f"GemmaAdapter: layers.{i}.{name} is a {type(module).__name__}, expected "
                    f"{kind.__name__}"
                )


class GemmaAdapter(TransformerAdapter):
    """``Gemma3ForCausalLM`` seen as the sites ``embed``, ``attn.l`` (or its heads' shares
    ``attn.l.hH``), ``mlp.l``.

    Read from the config, not assumed: ``head_dim``, grouped key/value heads, ``layer_types``
    with ``sliding_window``, the rotary tables per layer type, ``query_pre_attn_scalar``,
    ``attention_bias``, ``hidden_activation`` (through the model's MLP module). Refused:
    ``attn_logit_softcapping``, ``final_logit_softcapping``, bidirectional attention, rope types
    whose tables depend on the sequence length.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None) -> None:
        body = getattr(model, "model", None)
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) != "gemma3_text" or body is None:
            raise ModelError(
                f"GemmaAdapter needs a Gemma3ForCausalLM, got {type(model).__name__} "
                f"(model_type={getattr(config, 'model_type', None)!r})"
            )
        for switch in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, switch, None) is not None:
                raise ModelError(
                    f"GemmaAdapter: {switch}={getattr(config, switch)} is not supported (a tanh "
                    "cap is not linear: direct effects would not sum to the logit)"
                )
        if getattr(config, "use_bidirectional_attention", False):
            raise ModelError("GemmaAdapter: use_bidirectional_attention is not causal; refused")
        layer_types = list(config.layer_types)
        for kind in sorted(set(layer_types)):
            rope_type = config.rope_parameters[kind].get("rope_type", "default")
            if rope_type not in _STATIC_ROPE_TYPES:
                raise ModelError(
                    f"GemmaAdapter: rope_type {rope_type!r} of the {kind} layers is not supported "
                    f"(its tables depend on the sequence length of each call); supported: "
                    f"{sorted(_STATIC_ROPE_TYPES)}"
                )
        head = model.get_output_embeddings()
        if head is None or tuple(head.weight.shape) != (config.vocab_size, config.hidden_size):
            raise ModelError("GemmaAdapter: the model has no [vocab, d] unembedding (lm_head)")
        _check_modules(body)

        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self._body = body
        self._head = head
        self._layer_types = layer_types
        self.arch = Architecture(
            family="gemma3",
            n_layers=config.num_hidden_layers,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads,
            d_model=config.hidden_size,
            d_head=config.head_dim,
            vocab_size=config.vocab_size,
            parallel_residual=False,
            norm="rms",
            sublayer_norms=True,
        )
        # The scale the attention module itself uses (query_pre_attn_scalar ** -0.5).
        self.attn_scale = float(body.layers[0].self_attn.scaling)

    # ---- the family's blocks -------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """``z^0_t = embed_tokens[x_t] * sqrt(d)`` (the model's scaled embedding module)."""
        return self._body.embed_tokens(tokens)

    def attention_window(self, layer: int) -> int | None:
        """``sliding_window`` for ``sliding_attention`` layers, None for full attention."""
        if self._layer_types[layer] == "sliding_attention":
            return int(self.config.sliding_window)
        return None

    def qkv(self, layer: int, resid: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``q = rotary(q_norm(q_proj(x)))``, ``k = rotary(k_norm(k_proj(x)))``, ``v = v_proj(x)``
        with x = input_layernorm(z), the layer type's rotary tables: [..., T, H or Hkv, dh]."""
        block = self._body.layers[layer]
        attn = block.self_attn
        x = block.input_layernorm(resid)
        d_head = self.arch.d_head
        q = attn.q_norm(attn.q_proj(x).unflatten(-1, (-1, d_head)))
        k = attn.k_norm(attn.k_proj(x).unflatten(-1, (-1, d_head)))
        v = attn.v_proj(x).unflatten(-1, (-1, d_head))
        cos, sin = self._body.rotary_emb(x, positions.reshape(1, -1), self._layer_types[layer])
        cos, sin = cos[0].unsqueeze(-2), sin[0].unsqueeze(-2)  # [T, 1, dh] against [..., T, H, dh]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def head_terms(self, layer: int, z: Tensor) -> Tensor:
        """``o_proj``'s per-head terms ``o_h = W_O[:, h] z_h (+ b_O / H)`` [..., H, d], before the
        norm; they sum to o_proj's output o."""
        o_proj = self._body.layers[layer].self_attn.o_proj
        return linear_head_outputs(o_proj, z, self.arch.n_heads)

    def post_attention_frame(self, layer: int, o: Tensor) -> tuple[Tensor, Tensor]:
        """``(1 / sigma(o) [..., 1], gamma [d])`` of layer ``layer``'s post-attention norm, in
        the accumulation dtype (float32, float64 for float64 models), as Gemma's RMSNorm
        computes them: ``attn.l = o * (1 / sigma(o)) * gamma``, gamma = 1 + g."""
        norm = self._body.layers[layer].post_attention_layernorm
        acc = accumulation_dtype(o.dtype)
        x = o.to(acc)
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
        return inv, 1.0 + norm.weight.to(acc)

    def head_outputs(self, layer: int, z: Tensor) -> Tensor:
        """Each head's share of attn.l at the post-attention norm's scale of this very run:
        ``share_h = gamma * o_h / sigma(o)``, o = o_proj(concat_h z_h), [..., H, dh] -> [..., H, d].
        They sum to ``attn.l = gamma * o / sigma(o)`` (up to rounding)."""
        o = self._body.layers[layer].self_attn.o_proj(z.flatten(-2))
        return self._shares(layer, z, o)

    def _shares(self, layer: int, z: Tensor, o: Tensor) -> Tensor:
        """:meth:`head_outputs` given o = o_proj(concat_h z_h)."""
        inv, gamma = self.post_attention_frame(layer, o)
        return (self.head_terms(layer, z).to(inv.dtype) * inv.unsqueeze(-2) * gamma).to(z.dtype)

    def attn_and_heads(self, layer: int, z: Tensor) -> tuple[Tensor, Tensor]:
        """(attn.l, the heads' shares of it) from one o_proj: attn.l is the model's own norm
        output, not the shares' sum, which differs from it by float32 rounding in a float64
        model (Gemma's norm computes in float32)."""
        block = self._body.layers[layer]
        o = block.self_attn.o_proj(z.flatten(-2))
        return block.post_attention_layernorm(o), self._shares(layer, z, o)

    def _check_granularity(self, granularity: str) -> None:
        """'layer' or 'head': Gemma's heads have shares of attn.l (:meth:`head_outputs`)."""
        if granularity not in ("layer", "head"):
            raise CausalNetError(f"granularity must be 'layer' or 'head', got {granularity!r}")

    def attn_output(self, layer: int, z: Tensor) -> Tensor:
        """``attn.l = post_attention_layernorm(o_proj(concat_H z_H))``: [..., H, dh] -> [..., d]."""
        block = self._body.layers[layer]
        return block.post_attention_layernorm(block.self_attn.o_proj(z.flatten(-2)))

    def mlp(self, layer: int, resid: Tensor) -> Tensor:
        """``mlp.l = post_feedforward_layernorm(mlp(pre_feedforward_layernorm(z)))``: [..., d]."""
        block = self._body.layers[layer]
        return block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(resid)))

    def final_scale(self, resid: Tensor) -> Tensor:
        """``sigma = 1 / rsqrt(mean(z^2) + eps)`` in float32, as Gemma's RMSNorm."""
        z = resid.to(torch.float32)
        inv = torch.rsqrt(z.pow(2).mean(-1) + self._body.norm.eps)
        return (1.0 / inv).to(resid.dtype)

    def logits(self, resid: Tensor) -> Tensor:
        """``pi = norm(z) W_U^T`` (Eq 3) through the model's own final norm and lm_head."""
        return self._head(self._body.norm(resid))

    @torch.no_grad()
    def readout(self, token: int) -> tuple[Tensor, float]:
        """``w_i = (1 + G) * (W_U[i] - mean_j W_U[j])``, ``const_i = 0`` (no lm_head bias)."""
        u, const = centred_unembed(self._head.weight, self._head.bias, token)
        return (1.0 + self._body.norm.weight) * u, const

    @torch.no_grad()
    def centred_logit(self, resid: Tensor, token: int) -> Tensor:
        """``norm(z) . (W_U[i] - mean_j W_U[j])`` through the model's own final norm (Eq 9)."""
        u, const = centred_unembed(self._head.weight, self._head.bias, token)
        return self._body.norm(resid) @ u + const

    # ---- patching a head under the post-attention norm --------------------------------------
    def patch(self, clean: CleanRun, sites: list[str], values: Tensor) -> PatchedRun:
        """:meth:`TransformerAdapter.patch`; a head's patch recomputes the post-attention norm.

        Head h of layer l patched to v: ``o_h' = o_h + (v - share_h) * sigma(o) / gamma`` at the
        clean scale (coordinates with gamma = 0 keep o_h), ``o' = o - o_h + o_h'``, and the layer
        adds ``attn.l' = norm(o')`` with its own sigma(o') (the model's module). In a
        head-granularity run the heads of layer l are read out as their shares at sigma(o'),
        ``gamma * o_k' / sigma(o')``, so they sum to attn.l'. Other sites: as every family.
        """
        if not isinstance(sites, str) and any("+" in str(s) for s in sites):
            heads = [s for s in sites if ".h" in str(s) and "+" in str(s)]
            if heads:
                raise InterventionError(
                    f"sets of heads ({heads[0]!r}) are not patched in {self.arch.family}: a "
                    "head's patch goes through the post-attention norm one head at a time; "
                    "ablate whole layers together ('attn.L+attn.M') or single heads"
                )
            return super().patch(clean, sites, values)
        rows = self._head_rows(clean, sites, values)
        if not rows:
            return super().patch(clean, sites, values)
        values = torch.as_tensor(values).to(device=self.device, dtype=self.dtype).clone()
        step = FinalStep(self, clean)
        frames: dict[int, tuple[Tensor, Tensor]] = {}
        shares: dict[int, Tensor] = {}
        with torch.no_grad():
            for i, (layer, head) in rows.items():
                if layer not in frames:
                    zh = step.heads(layer, clean._resid_pre[layer][None])  # clean heads at t
                    o = self._body.layers[layer].self_attn.o_proj(zh.flatten(-2))[0]
                    frames[layer] = (self.head_terms(layer, zh)[0], o)
                values[i], shares[i] = self._renormed(clean, layer, head, values[i], frames[layer])
        run = super().patch(clean, sites, values)
        if clean.granularity == "head":
            acc = run.direct_effects.dtype
            w = clean.readout_dir.to(acc)
            direct = run.direct_effects.clone()
            n_heads = self.arch.n_heads
            for i, (layer, _) in rows.items():
                cols = clean.readout_sites.index(f"attn.{layer}.h0") + torch.arange(n_heads)
                share_w = shares[i].to(acc) @ w  # [P, H]
                direct[i][:, cols] = share_w / run.sigma[i][:, None].to(acc)
            run.direct_effects = direct
        return run

    def _head_rows(self, clean: CleanRun, sites: list[str], values: Tensor) -> dict[int, tuple]:
        """{row: (layer, head)} of the head sites, if the call is well formed (else {}: the base
        patch raises its error)."""
        if not isinstance(clean, CleanRun) or isinstance(sites, str):
            return {}
        parsed = [self.site(s) for s in sites]
        v = torch.as_tensor(values)
        if v.ndim != 3 or v.shape[0] != len(parsed) or v.shape[1] == 0:
            return {}
        if v.shape[2] != self.arch.d_model or len(clean._k) != self.arch.n_layers:
            return {}
        return {i: (s.layer, s.head) for i, s in enumerate(parsed) if s.kind == "head"}

    def _renormed(
        self, clean: CleanRun, layer: int, head: int, v: Tensor, frame: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """For patches v [P, d] of head ``head``: the value the base engine adds in place of the
        clean share (it then sees attn.l' = norm(o')) and the heads' shares at sigma(o')
        [P, H, d] (accumulation dtype)."""
        terms, o = frame  # [H, d], [d]: the clean pre-norm terms and their sum
        inv, gamma = self.post_attention_frame(layer, o)
        acc = inv.dtype
        share = terms[head].to(acc) * inv * gamma
        nonzero = gamma != 0
        scale = torch.where(nonzero, 1.0 / (inv * torch.where(nonzero, gamma, 1.0)), 0.0)
        delta = (v.to(acc) - share) * scale  # [P, d]: o_h' - o_h
        o_new = (o.to(acc) + delta).to(o.dtype)
        attn_new = self._body.layers[layer].post_attention_layernorm(o_new)
        new_terms = terms.to(acc).expand(v.shape[0], -1, -1).clone()
        new_terms[:, head] += delta
        inv_new, _ = self.post_attention_frame(layer, o_new)
        v_engine = attn_new - clean._attn[layer] + clean._heads[layer, head]
        return v_engine, new_terms * inv_new.unsqueeze(-2) * gamma

    # ---- hooks for the naive oracle ------------------------------------------------------
    def hook_points(self, layer: int) -> HookPoints:
        """``(layers[l], .post_attention_layernorm, .post_feedforward_layernorm, .o_proj)``:
        the two post-norms' outputs are what the sublayers add to the residual stream."""
        block = self._body.layers[layer]
        return HookPoints(
            block=block,
            attn=block.post_attention_layernorm,
            mlp=block.post_feedforward_layernorm,
            o_proj=block.self_attn.o_proj,
        )

    def final_norm_module(self) -> nn.Module:
        """``model.norm``, whose input is z^L."""
        return self._body.norm
