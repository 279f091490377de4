"""Direct effects per layer on the bundled real model, clean and after one attention ablation.

    python examples/direct_effects_real_model.py out.png [known_id] [ablated_layer]

For one Counterfact prompt (``causalnet/data/known_1000.json``; default known_id 6, "Catalonia
belongs to the continent of" -> " Europe", which the model gets right) on SmolLM2-135M-Instruct:

- top: the clean direct effect of every attention and MLP layer on the centred logit of the
  model's top token (Delta_unembed, paper Eq 10: (c . w_i) / sigma at the clean final scale);
- bottom (paper Figure 1): the same per-layer curve, clean (blue), and after resample-ablating
  one attention layer (dashed line) with that layer's final-position output taken from K = 15
  other prompts' clean runs: a faint red line per patch (each run read out at its own final
  scale, Eq 13) and their mean (solid red). By default the ablated layer is the attention layer
  with the largest clean direct effect.

Runs in well under a minute on a CPU (one clean run per prompt, one batched patch).
"""

from __future__ import annotations

import json
import random
import sys
import time
from importlib import resources

import torch
from matplotlib.figure import Figure

from causalnet.adapters import load

K_PATCHES = 15
SEED = 0


def main(out: str, known_id: int = 6, ablated: int | None = None) -> None:
    start = time.perf_counter()
    records = json.loads(resources.files("causalnet.data").joinpath("known_1000.json").read_text())
    by_id = {r["known_id"]: r for r in records}
    record = by_id[known_id]
    adapter = load("smollm2-135m")
    n_layers = adapter.arch.n_layers

    clean = adapter.clean_run(adapter.encode(record["prompt"]))
    col = {s: j for j, s in enumerate(clean.readout_sites)}
    attn_cols = [col[f"attn.{layer}"] for layer in range(n_layers)]
    mlp_cols = [col[f"mlp.{layer}"] for layer in range(n_layers)]
    de = clean.direct_effects
    if ablated is None:
        ablated = int(de[attn_cols].argmax())
    site = f"attn.{ablated}"

    # Resample ablation: the site's final-position value in K other prompts' clean runs.
    rng = random.Random(SEED)
    sources = rng.sample([r for r in records if r["known_id"] != known_id], K_PATCHES)
    values = torch.stack(
        [adapter.clean_run(adapter.encode(r["prompt"])).value(site) for r in sources]
    )
    patched = adapter.patch(clean, [site], values[None])
    de_abl = patched.direct_effects[0]  # [K, readout sites]

    target = adapter.tokenizer.decode([clean.target])
    layers = list(range(n_layers))
    fig = Figure(figsize=(10, 11), layout="constrained")
    axes = fig.subplots(3, 1)
    width = 0.4
    axes[0].bar([x - width / 2 for x in layers], de[attn_cols].tolist(), width, label="attention")
    axes[0].bar([x + width / 2 for x in layers], de[mlp_cols].tolist(), width, label="MLP")
    axes[0].axhline(0.0, color="black", lw=0.5)
    axes[0].set_title(f"{record['prompt']!r} -> {target!r}: clean direct effect per layer (Eq 10)")
    axes[0].set_ylabel("direct effect on centred logit")
    axes[0].legend()

    for ax, cols, kind in ((axes[1], attn_cols, "attention"), (axes[2], mlp_cols, "MLP")):
        for k in range(K_PATCHES):
            ax.plot(layers, de_abl[k, cols].tolist(), color="tab:red", alpha=0.15, lw=1)
        ax.plot(
            layers,
            de_abl[:, cols].mean(0).tolist(),
            color="tab:red",
            lw=2,
            label=f"after resample-ablating {site} (mean of {K_PATCHES} patches)",
        )
        ax.plot(layers, de[cols].tolist(), color="tab:blue", lw=2, label="clean")
        ax.axvline(ablated, color="black", ls="--", lw=1)
        ax.axhline(0.0, color="black", lw=0.5)
        ax.set_ylabel(f"{kind} direct effect")
        ax.legend(loc="upper left", fontsize=8)
    axes[2].set_xlabel("layer")
    total = float(patched.total_effect[0].mean())
    axes[1].set_title(
        f"Direct effects per layer, clean vs {site} ablated (Figure 1); "
        f"total effect {total:+.2f}, clean direct effect {float(de[col[site]]):+.2f}"
    )
    fig.savefig(out, dpi=120)
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s (target {target!r}, ablated {site})")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(
        sys.argv[1],
        int(sys.argv[2]) if len(sys.argv) > 2 else 6,
        int(sys.argv[3]) if len(sys.argv) > 3 else None,
    )
