"""The paper's figures from a results folder (Figures 1/3, 2, 7, 8), as PNG files.

Matplotlib's object-oriented API with the Agg canvas (:class:`matplotlib.figure.Figure`, no
pyplot), so importing this module never changes the global backend and works headless. Each
``plot_*(..., path)`` saves the figure its twin ``figure_*(...)`` returns (to show in a
notebook, restyle, or inspect in tests). Every axis is labelled; layers are numbered from 0
as in Hugging Face; effects are in centred logits of the target token (Eqs 9, 10).

Head-granularity results: per-layer figures (2, 7, 8) treat attention heads as their own kind
``"head"`` in place of ``"attn"``: per-prompt curves show the mean over a layer's heads, and
scatter plots and regressions pool every head of a layer (as :mod:`causalnet.hydra.analysis`).
Per-prompt figures (1, 3) sum the heads of a layer, which is exact for direct effects (the
heads of a layer sum to the layer's output, ``attn.l = sum_H attn.l.hH``). The embedding site
is left out of the per-layer panels.

The figures live in one module per family: :mod:`~causalnet.hydra.figures_prompt` (Figures 1,
3), :mod:`~causalnet.hydra.figures_agreement` (Figure 2), :mod:`~causalnet.hydra.figures_response`
(Figures 7, 8), their shared look in :mod:`~causalnet.hydra.figures_style`; this module
re-exports every ``plot_*``/``figure_*`` and writes them all (:func:`make_all`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import DataError
from .data import load_prompts
from .figures_agreement import figure_agreement, plot_agreement
from .figures_prompt import figure_examples, figure_prompt, plot_examples, plot_prompt
from .figures_response import (
    figure_compensation,
    figure_response_split,
    plot_compensation,
    plot_response_split,
    select_layers,
)
from .figures_style import (
    ABLATED,
    ATTN_COLOUR,
    CLEAN,
    MLP_COLOUR,
    UNIT,
    layer_kinds,
)
from .store import ResultsStore

__all__ = [
    "ABLATED",
    "ATTN_COLOUR",
    "CLEAN",
    "MLP_COLOUR",
    "UNIT",
    "figure_agreement",
    "figure_compensation",
    "figure_examples",
    "figure_prompt",
    "figure_response_split",
    "make_all",
    "plot_agreement",
    "plot_compensation",
    "plot_examples",
    "plot_prompt",
    "plot_response_split",
    "select_layers",
]


def make_all(
    results_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Write every figure of a results folder into ``out_dir`` (default
    ``<results_dir>/figures``) and return their paths:

    - ``fig1_prompt.png``: the first prompt that kept per-patch rows (else the first prompt),
      ablating its attention site (mixer, in a model of one-part blocks) with the largest clean
      direct effect (no Figures 1 and 3 in a model of MLPs only);
    - ``fig2_direct_vs_total.png``, ``fig3_examples.png`` (up to 4 prompts with the largest
      attention (mixer) direct effects, each ablating that site), ``fig7_compensation.png``,
      ``fig8_response_split.png``;
    - ``fig_repair_patches.png`` when the folder kept per-patch effects
      (:mod:`causalnet.hydra.figures_repair`).

    Prompt texts for titles come from the run's ``prompts`` argument when it still resolves
    (:func:`causalnet.hydra.data.load_prompts`); otherwise titles name the prompt id.
    """
    store = ResultsStore(results_dir)
    effects = store.load_effects()
    out = Path(out_dir) if out_dir is not None else store.path / "figures"
    out.mkdir(parents=True, exist_ok=True)
    texts = _prompt_texts(store)
    targets = effects.groupby("prompt_id", sort=False)["target_str"].first()

    def label(pid: Any) -> str:
        text = texts.get(pid)
        head = f"{text!r}" if text is not None else f"prompt {pid!r}"
        return f"{head} -> {targets.get(pid, '?')!r}"

    best = _best_attention_ablations(effects)
    kept = store.patch_prompt_ids()
    first = kept[0] if kept else effects["prompt_id"].iloc[0]
    examples = list(best.items())[:4]
    wanted = {first} | {pid for pid, _ in examples}
    readouts = store.load_readouts(wanted)
    patches = store.load_patches(wanted) if kept else None
    paths = []
    if first in best:
        paths.append(
            plot_prompt(
                readouts,
                first,
                best[first],
                out / "fig1_prompt.png",
                patches=patches,
                title=f"{label(first)}: ablating {best[first]}",
            )
        )
    paths.append(plot_agreement(effects, out / "fig2_direct_vs_total.png"))
    if examples:
        paths.append(
            plot_examples(
                readouts,
                examples,
                out / "fig3_examples.png",
                patches=patches,
                titles=[label(pid) for pid, _ in examples],
            )
        )
    paths.append(plot_compensation(effects, out / "fig7_compensation.png"))
    paths.append(plot_response_split(effects, out / "fig8_response_split.png"))
    from .figures_repair import make_repair_figures  # per-patch repair, when kept

    return paths + make_repair_figures(store.path, out)


# ---- helpers --------------------------------------------------------------------------------


def _best_attention_ablations(effects: pd.DataFrame) -> dict[Any, str]:
    """Per prompt, its ablated attention site (a mixer in a model of one-part blocks) with the
    largest clean direct effect; prompts ordered by that effect, largest first."""
    kinds = layer_kinds(effects)
    if not kinds or kinds[0] not in ("attn", "head", "mixer"):  # no attention: MLPs only
        return {}
    rows = effects[effects["kind"] == kinds[0]]
    top = rows.loc[rows.groupby("prompt_id", sort=False)["direct_effect"].idxmax()]
    top = top.sort_values("direct_effect", ascending=False, kind="stable")
    return dict(zip(top["prompt_id"], top["site"], strict=True))


def _prompt_texts(store: ResultsStore) -> dict[Any, str]:
    spec = store.load_run().get("args", {}).get("prompts")
    if not isinstance(spec, str):
        return {}
    try:
        return {p.id: p.text for p in load_prompts(spec)}
    except DataError:  # the prompt set moved since the sweep: titles fall back to ids
        return {}
