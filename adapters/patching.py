"""The patch engine of the hand-written families: do(site = value) at the clean run's position
for many (site, patch) rows at once, exact and fast (Eqs 11-13).

An intervention at position t in layer l changes nothing at the positions before t and nothing
below l, so :func:`patch` recomputes position t only, from each site's layer upward, against the
clean run's cached keys/values of the earlier positions. :func:`patch_rows` sorts the rows by
entry layer, so the rows running at layer l are a contiguous prefix that grows with l and every
block method runs once per layer on that whole prefix; each row is read out at its own final
scale (``docs/conventions.md``, "Which sigma"), and the vocabulary projection is never computed
(the readout is linear). :class:`FinalStep` is one decoder layer at t for N rows, from the block
methods; a family may return a faster subclass from ``_final_step`` (Llama:
:class:`causalnet.adapters.llama.LlamaFinalStep`) that computes the same numbers.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from causalnet.errors import InterventionError
from causalnet.sites import Site

from .readout import accumulation_dtype
from .records import CleanRun, PatchedRun

if TYPE_CHECKING:
    from .base import TransformerAdapter


def patch(
    adapter: TransformerAdapter, clean: CleanRun, sites: list[str], values: Tensor
) -> PatchedRun:
    """do(site_s = values[s, p]) at the clean run's position t, for every (s, p) at once.

    values [S, P, d] -> :class:`PatchedRun` with, per row, every readout site's direct effect
    (c . w_i) / sigma at that run's own sigma (Eq 13), the centred target logit from the
    patched final residual, and the total effect against the clean run (Eq 12).
    ``attn.l.hH = v`` replaces that head's contribution only: attn.l becomes
    clean attn.l - clean head + v. Patching a whole ``attn.l`` is refused for a
    head-granularity clean run (its heads would have no values to read out).

    A set of sites ``a+b`` (:meth:`~causalnet.adapters.contract.ResidualAdapter.unit`) is one
    row per patch with all its members patched; ``values`` then holds one entry per member
    site, the sites' members flattened in order (``[n_members, P, d]``; a plain site is one
    member). Its row enters at its earliest member's layer and each later member's patch is
    applied when the row passes that member's layer.

    How it is fast (and still exact): an intervention at t in layer l changes nothing at
    positions before t and nothing below l, so only position t is recomputed, from the
    site's layer upward, against the clean run's cached keys/values of the earlier
    positions. Rows are sorted by entry layer, so the rows active at layer l are a
    contiguous prefix that grows with l, and every block method runs once per layer on
    that whole prefix. The vocabulary projection is never computed: the readout is linear.
    """
    groups, _ = adapter.patch_units(clean, sites)
    d, n_layers = adapter.arch.d_model, adapter.arch.n_layers
    if len(clean._k) != n_layers or clean.site_values.shape[-1] != d:
        raise InterventionError("this CleanRun was made by a different model")
    values = adapter.patch_values(sites, groups, values)
    head_gran = clean.granularity == "head"
    if head_gran:
        for s in (m for g in groups for m in g):
            if s.kind == "attn":
                raise InterventionError(
                    f"cannot patch the whole layer {s.name!r} in a head-granularity clean "
                    "run: its heads would have no values to read out; patch its heads "
                    f"('{s.name}.h0', ...) or use a clean run with granularity='layer'"
                )
    with torch.no_grad():
        return patch_rows(adapter, clean, groups, values, head_gran)


def patch_rows(
    adapter: TransformerAdapter,
    clean: CleanRun,
    parsed: list[Site] | list[tuple[Site, ...]],
    values: Tensor,
    head_gran: bool,
) -> PatchedRun:
    """The layer-synchronous engine behind :func:`patch` (see its docstring), on checked input.

    Rows (site s, patch p) are sorted by entry key e(s) = -1 (embed), 2l (attn.l or its
    heads), 2l + 1 (mlp.l). At layer l the rows with e < 2l are running: their attention at
    t is recomputed (:class:`FinalStep`); the rows with e = 2l enter with their patched
    attention output; all rows with e <= 2l then run the MLP (sequential residual), and the
    rows with e = 2l + 1 enter with their patched MLP output. ``num[r, j]`` accumulates
    c_j . w_i, the numerator of readout site j's direct effect in row r; it starts at the
    clean values (sites below a row's entry are unchanged) and is divided by each row's own
    sigma at the end.

    ``parsed`` may hold tuples of member sites (sets, in residual order; ``values`` then has
    one entry per member, flattened): a set's row enters with its first member, and each later
    member overrides the row's attention / head / MLP output when the row reaches it.
    """
    assert clean._resid_pre is not None and clean._resid_mid is not None
    assert clean._attn is not None and clean._heads is not None and clean._mlp is not None
    groups = [g if isinstance(g, tuple) else (g,) for g in parsed]
    n_sites, (_, n_patch, d) = len(groups), values.shape
    n_rows = n_sites * n_patch
    n_heads = adapter.arch.n_heads
    dev = values.device
    col = {name: j for j, name in enumerate(clean.readout_sites)}
    w = clean.readout_dir
    acc = accumulation_dtype(values.dtype)
    w_acc = w.to(acc)

    def dot(x: Tensor) -> Tensor:  # c . w_i, accumulated in float32 (float64 for float64)
        return x.to(acc) @ w_acc

    # Entry key: embed -1; attention site of layer l: 2l; MLP site of layer l: 2l + 1.
    def entry(s: Site) -> int:
        return -1 if s.kind == "embed" else 2 * s.layer + (s.kind == "mlp")

    keys = [entry(g[0]) for g in groups]
    order = sorted(range(n_sites), key=keys.__getitem__)
    sorted_keys = [keys[i] for i in order]
    order_t = torch.tensor(order, device=dev)
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + len(g))
    first_t = torch.tensor([offsets[i] for i in order], device=dev)
    vals = values[first_t].reshape(n_rows, d)
    row_head = torch.tensor([groups[i][0].head for i in order], device=dev)
    row_head = row_head.repeat_interleave(n_patch)
    # later members of sets: stage key -> [(first row, member, values [P, d])]
    later: dict[int, list[tuple[int, Site, Tensor]]] = {}
    for pos, i in enumerate(order):
        for j, member in enumerate(groups[i][1:], start=1):
            later.setdefault(entry(member), []).append(
                (pos * n_patch, member, values[offsets[i] + j])
            )

    def bound(k: int) -> int:  # number of rows whose entry key is < k
        return bisect.bisect_left(sorted_keys, k) * n_patch

    num = dot(clean.site_values).expand(n_rows, -1).clone()  # c . w_i per row and readout
    vals_w = dot(vals)
    z = torch.empty(n_rows, d, dtype=values.dtype, device=dev)
    n_embed = bound(0)
    z[:n_embed] = vals[:n_embed]
    num[:n_embed, col["embed"]] = vals_w[:n_embed]
    parallel = adapter.arch.parallel_residual
    step = adapter._final_step(clean)
    for layer in range(adapter.arch.n_layers):
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
        # 2b. later members of sets at this layer's attention (the rows are all below a_end).
        for r0, member, v in later.get(2 * layer, []):
            r1 = r0 + n_patch
            running = r0 < run
            target = a_run[r0:r1] if running else a_ent[r0 - run : r1 - run]  # type: ignore[index]
            if member.kind == "attn":
                target.copy_(v)
            else:
                if running:
                    zh = step.heads(layer, z[r0:r1])
                    own = adapter.head_outputs(layer, zh)[:, member.head]
                else:
                    own = clean._heads[layer, member.head]
                target += v - own
            if head_gran:
                num[r0:r1, hcol + member.head] = dot(v)
            else:
                num[r0:r1, acol] = dot(target)
        mlp_later = later.get(2 * layer + 1, [])
        if not parallel:
            if a_run is not None:
                z[:run] += a_run
            if a_ent is not None:
                torch.add(pre, a_ent, out=z[run:a_end])
            if a_end > 0:
                m = step.mlp(layer, z[:a_end])
                for r0, _, v in mlp_later:  # later members of sets at this MLP
                    m[r0 : r0 + n_patch] = v
                num[:a_end, mcol] = dot(m)
                z[:a_end] += m
            if m_end > a_end:  # rows entering at this layer's MLP
                torch.add(clean._resid_mid[layer], vals[a_end:m_end], out=z[a_end:m_end])
                num[a_end:m_end, mcol] = vals_w[a_end:m_end]
        else:
            if a_run is not None:
                m = step.mlp(layer, z[:run])  # reads the same residual as the attention
                for r0, _, v in mlp_later:
                    if r0 < run:
                        m[r0 : r0 + n_patch] = v
                num[:run, mcol] = dot(m)
                z[:run] += a_run + m
            if a_ent is not None:
                z[run:a_end] = pre + a_ent + clean._mlp[layer]
                for r0, _, v in mlp_later:
                    if r0 >= run:
                        z[r0 : r0 + n_patch] += v - clean._mlp[layer]
                        num[r0 : r0 + n_patch, mcol] = dot(v)
            if m_end > a_end:
                z[a_end:m_end] = pre + clean._attn[layer] + vals[a_end:m_end]
                num[a_end:m_end, mcol] = vals_w[a_end:m_end]
    sigma = adapter.final_scale(z.to(acc))
    direct = num / sigma[:, None]
    if acc == z.dtype:  # float32 / float64: the model's own final-norm path
        centred = adapter.centred_logit(z, clean.target)
    else:  # half precision: Eq 24 from the final residual, accumulated in float32
        centred = dot(z) / sigma + clean.readout_const
    inv = torch.argsort(order_t)
    n_read = len(clean.readout_sites)
    direct = direct.view(n_sites, n_patch, n_read)[inv]
    sigma = sigma.view(n_sites, n_patch)[inv]
    centred = centred.view(n_sites, n_patch)[inv]
    return PatchedRun(
        sites=["+".join(m.name for m in g) for g in groups],
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
        # the heads' sum, or a family's own output where that differs (Gemma: attn_and_heads)
        a, contrib = self.adapter.attn_and_heads(layer, zh)  # [N, d], [N, H, d]
        acc = accumulation_dtype(self.readout_dir.dtype)
        return a, contrib.to(acc) @ self.readout_dir.to(acc)

    def mlp(self, layer: int, resid: Tensor) -> Tensor:
        """The MLP's contribution m [N, d] of the rows (``mlp`` of the block methods)."""
        return self.adapter.mlp(layer, resid)
