"""Any decoder as a residual stream of sites: the adapter over a discovered decomposition.

:class:`GenericAdapter` wraps a model whose parts :func:`causalnet.adapters.discover.discover`
found (or a :class:`~causalnet.adapters.discover.Declaration` named), verifies the
decomposition on a probe (:func:`causalnet.adapters.verify.verify`) before anything is read out,
and runs everything through the model's OWN forward with hooks on the found modules:

- site values: ``embed`` = the first block's input; ``attn.l`` = alpha_l * (the attention
  part's output); ``mlp.l`` = beta_l * (the MLP part's output); ``attn.l.hH`` = alpha_l * head
  H's term of the output projection (:mod:`causalnet.adapters.heads`), or under a norm after
  the attention its share of attn.l at the run's own post-norm scale; in a model of one-part
  blocks (Mamba) ``mixer.l`` = gamma_l * (the mixer's output) (:mod:`causalnet.adapters.
  onepart`);
- do(site = v) at position t replaces that output at t (by v / alpha_l); a head's term is
  replaced inside the output projection's output;
- readouts at each run's own frozen final scale (docs/conventions.md, "Which sigma") with the
  readout direction of :mod:`causalnet.adapters.norms`; the centred logit is the model's own
  (before any soft-cap), from the unembedding's output.

The hooked forward is :mod:`causalnet.adapters.trace`. Patching replays the model's own blocks
at the final position only, against the clean run's own cache, all rows in one batch that grows
as the layers go up (:mod:`causalnet.adapters.fastpatch`, :mod:`causalnet.adapters.replay`);
before use it is checked against the hooked re-forward of the whole prompt on a probe, and where
it cannot be used (``fast_refusal`` says why) patching is that re-forward
(:func:`causalnet.adapters.trace.reforward_patch`). A model of one-part recurrent blocks is
replayed at t from its own conv / SSM states instead (:mod:`causalnet.adapters.recurrent`),
checked the same way. The hooks are global to the modules, so one adapter runs one forward at a
time (a lock).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor, nn

from causalnet.errors import (
    InterventionError,
    ModelError,
)
from causalnet.sites import Site

from .contract import Architecture, HookPoints, ResidualAdapter
from .discover import Declaration, Decomposition, discover
from .fastpatch import check_fast, fast_patch
from .finalrows import low_precision_ops, probe_tolerance, settle_cache
from .frozencache import prefix_caches, remember_prefix
from .linears import fast_linears
from .measure import probe_tokens
from .readout import accumulation_dtype
from .records import CleanRun, Granularity, PatchedRun, check_granularity
from .recurrent import check_recurrent, recurrent_patch
from .timestep import ClampBinds
from .trace import Trace, centred_logit, record, reforward_patch, site_values


class GenericAdapter(ResidualAdapter):
    """A decoder seen as sites through its discovered, verified decomposition (module doc)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        declare: Declaration | None = None,
        parts: Decomposition | None = None,
    ) -> None:
        from .verify import verify  # noqa: PLC0415 (verify reads adapters; no import circle)

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.parts = parts if parts is not None else discover(model, declare)
        p = self.parts
        self.head_refusal: str | None = p.head_refusal
        self.arch = Architecture(
            family=p.family,
            n_layers=p.n_layers,
            n_heads=p.n_heads,
            n_kv_heads=p.n_heads,
            d_model=p.d_model,
            d_head=p.d_model // p.n_heads if p.n_heads else 0,
            vocab_size=p.vocab_size,
            parallel_residual=p.parallel_residual,
            norm="layer" if p.final_norm.form == "layer" else "rms",
            sublayer_norms=p.sublayer_norms,
            mixer_blocks=p.one_part,
        )
        self._lock = threading.RLock()
        #: why the model's cached forwards get a plain cache (:mod:`causalnet.adapters.fullcache`:
        #: its own decodes off its full forward), or None where its own cache is used
        self.cache_note = settle_cache(
            model, probe_tokens(model, p.vocab_size)[0], probe_tolerance(self.dtype)
        )
        self.verification = verify(self)
        self._fast: tuple[str | None, float | None] | None = None
        self._rows_per_forward: int | None = None  # 1 where the numbers depend on the batch
        #: patch calls that fell back to the re-forward because a row's time step fell where
        #: the scan clamps it and the replayed step would not (:mod:`causalnet.adapters.timestep`)
        self.clamp_fallbacks = 0

    # ---- fast patching, checked before its first use -------------------------------------
    @property
    def fast_refusal(self) -> str | None:
        """Why patching falls back to hooked re-forwards of the whole prompt, or None: patches
        replay the model's blocks at the final position (:mod:`causalnet.adapters.fastpatch`).
        Decided once, at the first use, by :func:`causalnet.adapters.fastpatch.check_fast` on
        the probe (every site patched, fast vs re-forward). A float64 model that computes products
        or elementwise transcendental functions in float32 (an MoE router:
        :func:`causalnet.adapters.finalrows.low_precision_ops`) is patched one row per forward,
        as the one-forward-per-patch oracle computes it: their rounding depends on the batch,
        and batched rows were up to 6.2e-8 off."""
        return self._fast_check()[0]

    @property
    def fast_error(self) -> float | None:
        """The largest disagreement of the fast path with the re-forward on the probe (relative
        to max(1, |centred logit|)); None where the fast path failed to run."""
        return self._fast_check()[1]

    def _fast_check(self) -> tuple[str | None, float | None]:
        with self._lock:
            if self._fast is None:
                probe = probe_tokens(self.model, self.parts.vocab_size)[0]
                f64 = self.dtype == torch.float64
                low = low_precision_ops(self.model, probe) if f64 else []
                if low:
                    self._rows_per_forward = 1
                    self._fast = (
                        f"this float64 model computes in lower precision operations whose "
                        f"rounding depends on how many rows are batched ({', '.join(low[:3])}; "
                        "e.g. an MoE router): every patch row is a forward of its own, as the "
                        "one-forward-per-patch oracle computes it",
                        None,
                    )
                else:
                    check = check_recurrent if self.parts.one_part else check_fast
                    self._fast = check(self, probe)
            return self._fast

    # ---- what the base and the oracle need ------------------------------------------------
    def _check_granularity(self, granularity: str) -> None:
        """'layer' or 'head'; heads wherever discovery found them (shares under a norm after
        the attention: :mod:`causalnet.adapters.heads`), else the reason it did not."""
        check_granularity(granularity)
        if granularity == "head" and self.head_refusal is not None:
            raise ModelError(
                f"granularity='head' is not available for this {self.arch.family} model: "
                f"{self.head_refusal}; use granularity='layer'"
            )

    def readout(self, token: int) -> tuple[Tensor, float]:
        """Centred readout direction w_i [d] and constant const_i (Eqs 9, 24-28)."""
        return self.parts.readout.direction(self.parts.final_norm, token)

    def final_scale(self, resid: Tensor) -> Tensor:
        """The final norm's scale sigma as the model computes it: [..., d] -> [...]."""
        return self.parts.final_norm.scale(resid)

    def hook_points(self, layer: int) -> HookPoints:
        p = self.parts
        if p.mixer is not None:  # one-part blocks: the oracle hooks the mixer only
            mixer = p.mixer[layer]
            return HookPoints(p.blocks[layer], mixer, mixer, mixer, mixer)
        o_proj = p.o_proj[layer] if p.o_proj is not None else p.attn[layer]
        return HookPoints(p.blocks[layer], p.attn[layer], p.mlp[layer], o_proj)

    def final_norm_module(self) -> nn.Module:
        if self.parts.final_norm.module is None:
            raise ModelError(f"this {self.arch.family} model has no final norm")
        return self.parts.final_norm.module

    # ---- the hooked forward -----------------------------------------------------------------
    def record(
        self,
        tokens: Tensor,
        at: Tensor | None = None,
        patches: list[tuple[Site, Tensor, Tensor]] | None = None,
        heads: bool = False,
        last_only: bool = False,
        keep_cache: bool = False,
    ) -> Trace:
        """The model's hooked forward on ``tokens`` [B, T] (:func:`causalnet.adapters.trace.
        record`): every site at the positions ``at`` [B] (None: all), with do(site = value)
        for every ``(site, rows, values [n, d])`` of ``patches`` at the positions ``at[rows]``."""
        with self._lock:
            return record(self, tokens, at, patches, heads, last_only, keep_cache)

    # ---- the sweep's interface --------------------------------------------------------------
    def clean_runs(
        self,
        prompts: list[Tensor | str],
        granularity: Granularity = "layer",
        positions: list[int] | None = None,
    ) -> list[CleanRun]:
        """One :class:`CleanRun` per prompt (see :meth:`TransformerAdapter.clean_runs`), the
        prompts cut at their positions and right-padded into one hooked forward."""
        self._check_granularity(granularity)
        padded, toks, ts = self.pad_prompts(prompts, positions)
        at = torch.tensor(ts, device=self.device)
        # the model's own cache of each prompt's earlier positions is kept for fast patching
        # (cut from the padded forward's: frozencache.prefix_caches)
        single = len(toks) == 1
        # under the lock: the kernels are swapped into the modules for this forward only
        with self._lock, fast_linears(self.parts.blocks):
            tr = self.record(
                padded,
                at=at,
                heads=self.parts.o_proj is not None,
                last_only=single,
                keep_cache=True,
            )
        values = site_values(tr, self.arch.n_layers, granularity)
        sigmas = self.final_scale(tr.final)
        acc = accumulation_dtype(self.dtype)
        n_l, d = self.arch.n_layers, self.arch.d_model
        out = []
        for b, (tokens, t) in enumerate(zip(toks, ts, strict=True)):
            target = int(torch.argmax(tr.logits[b]))
            w, const = self.readout(target)
            pre = torch.stack([x[b] for x in tr.pre])
            mixer = None if tr.mixer is None else torch.stack([x[b] for x in tr.mixer])
            attn = None if mixer is not None else torch.stack([a[b] for a in tr.attn])
            mlp = None if mixer is not None else torch.stack([m[b] for m in tr.mlp])
            heads = (
                torch.stack([h[b] for h in tr.heads])
                if tr.heads is not None
                else pre.new_zeros(n_l, 0, d)
            )
            out.append(
                CleanRun(
                    tokens=tokens,
                    position=t,
                    granularity=granularity,
                    readout_sites=self.readout_sites(granularity),
                    target=target,
                    logits=tr.logits[b],
                    sigma=float(sigmas[b]),
                    readout_dir=w,
                    readout_const=float(const),
                    site_values=values[b],
                    direct_effects=values[b].to(acc) @ w / sigmas[b],
                    centred_logit=float(centred_logit(self, tr, target)[b]),
                    _resid_pre=pre,
                    _resid_mid=pre if self.arch.parallel_residual or attn is None else pre + attn,
                    _attn=attn,
                    _heads=heads,
                    _mlp=mlp,
                    _mixer=mixer,
                )
            )
        for run, kept in zip(out, prefix_caches(tr.cache, ts), strict=True):
            remember_prefix(run, kept)
        return out

    def final_values(
        self, prompts: list[Tensor], granularity: Granularity = "layer", batch_tokens: int = 1024
    ) -> Tensor:
        """Every readout site's value at each prompt's last token: [n_prompts, R, d], prompts
        sorted by length and right-padded in batches of at most ``batch_tokens`` tokens."""
        self._check_granularity(granularity)
        n_r = len(self.readout_sites(granularity))
        out = torch.empty(
            len(prompts), n_r, self.arch.d_model, dtype=self.dtype, device=self.device
        )
        for batch, padded, last in self.length_batches(prompts, batch_tokens):
            tr = self.record(padded, at=last, heads=granularity == "head")
            out[torch.tensor(batch, device=self.device)] = site_values(
                tr, self.arch.n_layers, granularity
            )
        return out

    def patch(self, clean: CleanRun, sites: list[str], values: Tensor) -> PatchedRun:
        """do(site_s = values[s, p]) at the clean run's position t for every (s, p): a batched
        hooked re-forward of the prompt, each row read out at its own final scale (Eq 13), its
        centred logit the model's own and its total effect against the clean run (Eq 12).
        Sets of sites (``a+b``, ``values`` one entry per member) go through the hooked
        re-forward with every member patched (:meth:`ResidualAdapter.unit`)."""
        groups, names = self.patch_units(clean, sites)
        if clean.readout_sites != self.readout_sites(clean.granularity) or (
            clean.site_values.shape[-1] != self.arch.d_model
        ):
            raise InterventionError("this CleanRun was made by a different model")
        values = self.patch_values(sites, groups, values)
        if clean.granularity == "head" and any(m.kind == "attn" for g in groups for m in g):
            raise InterventionError(
                "cannot patch a whole attention layer in a head-granularity clean run: its heads "
                "would have no values to read out; patch its heads or use granularity='layer'"
            )
        has_sets = len(names) != len(groups)
        post = self.parts.post_norms or [None] * self.arch.n_layers
        in_sets = [
            m.name
            for g in groups
            if len(g) > 1
            for m in g
            if m.kind == "head" and post[m.layer] is not None
        ]
        if in_sets:
            raise InterventionError(
                f"sets of heads ({in_sets[0]!r}) are not patched in this {self.arch.family} "
                "model: a head's patch goes through the norm after the attention one head at a "
                "time; patch single heads, or whole layers together ('attn.L+attn.M')"
            )
        with self._lock, torch.no_grad():
            # sets of sites: the hooked re-forward patches every member (the fast replay
            # path takes single sites only)
            if self.fast_refusal is None and not has_sets:
                fast = recurrent_patch if self.parts.one_part else fast_patch
                try:
                    return fast(self, clean, [g[0] for g in groups], values)
                except ClampBinds:  # a row the scan would clamp and the step would not
                    self.clamp_fallbacks += 1
            return reforward_patch(self, clean, groups, values, self._rows_per_forward)
