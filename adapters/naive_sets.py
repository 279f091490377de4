"""The independent oracle for sets of sites: hooked full re-forwards of the Hugging Face model
with every member of a set patched in the same run (``docs/conventions.md``, "Sets of sites").

:func:`naive_patch_set` is :func:`causalnet.adapters.naive.naive_patch` for a set ``a+b+...``:
one batch of P copies of the prompt, and in each copy every member patched at the position t
by the same kind of hooks (``embed``: a pre-hook on decoder layer 0; ``attn.l`` / ``mlp.l``:
forward hooks on the modules replacing their output; ``attn.l.hH``: a forward hook on the
output projection replacing head H's contribution, ``out += v - contrib_H(z)``), each hook
counted and checked to have fired. It records every readout site at t and z^L, so
:func:`causalnet.adapters.naive.naive_readout` reads it out as a single site's run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from causalnet.errors import ShapeError

from .contract import Granularity, ResidualAdapter
from .naive import (
    HookCalls,
    NaiveRun,
    check_eval_mode,
    first_output,
    head_contributions,
    prompt_position,
    record_input_hook,
    replace_first_output,
)


def naive_patch_set(
    adapter: ResidualAdapter,
    tokens: Tensor,
    site_set: str,
    values: Tensor,
    position: int = -1,
    granularity: Granularity = "layer",
) -> NaiveRun:
    """do(member_m = values[p, m] for every member m) at ``position``, one full forward of P
    copies of the prompt. ``site_set`` is a set name ``a+b`` (or one site); ``values``
    [P, n_members, d] with the members in the set's canonical (residual) order."""
    unit = adapter.unit(site_set)
    members = list(getattr(unit, "members", (unit,)))
    tokens, t = prompt_position(adapter, tokens, position)
    d = adapter.arch.d_model
    values = torch.as_tensor(values)
    if values.ndim != 3 or values.shape[1:] != (len(members), d) or values.shape[0] == 0:
        raise ShapeError(
            f"values for {site_set!r} must be [n_patches, n_members={len(members)}, d={d}], "
            f"got {tuple(values.shape)}"
        )
    check_eval_mode(adapter)
    values = values.to(device=adapter.device, dtype=adapter.dtype)
    n_layers, n_heads = adapter.arch.n_layers, adapter.arch.n_heads
    batch = tokens[None].expand(values.shape[0], tokens.shape[0]).contiguous()
    patch_of = {(m.kind, m.layer, m.head): values[:, i] for i, m in enumerate(members)}
    hooks = HookCalls()
    got: dict[str, Tensor] = {}
    z_in: dict[int, Tensor] = {}

    def block0_pre(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hooks.count("embed")
        hidden = args[0] if args else kwargs["hidden_states"]
        v = patch_of.get(("embed", -1, -1))
        if v is not None:
            hooks.count("patch.embed")
            hidden = hidden.clone()
            hidden[:, t] = v
            if args:
                args = (hidden, *args[1:])
            else:
                kwargs = {**kwargs, "hidden_states": hidden}
        got["embed"] = hidden[:, t].clone()
        return args, kwargs

    def output_hook(kind: str, layer: int) -> Callable:
        name = f"{kind}.{layer}"

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            hooks.count(name)
            first = first_output(output)
            v = patch_of.get((kind, layer, -1))
            if v is not None:
                hooks.count(f"patch.{name}")
                first = first.clone()
                first[:, t] = v
                output = replace_first_output(output, first)
            got[name] = first[:, t].clone()
            return output

        return hook

    def o_proj_patch(layer: int, heads: list[int]) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
            contrib = head_contributions(module, args[0][:, t], n_heads)
            out = output.clone()
            for h in heads:
                hooks.count(f"patch.attn.{layer}.h{h}")
                out[:, t] = out[:, t] - contrib[:, h] + patch_of[("head", layer, h)]
            return out

        return hook

    def final_pre(module: nn.Module, args: tuple) -> None:
        hooks.count("final")
        got["final"] = args[0][:, t].clone()

    try:
        hooks.add(
            adapter.hook_points(0).block.register_forward_pre_hook(block0_pre, with_kwargs=True),
            "embed",
        )
        for layer in range(n_layers):
            pts = adapter.hook_points(layer)
            hooks.add(pts.attn.register_forward_hook(output_hook("attn", layer)), f"attn.{layer}")
            hooks.add(pts.mlp.register_forward_hook(output_hook("mlp", layer)), f"mlp.{layer}")
            hooks.add(
                pts.o_proj.register_forward_pre_hook(record_input_hook(hooks, z_in, layer, t)),
                f"o_proj.{layer}",
            )
            heads = [m.head for m in members if m.kind == "head" and m.layer == layer]
            if heads:
                hooks.add(
                    pts.o_proj.register_forward_hook(o_proj_patch(layer, heads)),
                    f"patch.attn.{layer}.h{heads[0]}",
                )
        hooks.add(adapter.final_norm_module().register_forward_pre_hook(final_pre), "final")
        for m in members:
            hooks.calls.setdefault(f"patch.{m.name}", 0)
        with torch.no_grad():
            logits = adapter.model(input_ids=batch, use_cache=False).logits
        hooks.check(patching=site_set)
    finally:
        hooks.remove()

    with torch.no_grad():
        site_values: dict[str, Tensor] = {"embed": got["embed"]}
        for layer in range(n_layers):
            if granularity == "head":
                contrib = head_contributions(
                    adapter.hook_points(layer).o_proj, z_in[layer], n_heads
                )
                patched = [m.head for m in members if m.kind == "head" and m.layer == layer]
                for h in patched:  # read the patched heads back as their values
                    contrib[:, h] = patch_of[("head", layer, h)]
                for h in range(n_heads):
                    site_values[f"attn.{layer}.h{h}"] = contrib[:, h]
            else:
                site_values[f"attn.{layer}"] = got[f"attn.{layer}"]
            site_values[f"mlp.{layer}"] = got[f"mlp.{layer}"]
    return NaiveRun(position=t, logits=logits, site_values=site_values, resid_final=got["final"])
