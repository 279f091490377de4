"""Any decoder as a residual stream of sites: the adapter over a discovered decomposition.

:class:`GenericAdapter` wraps a model whose parts :func:`causalnet.adapters.discover.discover`
found (or a :class:`~causalnet.adapters.discover.Declaration` named), verifies the
decomposition on a probe (:func:`causalnet.adapters.verify.verify`) before anything is read out,
and runs everything through the model's OWN forward with hooks on the found modules:

- site values: ``embed`` = the first block's input; ``attn.l`` = alpha_l * (the attention
  part's output); ``mlp.l`` = beta_l * (the MLP part's output); ``attn.l.hH`` = alpha_l * head
  H's term of the output projection (:mod:`causalnet.adapters.heads`);
- do(site = v) at position t replaces that output at t (by v / alpha_l); a head's term is
  replaced inside the output projection's output;
- readouts at each run's own frozen final scale (docs/conventions.md, "Which sigma") with the
  readout direction of :mod:`causalnet.adapters.norms`; the centred logit is the model's own
  (before any soft-cap), from the unembedding's output.

Patching is a batched hooked re-forward of the prompt (rows of every site and patch in one
batch, chunked), not the fast final-position engine of the hand-written families. The hooks are
global to the modules, so one adapter runs one forward at a time (a lock).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from causalnet.errors import (
    ContextError,
    InterventionError,
    ModelError,
    NonFiniteError,
    ShapeError,
)
from causalnet.sites import Site

from .base import (
    Architecture,
    CleanRun,
    Granularity,
    HookPoints,
    PatchedRun,
    ResidualAdapter,
    accumulation_dtype,
)
from .discover import Declaration, Decomposition, discover
from .heads import head_terms
from .hooks import HookSet, call_model, first, hidden_in, with_first, with_hidden_in

ROW_BUDGET = 1 << 25  # rows * tokens * d of one patch forward


@dataclass
class Trace:
    """One hooked forward, every value at the chosen positions ([B, ...] with ``at``, else
    [B, T, ...]). ``attn``/``mlp``/``pre`` hold one entry per layer; ``heads`` [.., H, d]."""

    embed: Tensor
    pre: list[Tensor]
    attn: list[Tensor]
    mlp: list[Tensor]
    heads: list[Tensor] | None
    final: Tensor
    unembedded: Tensor
    logits: Tensor


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
        )
        self._lock = threading.RLock()
        self.verification = verify(self)

    # ---- what the base and the oracle need ------------------------------------------------
    def _check_granularity(self, granularity: str) -> None:
        super()._check_granularity(granularity)
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
    ) -> Trace:
        """Run the model on ``tokens`` [B, T] with do(site = value) for every ``(site, rows,
        values [n, d])`` of ``patches`` at the positions ``at[rows]``, recording every site at
        the positions ``at`` [B] (None: all positions)."""
        p = self.parts
        n_b, n_t = tokens.shape
        rows_all = torch.arange(n_b, device=tokens.device)
        by: dict[tuple[str, int], list[tuple[Site, Tensor, Tensor]]] = {}
        for site, rows, vals in patches or []:
            kind = "o_proj" if site.kind == "head" else site.kind
            by.setdefault((kind, site.layer), []).append((site, rows, vals))

        def pick(x: Tensor) -> Tensor:
            if at is None:
                return x
            if x.shape[1] == n_t:
                return x[rows_all, at]
            return x[:, -1]  # logits of the last position only

        rec: dict[str, Any] = {"pre": [None] * p.n_layers, "z": [None] * p.n_layers}
        rec.update(attn=[None] * p.n_layers, mlp=[None] * p.n_layers)

        def put(x: Tensor, key: tuple[str, int], scale: float) -> Tensor:
            entries = by.get(key)
            if not entries:
                return x
            x = x.clone()
            for _, rows, vals in entries:
                x[rows, at[rows]] = (vals / scale).to(x.dtype)
            return x

        def block_pre(layer: int) -> Any:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
                x = hidden_in(args, kwargs)
                if layer == 0 and ("embed", -1) in by:
                    x = put(x, ("embed", -1), 1.0)
                    args, kwargs = with_hidden_in(args, kwargs, x)
                rec["pre"][layer] = pick(x).clone()
                return args, kwargs

            return hook

        def part(kind: str, layer: int, scale: float) -> Any:
            def hook(module: nn.Module, args: tuple, output: Any) -> Any:
                y = put(first(output), (kind, layer), scale)
                rec[kind][layer] = pick(y) * scale
                return with_first(output, y)

            return hook

        def o_pre(layer: int) -> Any:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                rec["z"][layer] = pick(hidden_in(args, kwargs)).clone()

            return hook

        def o_patch(layer: int, scale: float) -> Any:
            def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
                out = output.clone()
                for site, rows, vals in by[("o_proj", layer)]:
                    z = args[0][rows, at[rows]]
                    own = head_terms(module, z, self.arch.n_heads)[:, site.head]
                    out[rows, at[rows]] += (vals / scale).to(out.dtype) - own
                return out

            return hook

        def final_pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            rec["final"] = pick(hidden_in(args, kwargs)).clone()

        def unembed_post(module: nn.Module, args: tuple, out: Any) -> None:
            rec["unembedded"] = pick(first(out)).clone()

        with self._lock, HookSet() as hooks, torch.no_grad():
            for layer in range(p.n_layers):
                alpha = p.alpha[layer]
                hooks.pre(p.blocks[layer], f"block.{layer}", block_pre(layer))
                if p.o_proj is not None and (heads or ("o_proj", layer) in by):
                    hooks.pre(p.o_proj[layer], f"o_proj.{layer}", o_pre(layer))
                    if ("o_proj", layer) in by:
                        hooks.post(
                            p.o_proj[layer], f"patch.{layer}", o_patch(layer, p.alpha[layer])
                        )
                hooks.post(p.attn[layer], f"attn.{layer}", part("attn", layer, alpha))
                hooks.post(p.mlp[layer], f"mlp.{layer}", part("mlp", layer, p.beta[layer]))
            final = p.final_norm.module
            hooks.pre(p.readout.unembed if final is None else final, "final", final_pre)
            hooks.post(p.readout.unembed, "unembed", unembed_post)
            logits = call_model(self.model, tokens, last_only=last_only)
            hooks.check()
            head_vals = None
            if p.o_proj is not None and (heads or any(k[0] == "o_proj" for k in by)):
                head_vals = [
                    head_terms(p.o_proj[lay], rec["z"][lay], p.n_heads) * p.alpha[lay]
                    for lay in range(p.n_layers)
                ]
                for (kind, lay), entries in by.items():
                    if kind != "o_proj":
                        continue
                    for site, rows, _ in entries:  # read the patched head back
                        others = head_vals[lay][rows].sum(-2) - head_vals[lay][rows, site.head]
                        head_vals[lay][rows, site.head] = rec["attn"][lay][rows] - others
        return Trace(
            embed=rec["pre"][0],
            pre=rec["pre"],
            attn=rec["attn"],
            mlp=rec["mlp"],
            heads=head_vals,
            final=rec["final"],
            unembedded=rec["unembedded"],
            logits=pick(logits),
        )

    def _values(self, tr: Trace, granularity: Granularity) -> Tensor:
        """The readout sites' values [B, R, d] of a trace taken at one position per row."""
        cols = [tr.embed]
        for layer in range(self.arch.n_layers):
            if granularity == "head":
                assert tr.heads is not None
                cols += list(tr.heads[layer].unbind(-2))
            else:
                cols.append(tr.attn[layer])
            cols.append(tr.mlp[layer])
        return torch.stack(cols, dim=1)

    def _centred(self, tr: Trace, token: int) -> Tensor:
        pi = self.parts.readout.logit_scale * tr.unembedded.to(accumulation_dtype(self.dtype))
        return pi[..., token] - pi.mean(-1)

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
        positions = [-1] * len(prompts) if positions is None else positions
        if len(positions) != len(prompts) or not prompts:
            raise ShapeError(
                f"clean_runs needs one position per prompt and at least one prompt, got "
                f"{len(prompts)} prompts and {len(positions)} positions"
            )
        toks, ts = [], []
        for tokens, position in zip(prompts, positions, strict=True):
            tokens = self._check_tokens(
                self.encode(tokens) if isinstance(tokens, str) else tokens, 1
            )
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
        at = torch.tensor(ts, device=self.device)
        tr = self.record(padded, at=at, heads=self.parts.o_proj is not None)
        values = self._values(tr, granularity)
        sigmas = self.final_scale(tr.final)
        acc = accumulation_dtype(self.dtype)
        n_l, d = self.arch.n_layers, self.arch.d_model
        out = []
        for b, (tokens, t) in enumerate(zip(toks, ts, strict=True)):
            target = int(torch.argmax(tr.logits[b]))
            w, const = self.readout(target)
            attn = torch.stack([a[b] for a in tr.attn])
            mlp = torch.stack([m[b] for m in tr.mlp])
            pre = torch.stack([x[b] for x in tr.pre])
            heads = (
                torch.stack([h[b] for h in tr.heads])
                if tr.heads is not None
                else attn.new_zeros(n_l, 0, d)
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
                    centred_logit=float(self._centred(tr, target)[b]),
                    _resid_pre=pre,
                    _resid_mid=pre if self.arch.parallel_residual else pre + attn,
                    _attn=attn,
                    _heads=heads,
                    _mlp=mlp,
                )
            )
        return out

    def final_values(
        self, prompts: list[Tensor], granularity: Granularity = "layer", batch_tokens: int = 1024
    ) -> Tensor:
        """Every readout site's value at each prompt's last token: [n_prompts, R, d], prompts
        sorted by length and right-padded in batches of at most ``batch_tokens`` tokens."""
        self._check_granularity(granularity)
        toks = [self._check_tokens(p, ndim=1) for p in prompts]
        n_r = len(self.readout_sites(granularity))
        out = torch.empty(len(toks), n_r, self.arch.d_model, dtype=self.dtype, device=self.device)
        order = sorted(range(len(toks)), key=lambda i: len(toks[i]))
        start = 0
        while start < len(order):
            stop = start + 1
            while stop < len(order) and (stop - start + 1) * len(toks[order[stop]]) <= batch_tokens:
                stop += 1
            batch = order[start:stop]
            padded = torch.zeros(len(batch), len(toks[batch[-1]]), dtype=torch.long)
            padded = padded.to(self.device)
            for row, i in enumerate(batch):
                padded[row, : len(toks[i])] = toks[i]
            last = torch.tensor([len(toks[i]) - 1 for i in batch], device=self.device)
            tr = self.record(padded, at=last, heads=granularity == "head")
            out[torch.tensor(batch, device=self.device)] = self._values(tr, granularity)
            start = stop
        return out

    def patch(self, clean: CleanRun, sites: list[str], values: Tensor) -> PatchedRun:
        """do(site_s = values[s, p]) at the clean run's position t for every (s, p): a batched
        hooked re-forward of the prompt, each row read out at its own final scale (Eq 13), its
        centred logit the model's own and its total effect against the clean run (Eq 12)."""
        if not isinstance(clean, CleanRun):
            raise InterventionError(f"patch needs a CleanRun from clean_run(), got {type(clean)}")
        if isinstance(sites, str):
            raise ShapeError(f"sites must be a list of site names, got the string {sites!r}")
        parsed = [self.site(s) for s in sites]
        d = self.arch.d_model
        if clean.readout_sites != self.readout_sites(clean.granularity) or (
            clean.site_values.shape[-1] != d
        ):
            raise InterventionError("this CleanRun was made by a different model")
        values = torch.as_tensor(values)
        n_s = len(parsed)
        if n_s == 0 or values.ndim != 3 or values.shape[0] != n_s or values.shape[2] != d:
            raise ShapeError(
                f"values must have shape [n_sites={n_s}, n_patches, d={d}] for sites "
                f"{list(sites)[:4]}{'...' if n_s > 4 else ''}, got {tuple(values.shape)}"
            )
        n_p = values.shape[1]
        if n_p == 0:
            raise ShapeError(f"values for sites {list(sites)[:4]} have no patches")
        values = values.to(device=self.device, dtype=self.dtype)
        finite = torch.isfinite(values).all(dim=(1, 2))
        if not bool(finite.all()):
            raise NonFiniteError(
                f"the values for site {sites[int((~finite).nonzero()[0])]!r} contain NaN or inf"
            )
        if clean.granularity == "head" and any(s.kind == "attn" for s in parsed):
            raise InterventionError(
                "cannot patch a whole attention layer in a head-granularity clean run: its heads "
                "would have no values to read out; patch its heads or use granularity='layer'"
            )
        t = clean.position
        prompt = clean.tokens[: t + 1].to(self.device)
        flat = values.reshape(n_s * n_p, d)
        chunk = max(1, ROW_BUDGET // ((t + 1) * d * 8))
        w, acc = clean.readout_dir, accumulation_dtype(self.dtype)
        direct, sigma, centred = [], [], []
        for start in range(0, n_s * n_p, chunk):
            rows = torch.arange(start, min(start + chunk, n_s * n_p), device=self.device)
            patches = []
            for s_i, site in enumerate(parsed):
                mine = rows[(rows // n_p) == s_i]
                if len(mine):
                    patches.append((site, mine - start, flat[mine]))
            tokens = prompt[None].expand(len(rows), -1)
            at = torch.full((len(rows),), t, device=self.device)
            head = clean.granularity == "head"
            tr = self.record(tokens, at=at, patches=patches, heads=head, last_only=True)
            s = self.final_scale(tr.final)
            direct.append(self._values(tr, clean.granularity).to(acc) @ w / s[:, None])
            sigma.append(s)
            centred.append(self._centred(tr, clean.target))
        cent = torch.cat(centred).view(n_s, n_p)
        return PatchedRun(
            sites=[s.name for s in parsed],
            readout_sites=list(clean.readout_sites),
            direct_effects=torch.cat(direct).view(n_s, n_p, -1),
            sigma=torch.cat(sigma).view(n_s, n_p),
            centred_logit=cent,
            total_effect=cent - clean.centred_logit,
        )
