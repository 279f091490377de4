"""Find a decoder's residual stream from the model itself (issue 10, sections 1-3).

:func:`discover` runs the model on a seeded probe with every module hooked and reads, by
measurement rather than by class or config names:

- the **blocks**: the ``nn.ModuleList`` whose children run once each, in order, each reading the
  previous one's output (block l + 1's input is block l's output);
- per block, the **attention part and the MLP part** of what it adds to the stream: the pair of
  its submodules (after any norm that follows a sublayer) whose outputs, times multipliers
  alpha and beta (Granite's residual_multiplier, else 1), sum to its output minus its input at
  every position; among exact pairs the outermost modules;
- which is which, and **sequential vs parallel** residual: a second probe perturbs one part's
  output and sees whether the other part's output moves (one reads the other: sequential), and
  perturbs the block's input at earlier positions only (the attention part is the one that
  reads earlier positions);
- the **final norm** (the module between the last block and the unembedding) and its form
  (:func:`causalnet.adapters.norms.fit_final_norm`), the **unembedding** with its logit
  multiplier and soft-cap (:func:`causalnet.adapters.norms.fit_readout`);
- **heads**: an ``nn.Linear`` / ``Conv1D`` in the block whose output is the attention part's
  output, its input split into ``n_heads`` equal slices (head-major, as every transformers
  model lays them out); where the attention part is a norm after the attention (OLMo-2,
  Gemma 2/3), the one whose output is that norm's input, the norm fitted as an RMS norm
  (:func:`causalnet.adapters.heads.find_post_norm`; heads are its shares, kept per layer in
  :attr:`Decomposition.post_norms`); otherwise the reason is kept in
  :attr:`Decomposition.head_refusal`.

A model that is not a transformers model names its parts in a :class:`Declaration`; the same
measurements and checks run on the declared modules. Anything that does not fit raises
UnsupportedModelError naming the block or module, the identity and by how much.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from causalnet.errors import UnsupportedModelError

from .hooks import rel_err, tolerance
from .measure import (
    PROBE_SHAPE,
    Recording,
    measure_roles,
    probe_tokens,
    snap_multiplier,
    subtree,
)
from .norms import FinalNorm, Readout, fit_final_norm, fit_readout, input_scale
from .onepart import NO_HEADS, find_mixers


@dataclass(frozen=True)
class Declaration:
    """The parts of a decoder named by the user (dotted paths; ``attn``, ``mlp`` and ``o_proj``
    relative to each block). ``final_norm=None``: no final norm. ``n_heads`` enables heads."""

    blocks: str
    attn: str
    mlp: str
    unembed: str
    final_norm: str | None = None
    embed: str | None = None
    o_proj: str | None = None
    n_heads: int | None = None


@dataclass
class Decomposition:
    """A decoder's residual stream as found and checked by :func:`discover`."""

    model: nn.Module
    family: str
    blocks: list[nn.Module]
    block_names: list[str]
    attn: list[nn.Module]  # what each block's attention part adds is alpha_l * attn[l](...)
    mlp: list[nn.Module]
    attn_names: list[str]
    mlp_names: list[str]
    alpha: list[float]
    beta: list[float]
    parallel_residual: bool
    final_norm: FinalNorm
    readout: Readout
    d_model: int
    vocab_size: int
    n_heads: int
    o_proj: list[nn.Module] | None  # per layer, when head granularity is supported
    head_refusal: str | None  # why not, else None
    sublayer_norms: bool  # a norm follows a sublayer (Gemma 2/3, OLMo-2)
    # per layer with heads, the norm after the attention (heads are its shares), else None
    post_norms: list[Any] | None = None
    notes: list[str] = field(default_factory=list)
    # one-part blocks (x + gamma_l * mixer_l(norm(x)), Mamba): the mixers; attn/mlp are empty
    mixer: list[nn.Module] | None = None
    mixer_names: list[str] = field(default_factory=list)
    gamma: list[float] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def one_part(self) -> bool:
        """Whether each block adds one part, the mixer (sites ``mixer.l``), not two."""
        return self.mixer is not None

    def summary(self) -> str:
        """One line per part, for error messages and the README."""
        if self.mixer is not None:
            return (
                f"{self.family}: {self.n_layers} one-part blocks at "
                f"{self.block_names[0].rsplit('.', 1)[0]}, mixer={self.mixer_names[0]}, "
                f"multipliers {sorted({g for g in self.gamma if g != 1.0}) or 'none'}, final "
                f"norm {self.final_norm.form} ({self.final_norm.name or '-'}), heads: "
                f"{self.head_refusal}"
            )
        mult = {a for a in self.alpha + self.beta if a != 1.0}
        return (
            f"{self.family}: {self.n_layers} blocks at {self.block_names[0].rsplit('.', 1)[0]}, "
            f"attn={self.attn_names[0]}, mlp={self.mlp_names[0]}, "
            f"{'parallel' if self.parallel_residual else 'sequential'} residual, final norm "
            f"{self.final_norm.form} ({self.final_norm.name or '-'}), logit scale "
            f"{self.readout.logit_scale:g}, input scale {self.readout.input_scale:g}, softcap "
            f"{self.readout.softcap}, multipliers "
            f"{sorted(mult) or 'none'}, heads: {self.head_refusal or self.n_heads}"
        )


def _module(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise UnsupportedModelError(f"declared {what} {path!r} is not a submodule: {err}") from err


def _find_blocks(model: nn.Module, rec: Recording, declared: str | None) -> list[str]:
    """Names of the decoder blocks: the longest ModuleList whose children run once each and
    chain (block l + 1 reads block l's output)."""
    lists = (
        [declared]
        if declared
        else [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    )
    best: list[str] = []
    why = "no nn.ModuleList of decoder blocks ran on the probe"
    for path in lists:
        mlist = _module(model, path, "blocks")
        names = [f"{path}.{i}" for i in range(len(mlist))]
        if not names or names[0] not in rec.inp:
            continue
        shape = rec.inp[names[0]].shape
        if len(shape) != 3 or shape[:2] != PROBE_SHAPE:
            continue
        tol = tolerance(rec.inp[names[0]].dtype)
        ok = all(rec.once(n, shape) for n in names)
        chain = (
            [rel_err(rec.inp[b], rec.out[a]) for a, b in zip(names, names[1:], strict=False)]
            if ok
            else []
        )
        if ok and all(e <= tol for e in chain) and len(names) > len(best):
            best = names
        elif ok and declared:
            bad = max(range(len(chain)), key=chain.__getitem__)
            why = f"block {bad + 1} does not read block {bad}'s output (off by {chain[bad]:.2e})"
        elif declared:
            why = f"the declared blocks {path!r} do not each run once on [B, T, d] hidden states"
    if not best:
        raise UnsupportedModelError(f"{type(model).__name__}: {why}")
    return best


def _fit_pair(delta: Tensor, a: Tensor, m: Tensor) -> tuple[float, float, float]:
    """Least-squares alpha, beta with delta = alpha a + beta m; returns (alpha, beta, max error)."""
    x = torch.stack([a.reshape(-1), m.reshape(-1)], 1).double()
    y = delta.reshape(-1).double()
    coef = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    err = float((y - x @ coef).abs().max())
    return float(coef[0]), float(coef[1]), err


def _find_pair(block: str, rec: Recording, decl: Declaration | None, config: Any) -> tuple:
    """(first name, second name, coef 1, coef 2) of the two parts whose outputs sum to the
    block's output minus input; unordered (roles come from :func:`_roles`)."""
    x, y = rec.inp[block], rec.out[block]
    delta = y.double() - x.double()
    scale = max(float(x.abs().max()), float(y.abs().max()), 1e-30)
    tol = tolerance(x.dtype)
    if decl is not None:
        names = [f"{block}.{decl.attn}", f"{block}.{decl.mlp}"]
        for n in names:
            if not rec.once(n, x.shape):
                raise UnsupportedModelError(
                    f"declared part {n} does not run once with a [B, T, d] output"
                )
        pairs = [tuple(names)]
    else:
        cands = subtree(block, rec, x.shape)
        pairs = [
            (a, m)
            for a, m in itertools.combinations(cands, 2)
            if not m.startswith(a + ".") and not a.startswith(m + ".")
        ]
    found, best_err, best_pair = [], float("inf"), None
    for a, m in pairs:
        ca, cm, err = _fit_pair(delta, rec.out[a], rec.out[m])
        cos = torch.nn.functional.cosine_similarity(
            rec.out[a].reshape(1, -1).double(), rec.out[m].reshape(1, -1).double()
        )
        degenerate = min(abs(ca), abs(cm)) < 1e-3 or abs(float(cos)) > 0.999
        # near-equal errors (a module and its identity dropout): the first pair named, so the
        # refusal's text does not hang on the fit's last bits
        if err < best_err * (1 - 1e-6) and not degenerate:
            best_err, best_pair = err, (a, m)
        if err <= tol * scale and not degenerate:
            ca, cm = snap_multiplier(ca, config, tol), snap_multiplier(cm, config, tol)
            nice = (ca, cm) == (1.0, 1.0) or ca == cm == getattr(config, "residual_multiplier", 0)
            # prefer exact unit (or config) multipliers, outer modules, the last ones called
            key = (not nice, a.count(".") + m.count("."), -rec.order[a] - rec.order[m])
            found.append((key, a, m, ca, cm))
    if not found:
        detail = f"best pair {best_pair} leaves {best_err / scale:.2e}" if best_pair else "no pair"
        raise UnsupportedModelError(
            f"block {block}: its output minus its input is not alpha * attn + beta * mlp of two "
            f"of its submodules at every position (Eq 21; {detail} of the stream's scale, "
            f"tolerance {tol:g}); e.g. a nonlinearity after the residual add"
        )
    return min(found)[1:]


def _is_norm(module: nn.Module, rec: Recording | None = None, name: str = "") -> bool:
    """A module with a gain [d] and no linear map (a norm after a sublayer), where recorded
    mapping [B, T, d] to [B, T, d]."""
    d = getattr(getattr(module, "weight", None), "shape", None)
    if d is None or len(d) != 1 or any(isinstance(c, nn.Linear) for c in module.modules()):
        return False
    return rec is None or (name in rec.inp and rec.inp[name].shape[-1] == d[0])


def _n_heads(config: Any, decl: Declaration | None) -> int:
    if decl is not None and decl.n_heads:
        return int(decl.n_heads)
    for key in ("num_attention_heads", "n_head", "num_heads", "n_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def discover(model: nn.Module, declare: Declaration | None = None) -> Decomposition:
    """Find ``model``'s residual stream (module docstring); UnsupportedModelError if it has none
    that decomposes exactly. ``declare`` names the parts of a model that is not a transformers
    model (or overrides what would be found)."""
    from .heads import find_o_proj, find_post_norm  # noqa: PLC0415 (kept beside its only user)

    config = getattr(model, "config", None)
    mods = dict(model.named_modules())
    names = {id(m): n for n, m in mods.items()}
    if declare is not None:
        unembed = _module(model, declare.unembed, "unembed")
    elif hasattr(model, "get_output_embeddings"):
        unembed = model.get_output_embeddings()
    else:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers model: name its parts with "
            "causalnet.adapters.Declaration(blocks=..., attn=..., mlp=..., final_norm=..., "
            "unembed=...) and adapt(model, declare=...)"
        )
    if unembed is None or id(unembed) not in names:
        raise UnsupportedModelError(f"{type(model).__name__} has no output embedding module")
    weight = getattr(unembed, "weight", None)
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise UnsupportedModelError(f"the unembedding {names[id(unembed)]} has no weight [V, d]")
    n_vocab = weight.shape[0]
    embed = _module(model, declare.embed, "embed") if declare and declare.embed else None
    if embed is None and hasattr(model, "get_input_embeddings"):
        embed = model.get_input_embeddings()
    if isinstance(getattr(embed, "num_embeddings", None), int):
        n_vocab = min(n_vocab, embed.num_embeddings)
    tokens = probe_tokens(model, n_vocab)
    rec = Recording(model, tokens)
    blocks = _find_blocks(model, rec, declare.blocks if declare else None)
    shape = rec.inp[blocks[0]].shape
    z_last, tol = rec.out[blocks[-1]], tolerance(rec.out[blocks[-1]].dtype)
    u_name = names[id(unembed)]
    if rec.calls.get(u_name) != 1 or rec.inp.get(u_name) is None:
        raise UnsupportedModelError(f"the unembedding {u_name} did not run once on the probe")
    if declare is not None:
        norm_name = declare.final_norm or ""
        if norm_name:
            _module(model, norm_name, "final_norm")
    else:
        inside = tuple(b + "." for b in blocks)
        # c with (the unembedding's input) = c (the module's output), None where there is none
        scales = {
            n: input_scale(rec.out[n], rec.inp[u_name], tol)
            for n in rec.calls
            if n not in blocks
            and not n.startswith(inside)
            and (rec.once(n, shape) or rec.last_call(n, shape))
            and rel_err(rec.inp[n], z_last) <= tol
        }
        cands = [n for n, c in scales.items() if c is not None]
        # the unembedding reading the norm's output itself (c = 1) first, then a constant times
        # it (MiniCPM3 divides by logits_scaling in between)
        exact = [n for n in cands if scales[n] == 1.0]
        norm_name = min(exact or cands, key=lambda n: n.count(".")) if cands else ""
    if norm_name and rel_err(rec.inp.get(norm_name, z_last.new_empty(0)), z_last) > tol:
        raise UnsupportedModelError(f"the final norm {norm_name} does not read the last block")
    if not norm_name and rel_err(rec.inp[u_name], z_last) > tol:
        raise UnsupportedModelError(
            f"between the last block {blocks[-1]} and the unembedding {u_name} there is no "
            "single module mapping the one's output to the other's input"
        )
    found: list[tuple[str, float]] = []
    try:
        pairs = [_find_pair(b, rec, declare, config) for b in blocks]
    except UnsupportedModelError as err:
        if declare is not None:
            raise
        found = find_mixers(blocks, rec, config, err)  # one-part blocks, or both reasons
    norm = fit_final_norm(
        mods[norm_name] if norm_name else None, norm_name, rec.inp.get(norm_name, z_last), config
    )
    readout = fit_readout(unembed, rec.inp[u_name], rec.out[u_name], rec.logits, config)
    if norm_name:
        readout.input_scale = input_scale(rec.out[norm_name], rec.inp[u_name], tol) or 1.0
    family = str(getattr(config, "model_type", None) or type(model).__name__)
    if found:
        return Decomposition(
            model, family, [mods[b] for b in blocks], blocks, [], [], [], [], [], [], False,
            norm, readout, shape[-1], weight.shape[0], 0, None, NO_HEADS, False,
            mixer=[mods[n] for n, _ in found], mixer_names=[n for n, _ in found],
            gamma=[g for _, g in found],
        )  # fmt: skip
    attn_first, parallel = measure_roles(model, blocks, pairs, tokens)
    if declare is not None and not all(attn_first):
        bad = blocks[attn_first.index(False)]
        raise UnsupportedModelError(
            f"block {bad}: the declared attn {declare.attn!r} does not read earlier positions "
            f"but the declared mlp {declare.mlp!r} does"
        )
    ordered = [p if a else (p[1], p[0], p[3], p[2]) for p, a in zip(pairs, attn_first, strict=True)]
    n_heads = _n_heads(config, declare)
    o_projs: list[nn.Module] | None = []
    post_norms: list[Any] | None = []
    refusal = None
    for block, (a_name, m_name, *_) in zip(blocks, ordered, strict=True):
        if declare is not None and declare.o_proj:
            cands = [f"{block}.{declare.o_proj}"]
        else:
            cands = [
                n
                for n in rec.calls
                if n.startswith(block + ".") and n != m_name and not n.startswith(m_name + ".")
            ]
        name, why = find_o_proj(mods, cands, rec.inp, rec.out, rec.out[a_name], n_heads)
        post = None
        if name is None and _is_norm(mods[a_name], rec, a_name):
            # a norm after the attention: the projection whose output is the norm's input
            name, why_o = find_o_proj(mods, cands, rec.inp, rec.out, rec.inp[a_name], n_heads)
            if name is not None:
                post, why = find_post_norm(mods[a_name], a_name, rec.inp[a_name], config)
                name = name if post is not None else None
            elif "no nn.Linear" not in why_o:
                why = why_o
        if name is None:
            refusal, o_projs, post_norms = f"block {block}: {why}", None, None
            break
        o_projs.append(mods[name])
        post_norms.append(post)
    if post_norms is not None and all(n is None for n in post_norms):
        post_norms = None
    a_mods = [mods[p[0]] for p in ordered]
    # a norm after the sublayer: the attention part is a module with a gain [d] and no linear map
    post_norm_parts = any(_is_norm(m) for m in a_mods)
    return Decomposition(
        model=model,
        family=family,
        blocks=[mods[b] for b in blocks],
        block_names=blocks,
        attn=a_mods,
        mlp=[mods[p[1]] for p in ordered],
        attn_names=[p[0] for p in ordered],
        mlp_names=[p[1] for p in ordered],
        alpha=[p[2] for p in ordered],
        beta=[p[3] for p in ordered],
        parallel_residual=parallel,
        final_norm=norm,
        readout=readout,
        d_model=shape[-1],
        vocab_size=weight.shape[0],
        n_heads=n_heads,
        o_proj=o_projs,
        head_refusal=refusal,
        sublayer_norms=post_norm_parts,
        post_norms=post_norms,
    )
