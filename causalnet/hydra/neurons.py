"""Neuron readouts of the last MLP layers, before and after an ablation (issue 13, §3).

An MLP's output is its down projection of its hidden activations a [h]:
``mlp.l = sum_n a_n W_out[:, n] + b_out``. Read out at a run's final scale sigma along the
centred readout direction w_i of the target i
(``docs/conventions.md``, "Centred readout direction"), the MLP's direct effect splits
exactly over its neurons,

    DE(mlp.l) = sum_n a_n (W_out[:, n] . w_i) / sigma + (b_out . w_i) / sigma,

so each neuron n has a direct effect ``a_n (W_out[:, n] . w_i) / sigma`` on the target. In a run
where site k was ablated (each patched run at its own sigma, as Eq 13), the change of a neuron's
direct effect says whether it erases more (negative) or less (positive) -- the MLP part of the
compensation (Eq 33), neuron by neuron.

The hidden activations are read from the model's own modules: a forward pre-hook on the MLP's
down projection (found by name under the adapter's ``hook_points(layer).mlp``) records its
input at the last position, during :func:`causalnet.adapters.naive.naive_patch`'s hooked
re-forward of the Hugging Face model (the ablation, Eq 11; the clean run is the same re-forward
with the site set to its own clean value). Before anything is returned, the neurons' sum plus
the bias term is checked against the MLP site's direct effect in the same run, to the dtype's
tolerance (``adapters/hooks.py``); a mismatch (a down projection that is not the MLP's last
step, a norm after the MLP) raises :class:`~causalnet.errors.InterventionError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch import Tensor, nn

from ..adapters.hooks import tolerance
from ..adapters.naive import naive_patch
from ..errors import InterventionError, ModelError, ShapeError

if TYPE_CHECKING:
    from ..adapters import TransformerAdapter

#: Names of an MLP's down projection in the hand-written families (Llama, GPT-2, GPT-NeoX,
#: GPT-J) and common others.
DOWN_PROJECTIONS = ("down_proj", "c_proj", "dense_4h_to_h", "fc_out", "fc2", "w2")


def down_projection(adapter: TransformerAdapter, layer: int) -> tuple[nn.Module, Tensor, Tensor]:
    """(module, W [h, d] with row n = W_out[:, n], bias [d]) of layer ``layer``'s MLP."""
    if not hasattr(adapter, "hook_points"):
        raise ModelError(
            f"{type(adapter).__name__} has no hook_points(layer): neuron readouts need a "
            "hand-written family's adapter"
        )
    if getattr(adapter.arch, "sublayer_norms", False):
        raise ModelError(
            f"{adapter.arch.family}: a norm after the MLP makes mlp.l = norm(down projection); "
            "the neurons have no additive direct effects"
        )
    if not 0 <= layer < adapter.arch.n_layers:
        raise ModelError(f"layer {layer} does not exist (0 .. {adapter.arch.n_layers - 1})")
    mlp = adapter.hook_points(layer).mlp
    for name in DOWN_PROJECTIONS:
        module = getattr(mlp, name, None)
        if isinstance(module, nn.Linear):
            weight = module.weight.T
        elif isinstance(module, nn.Module) and type(module).__name__ == "Conv1D":
            weight = module.weight  # transformers' Conv1D: [in, out]
        else:
            continue
        bias = module.bias if module.bias is not None else weight.new_zeros(weight.shape[1])
        return module, weight.detach(), bias.detach()
    raise ModelError(
        f"layer {layer}: the MLP module {type(mlp).__name__} has no linear down projection "
        f"named one of {list(DOWN_PROJECTIONS)}"
    )


@dataclass(frozen=True)
class NeuronReadout:
    """:func:`neuron_readouts`' answer.

    ``neurons``: layer, neuron, activation_clean, direct_effect_clean, activation_ablated,
    direct_effect_ablated (means over patches), delta_de (ablated - clean). ``layers``: per
    layer the MLP site's direct effect clean and ablated (mean), the bias terms, and
    ``max_identity_error``: the largest |sum of neurons + bias - MLP direct effect| over the
    runs (checked below the tolerance before return).
    """

    target: int
    ablated_site: str
    neurons: pd.DataFrame
    layers: pd.DataFrame


def _run(
    adapter: TransformerAdapter,
    tokens: Tensor,
    site: str,
    values: Tensor,
    modules: dict[int, nn.Module],
    granularity: str,
) -> tuple[Any, dict[int, Tensor]]:
    """One hooked re-forward (naive_patch) recording each down projection's input at t."""
    t = tokens.shape[0] - 1
    got: dict[int, Tensor] = {}

    def record(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            got[layer] = args[0][:, t].detach().clone()

        return hook

    handles = [m.register_forward_pre_hook(record(layer)) for layer, m in modules.items()]
    try:
        run = naive_patch(adapter, tokens, site, values, granularity=granularity)  # type: ignore[arg-type]
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(modules) - set(got))
    if missing:
        raise InterventionError(f"the down projection of layer(s) {missing} never ran")
    return run, got


def neuron_readouts(
    adapter: TransformerAdapter,
    tokens: Tensor,
    layers: list[int],
    site: str,
    values: Tensor,
    granularity: str = "layer",
) -> NeuronReadout:
    """Every neuron's direct effect on the clean target in ``layers``' MLPs, in the clean run
    and in the runs do(site = values[p]) at the last position (module doc).

    tokens [T]; values [P, d] (e.g. other prompts' clean values of ``site``: a resample
    ablation, or zeros). The target is the argmax of the clean logits (Eq 10).
    """
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 1:
        raise ShapeError(f"tokens must be one prompt [T], got shape {tuple(tokens.shape)}")
    if not layers:
        raise ModelError("no MLP layer asked")
    parts = {layer: down_projection(adapter, layer) for layer in layers}
    modules = {layer: p[0] for layer, p in parts.items()}
    clean = adapter.clean_run(tokens, granularity=granularity)  # type: ignore[arg-type]
    w = clean.readout_dir
    own = clean.value(site)[None]
    runs = {
        "clean": _run(adapter, tokens, site, own, modules, granularity),
        "ablated": _run(adapter, tokens, site, values, modules, granularity),
    }
    neuron_frames, layer_rows = [], []
    for layer, (_, weight, bias) in parts.items():
        per_neuron = (weight.to(w.dtype) @ w).double()  # [h]: W_out[:, n] . w_i
        bias_dot = float(bias.to(w.dtype) @ w)
        cols: dict[str, Any] = {}
        row: dict[str, Any] = {"layer": layer}
        worst = 0.0
        for name, (run, acts) in runs.items():
            sigma = adapter.final_scale(run.resid_final).double()  # [P]
            a = acts[layer].double()  # [P, h]
            de = a * per_neuron / sigma[:, None]
            mlp_de = (run.site_values[f"mlp.{layer}"].to(w.dtype) @ w).double() / sigma
            bias_de = bias_dot / sigma
            error = (de.sum(1) + bias_de - mlp_de).abs().max()
            scale = float((de.abs().sum(1) + bias_de.abs()).max()) + 1e-30
            if float(error) > 10 * tolerance(adapter.dtype) * max(scale, 1.0):
                raise InterventionError(
                    f"layer {layer}: the neurons' direct effects sum to the MLP's up to "
                    f"{float(error):.3g} in the {name} run; the down projection is not the MLP's "
                    "last step"
                )
            worst = max(worst, float(error))
            cols[f"activation_{name}"] = a.mean(0).numpy()
            cols[f"direct_effect_{name}"] = de.mean(0).numpy()
            row[f"mlp_direct_effect_{name}"] = float(mlp_de.mean())
            row[f"bias_direct_effect_{name}"] = float(bias_de.mean())
        row["max_identity_error"] = worst
        frame = pd.DataFrame({"layer": layer, "neuron": range(len(per_neuron)), **cols})
        frame["delta_de"] = frame["direct_effect_ablated"] - frame["direct_effect_clean"]
        neuron_frames.append(frame)
        layer_rows.append(row)
    return NeuronReadout(
        target=int(clean.target),
        ablated_site=site,
        neurons=pd.concat(neuron_frames, ignore_index=True),
        layers=pd.DataFrame(layer_rows),
    )


def top_neurons(neurons: pd.DataFrame, n: int = 5) -> pd.DataFrame:
    """The neurons that matter most for erasure, with a ``role``:

    - ``erases`` : the most negative clean direct effects (they push the target down);
    - ``erases more``: the most negative delta_de after the ablation (anti-repair);
    - ``erases less``: the most positive delta_de (they let the target back up: repair).
    """
    roles = [
        ("erases", neurons.nsmallest(n, "direct_effect_clean")),
        ("erases more", neurons.nsmallest(n, "delta_de")),
        ("erases less", neurons.nlargest(n, "delta_de")),
    ]
    return pd.concat([f.assign(role=r) for r, f in roles], ignore_index=True)
