"""The independent oracle, and the "naive way": hooked full re-forwards of the Hugging Face model.

:func:`naive_patch` runs the Hugging Face model ITSELF (not the adapter's block methods) with
PyTorch hooks that perform do(site = value) at one position (Eq 11), and records, in the same
patched run, every readout site's value at that position and the final residual z^L. Two ways:
``batched=False`` runs one full forward per patch ((a), the usual way of existing tools);
``batched=True`` runs all patches of one site as one batch of full sequences ((b)).

Where the hooks sit (family modules from :meth:`TransformerAdapter.hook_points`):

- ``embed``: a pre-hook on decoder layer 0 edits / reads its residual input;
- ``attn.l`` / ``mlp.l``: forward hooks on the attention / MLP modules edit / read their output;
- ``attn.l.hH``: a pre-hook on the output projection reads the heads' concatenated outputs z, and
  a forward hook replaces head H's contribution: out += v - contrib_H(z), where
  contrib_H(z) = o_proj(z with the other heads zeroed) - (1 - 1/H) o_proj(0) (the projection's
  bias split equally over the heads), computed with the module's own ``forward``;
- heads under a norm after the attention (``arch.sublayer_norms``: Gemma 3, discovered OLMo-2,
  Gemma 2 ...; docs/conventions.md "Heads under a norm after the attention"), in each layer whose
  ``hook_points().attn`` is that norm (no linear map inside; not a hybrid's linear attention): a
  head's
  value is its share ``gamma * o_h / sigma(o)`` of attn.l. The patch hook on the output
  projection moves head H's pre-norm term, ``o += (v - share_H) * sigma(o) / gamma`` (coordinates
  with gamma = 0 keep it), and the model's own norm module renormalises; heads are read back as
  shares at the run's own sigma(o'), the frame read from the norm module (:func:`post_norm_frame`);
- ``mixer.l`` (a model of one-part blocks, ``arch.mixer_blocks``: Mamba): a forward hook on
  ``hook_points().mixer`` edits / reads its output, as for ``mlp.l``;
- z^L: a pre-hook on the final norm.

Every hook counts its calls; a patch hook or a recording hook that did not run raises
InterventionError (a silent no-op is the worst failure of a hook-based tool). :func:`naive_readout`
turns a :class:`NaiveRun` into the centred target logit (from the full logits, Eq 9) and every
readout site's direct effect (c . w_i) / sigma at that run's own sigma (Eq 13).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from causalnet.errors import ContextError, InterventionError, ModelError, ShapeError

from .base import Granularity, TransformerAdapter
from .contract import ResidualAdapter


@dataclass
class NaiveRun:
    """Patched full re-forwards of the Hugging Face model, one row per patch."""

    position: int  # the (non-negative) position t of the intervention and the readout
    logits: Tensor  # [P, T, V]: the patched model's full logits
    site_values: dict[str, Tensor]  # readout site -> [P, d]: its value at t in each patched run
    resid_final: Tensor  # [P, d]: z^L_t, the input of the final norm


def first_output(x: Any) -> Tensor:
    """The tensor of a module's output (the first element of a tuple output)."""
    return x[0] if isinstance(x, tuple) else x


def replace_first_output(x: Any, new: Tensor) -> Any:
    """A module's output with its tensor (the first element of a tuple) replaced by ``new``."""
    return (new, *x[1:]) if isinstance(x, tuple) else new


def record_input_hook(hooks: HookCalls, store: dict[int, Tensor], layer: int, t: int) -> Callable:
    """A forward pre-hook that counts ``o_proj.<layer>`` and keeps its input at position t in
    ``store[layer]`` (the concatenated heads the oracle splits into per-head terms)."""

    def hook(module: nn.Module, args: tuple) -> None:
        hooks.count(f"o_proj.{layer}")
        store[layer] = args[0][:, t].clone()

    return hook


def head_contributions(o_proj: nn.Module, z: Tensor, n_heads: int) -> Tensor:
    """Per-head contributions through the output projection module: [N, H*dh] -> [N, H, d].

    contrib_h = o_proj(z with every head but h zeroed) - (1 - 1/H) o_proj(0); they sum to
    o_proj(z). Uses ``o_proj.forward`` so that no hook of the module runs.
    """
    n, width = z.shape
    d_head = width // n_heads
    eye = torch.eye(n_heads, dtype=z.dtype, device=z.device)
    masked = (z.view(n, 1, n_heads, d_head) * eye[None, :, :, None]).reshape(n, n_heads, width)
    zero = o_proj.forward(z.new_zeros(1, width))
    return o_proj.forward(masked) - zero * (n_heads - 1) / n_heads


def post_norm_frame(norm: nn.Module, o: Tensor) -> tuple[Tensor, Tensor]:
    """``(1 / sigma(o) [N, 1], gamma [d])`` of an RMS norm module after the attention, for its
    inputs o [N, d], in float64 for float64 inputs (else float32): norm(o) = o / sigma(o) * gamma.

    Read from the module itself, not from an adapter: its ``eps`` (or ``variance_epsilon``), its
    gain found by running the module (``forward``: no hooks) on a row of ones and matching
    ``weight`` or ``1 + weight``, and checked against the module's own output on o. A norm that
    is not of that form raises InterventionError naming it (never a silent wrong share).
    """
    acc = torch.float64 if o.dtype == torch.float64 else torch.float32
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    weight = getattr(norm, "weight", None)
    name = type(norm).__name__
    if not isinstance(eps, float) or not isinstance(weight, Tensor):
        raise InterventionError(f"the norm after the attention ({name}) has no float eps / weight")
    with torch.no_grad():
        x = o.to(acc)
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ones = torch.ones(1, o.shape[-1], dtype=o.dtype, device=o.device)
        probe = norm.forward(ones)[0].to(acc) * (1.0 + eps) ** 0.5
        w = weight.to(acc)
        gamma = next((g for g in (w, 1.0 + w) if torch.allclose(probe, g, atol=1e-3)), None)
        expect = x * inv * (probe if gamma is None else gamma)
        off = float((norm.forward(o).to(acc) - expect).abs().max())
    if gamma is None or off > 1e-4 * (1.0 + float(expect.abs().max())):
        raise InterventionError(
            f"the norm after the attention ({name}) is not o / sqrt(mean(o^2) + eps) * gamma with "
            f"gamma = weight or 1 + weight (off by {off:.3g}): its heads have no shares"
        )
    return inv, gamma


def prompt_position(adapter: ResidualAdapter, tokens: Tensor, position: int) -> tuple[Tensor, int]:
    """The checked prompt [T] of a naive run and its patch position as a non-negative t;
    ContextError for a position outside the prompt."""
    tokens = adapter._check_tokens(tokens, ndim=1)
    n = tokens.shape[0]
    if not isinstance(position, int) or not -n <= position < n:
        raise ContextError(f"position {position!r} is out of range for a prompt of {n} tokens")
    return tokens, position % n


def check_eval_mode(adapter: ResidualAdapter) -> None:
    """ModelError when the model is in training mode (dropout would make every run differ)."""
    if adapter.model.training:
        raise ModelError("the model is in training mode (dropout on); call model.eval()")


class HookCalls:
    """Registers the hooks of one naive run and checks they all fired."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.calls: dict[str, int] = {}

    def count(self, key: str) -> None:
        self.calls[key] = self.calls.get(key, 0) + 1

    def add(self, handle: Any, key: str) -> None:
        self.handles.append(handle)
        self.calls.setdefault(key, 0)

    def check(self, patching: str | None = None) -> None:
        """InterventionError naming the hooks that never ran (and the site ``patching``)."""
        silent = [k for k, n in self.calls.items() if n == 0]
        if silent:
            where = "" if patching is None else f" patching {patching!r}"
            raise InterventionError(
                f"hook(s) did not fire{where}: {silent}; the module returned by hook_points() / "
                "final_norm_module() is not on the model's forward path, so the intervention "
                "or the readout would have been a silent no-op"
            )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def naive_patch(
    adapter: TransformerAdapter,
    tokens: Tensor,
    site: str,
    values: Tensor,
    position: int = -1,
    granularity: Granularity = "layer",
    batched: bool = True,
) -> NaiveRun:
    """do(site = values[p]) at ``position`` by hooked full forwards of the Hugging Face model.

    tokens [T], values [P, d] -> :class:`NaiveRun` with P rows. ``batched=True``: one forward
    of a batch of P copies of the prompt; ``batched=False``: P forwards of one sequence.
    """
    s = adapter.site(site)
    tokens, t = prompt_position(adapter, tokens, position)
    d = adapter.arch.d_model
    values = torch.as_tensor(values)
    if values.ndim != 2 or values.shape[1] != d or values.shape[0] == 0:
        raise ShapeError(f"values for site {site!r} must be [n_patches, d={d}], got {values.shape}")
    check_eval_mode(adapter)
    values = values.to(device=adapter.device, dtype=adapter.dtype)
    if not batched:
        runs = [
            _naive_batch(adapter, tokens[None], s.name, values[j : j + 1], t, granularity)
            for j in range(values.shape[0])
        ]
        return NaiveRun(
            position=t,
            logits=torch.cat([r.logits for r in runs]),
            site_values={
                k: torch.cat([r.site_values[k] for r in runs]) for k in runs[0].site_values
            },
            resid_final=torch.cat([r.resid_final for r in runs]),
        )
    batch = tokens[None].expand(values.shape[0], tokens.shape[0]).contiguous()
    return _naive_batch(adapter, batch, s.name, values, t, granularity)


def _naive_batch(
    adapter: TransformerAdapter,
    tokens: Tensor,
    site: str,
    values: Tensor,
    t: int,
    granularity: Granularity,
) -> NaiveRun:
    s = adapter.site(site)
    n_layers, n_heads = adapter.arch.n_layers, adapter.arch.n_heads
    hooks = HookCalls()
    got: dict[str, Tensor] = {}
    z_in: dict[int, Tensor] = {}

    def block0_pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hooks.count("embed")
        if args:
            hidden, where = args[0], "args"
        else:
            hidden, where = kwargs["hidden_states"], "kwargs"
        if s.kind == "embed":
            hooks.count("patch")
            hidden = hidden.clone()
            hidden[:, t] = values
            if where == "args":
                args = (hidden, *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": hidden}
        got["embed"] = hidden[:, t].clone()
        return args, kwargs

    def output_hook(name: str, kind: str, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            hooks.count(name)
            if s.kind == kind and s.layer == layer:
                hooks.count("patch")
                out = first_output(output).clone()
                out[:, t] = values
                output = replace_first_output(output, out)
            got[name] = first_output(output)[:, t].clone()
            return output

        return hook

    # heads are shares at the post-attention norm, in the layers whose attention hook point is
    # a norm (a module with no linear map; a hybrid's linear-attention layers have none)
    post_norms = [
        adapter.arch.sublayer_norms
        and not any(isinstance(m, nn.Linear) for m in adapter.hook_points(layer).attn.modules())
        for layer in range(n_layers)
    ]
    o_out: dict[int, Tensor] = {}
    moved: dict[int, Tensor] = {}  # the patched head's pre-norm term moved by (acc dtype)

    def o_proj_out(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            hooks.count(f"o_out.{layer}")
            if s.kind == "head" and s.layer == layer:
                hooks.count("patch")
                contrib = head_contributions(module, args[0][:, t], n_heads)[:, s.head]
                output = output.clone()
                if post_norms[layer]:
                    inv, gamma = post_norm_frame(adapter.hook_points(layer).attn, output[:, t])
                    share = contrib.to(inv.dtype) * inv * gamma
                    delta = (values.to(inv.dtype) - share) / (inv * gamma)
                    moved[layer] = torch.where(gamma != 0, delta, torch.zeros_like(delta))
                    output[:, t] = (output[:, t].to(inv.dtype) + moved[layer]).to(output.dtype)
                else:
                    output[:, t] = output[:, t] - contrib + values
            o_out[layer] = output[:, t].clone()
            return output

        return hook

    def final_pre(module: nn.Module, args: tuple) -> None:
        hooks.count("final")
        got["final"] = args[0][:, t].clone()

    try:
        first = adapter.hook_points(0).block
        hooks.add(first.register_forward_pre_hook(block0_pre, with_kwargs=True), "embed")
        for layer in range(n_layers):
            pts = adapter.hook_points(layer)
            if adapter.arch.mixer_blocks:
                name = f"mixer.{layer}"
                assert pts.mixer is not None
                hooks.add(pts.mixer.register_forward_hook(output_hook(name, "mixer", layer)), name)
                continue
            attn_name, mlp_name = f"attn.{layer}", f"mlp.{layer}"
            hooks.add(
                pts.attn.register_forward_hook(output_hook(attn_name, "attn", layer)), attn_name
            )
            hooks.add(pts.mlp.register_forward_hook(output_hook(mlp_name, "mlp", layer)), mlp_name)
            hooks.add(
                pts.o_proj.register_forward_pre_hook(record_input_hook(hooks, z_in, layer, t)),
                f"o_proj.{layer}",
            )
            if post_norms[layer] or (s.kind == "head" and s.layer == layer):
                o_key = f"o_out.{layer}"
                hooks.add(pts.o_proj.register_forward_hook(o_proj_out(layer)), o_key)
        hooks.add(adapter.final_norm_module().register_forward_pre_hook(final_pre), "final")
        hooks.calls.setdefault("patch", 0)
        with torch.no_grad():
            logits = adapter.model(input_ids=tokens, use_cache=False).logits
        hooks.check()
    finally:
        hooks.remove()

    with torch.no_grad():
        site_values: dict[str, Tensor] = {"embed": got["embed"]}
        for layer in range(n_layers):
            if adapter.arch.mixer_blocks:
                site_values[f"mixer.{layer}"] = got[f"mixer.{layer}"]
                continue
            if granularity == "head":
                pts = adapter.hook_points(layer)
                heads = head_contributions(pts.o_proj, z_in[layer], n_heads)
                if post_norms[layer]:  # shares at this run's own sigma(o'), the moved term in
                    inv, gamma = post_norm_frame(pts.attn, o_out[layer])
                    heads = heads.to(inv.dtype)
                    if layer in moved:
                        heads[:, s.head] += moved[layer]
                    heads = (heads * inv[:, None] * gamma).to(o_out[layer].dtype)
                elif s.kind == "head" and s.layer == layer:
                    # read the patched head back: the layer's output minus the other heads
                    others = heads.sum(1) - heads[:, s.head]
                    heads[:, s.head] = got[f"attn.{layer}"] - others
                for h in range(n_heads):
                    site_values[f"attn.{layer}.h{h}"] = heads[:, h]
            else:
                site_values[f"attn.{layer}"] = got[f"attn.{layer}"]
            site_values[f"mlp.{layer}"] = got[f"mlp.{layer}"]
    return NaiveRun(position=t, logits=logits, site_values=site_values, resid_final=got["final"])


def naive_readout(
    adapter: TransformerAdapter, run: NaiveRun, target: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(centred target logit [P], direct effects [P, R], sigma [P]) of a :class:`NaiveRun`.

    centred logit = pi_t[i] - mean_j pi_t[j] from the model's full logits (Eq 9); direct effect of
    readout site r = (c_r . w_i) / sigma(z^L_t) at the run's own final scale (Eq 13), in the
    order of ``run.site_values`` (the readout sites, ``embed`` first).
    """
    with torch.no_grad():
        logits = run.logits[:, run.position]
        centred = logits[:, target] - logits.mean(-1)
        w, _ = adapter.readout(target)
        sigma = adapter.final_scale(run.resid_final)
        stacked = torch.stack(list(run.site_values.values()), dim=1)  # [P, R, d]
        direct = (stacked @ w) / sigma[:, None]
    return centred, direct, sigma
