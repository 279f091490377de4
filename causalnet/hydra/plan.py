"""The per-prompt core of the Hydra sweep (paper Sections 2, 4): plan once, compute each prompt.

For each prompt x (one cached clean run, then one batched patched pass):

1. target i = argmax of the clean logits at the final position t (Eq 10);
2. direct effect of every readout site in the clean run, final scale frozen (Eq 10);
3. for every ablated site k and patch p: do(site_k = value_p) at position t, and in that run the
   centred target logit (total effect, Eq 12) and every readout site's direct effect at the
   run's own final scale (Eq 13);
4. Delta_DE, the compensatory effect and its attention/MLP split (Eqs 33, 34), via
   :func:`causalnet.hydra.protocol.decompose`; the repair split into value and scale parts and
   the total effect at the clean sigma (:func:`~causalnet.hydra.protocol.split_repair`,
   :func:`~causalnet.hydra.protocol.total_at_clean_sigma`), per row and per patch.

:func:`plan_sweep` builds what every prompt shares (a :class:`SweepPlan`: prompts, tokens,
sites and the ablation pool, :mod:`causalnet.hydra.pool`); :func:`compute_prompt` computes one
prompt's rows from a plan, an adapter and the prompt's index. It is pure -- its random draws
depend on (seed, prompt index) only -- so any executor (:mod:`causalnet.hydra.executors`) may
run the prompts in any order, in threads or on other machines, and write what one process
writes (clean runs are batched in groups fixed by the plan: :mod:`causalnet.hydra.cleanruns`).
This module imports no executor and writes nothing.
"""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd
import torch
from torch import Tensor

from ..errors import CausalNetError, ResultsError, ShapeError
from ..sites import members, parse_site_set, parse_unit, unit_sort_key
from .cleanruns import CleanGroups
from .config import SweepConfig, site_patterns
from .data import Prompt, PromptId, check_lengths, load_prompts
from .pool import ablation_values, build_pool
from .protocol import RepairSplit, decompose, split_repair, total_at_clean_sigma

if TYPE_CHECKING:
    from ..adapters import CleanRun, PatchedRun, TransformerAdapter


@dataclass
class SweepPlan:
    """What every prompt of a sweep shares: prompts, tokens, sites and the ablation pool.

    Built once by :func:`plan_sweep`; :func:`compute_prompt` needs only a plan, an adapter and
    a prompt index, so the same plan can be shipped to several workers.
    """

    config: SweepConfig
    prompts: list[Prompt]
    tokens: list[Tensor]
    sites: list[str]
    readout_sites: list[str]
    pool: Tensor  # [n_prompts, n_sites, d]
    #: the prompts' clean runs, a group of consecutive prompts per forward (:mod:`.cleanruns`)
    clean_runs: CleanGroups = field(default_factory=CleanGroups, repr=False, compare=False)


@dataclass
class PromptRows:
    """One prompt's rows: effects, readouts, (for figure prompts) per-patch readouts, and the
    per-patch effects of every site (``patch_effects``, kept for every prompt)."""

    index: int
    prompt_id: PromptId
    effects: pd.DataFrame
    readouts: pd.DataFrame
    patches: pd.DataFrame | None
    patch_effects: pd.DataFrame | None = None


def select_sites(all_sites: list[str], spec: str | None) -> list[str]:
    """The sites matching a comma-separated list of names or globs, in residual order.

    An entry ``a+b+...`` is a set of sites ablated together in one row (``docs/conventions.md``,
    "Sets of sites"): its members are exact site names of this model, and it is listed by its
    canonical name (members in residual order) at its earliest member's place.
    """
    if not spec:
        return list(all_sites)
    patterns = site_patterns(spec)
    if not patterns:
        raise CausalNetError(f"--sites {spec!r} names no site")
    chosen: list[str] = []
    for pattern in patterns:
        if "+" in pattern:
            unit = parse_site_set(pattern)
            unknown = [m.name for m in unit.members if m.name not in all_sites]
            if unknown:
                raise CausalNetError(
                    f"--sites set {pattern!r}: member {unknown[0]!r} is not a site of this "
                    f"model at this granularity; sites look like {all_sites[0]!r} .. "
                    f"{all_sites[-1]!r} (no globs inside a set)"
                )
            chosen.append(unit.name)
            continue
        if not fnmatch.filter(all_sites, pattern):
            raise CausalNetError(
                f"--sites pattern {pattern!r} matches no site of this model; sites look like "
                f"{all_sites[0]!r} .. {all_sites[-1]!r}"
            )
    singles = [s for s in all_sites if any(fnmatch.fnmatchcase(s, p) for p in patterns)]
    if not chosen:
        return singles
    return sorted(dict.fromkeys(singles + chosen), key=unit_sort_key)


def pool_sites(sites: list[str], readout_sites: list[str]) -> list[str]:
    """The columns of a sweep's ablation pool: every member site of the ablated sites and sets,
    once, in residual order (the sites themselves when no set is ablated)."""
    wanted = {m for s in sites for m in members(s)}
    return [r for r in readout_sites if r in wanted]


def member_columns(sites: list[str], columns: list[str]) -> Tensor:
    """For each member of each ablated site (flattened, in order) its pool column."""
    index = {c: j for j, c in enumerate(columns)}
    return torch.tensor([index[m] for s in sites for m in members(s)], dtype=torch.long)


def sweep_prompts(config: SweepConfig) -> list[Prompt]:
    """The prompts a sweep computes: ``config.prompts`` loaded, the first ``config.limit``,
    checked to be enough for the ablation (before any model is loaded)."""
    prompts = load_prompts(config.prompts)
    if config.limit is not None:
        prompts = prompts[: config.limit]
    if config.ablation == "resample" and len(prompts) <= config.k:
        raise CausalNetError(
            f"resample ablation with k={config.k} needs more than {config.k} prompts, "
            f"got {len(prompts)}"
        )
    if config.ablation == "mean" and len(prompts) < 2:
        raise CausalNetError(
            f"mean ablation averages over the other prompts: needs 2 or more, got {len(prompts)}"
        )
    return prompts


def sweep_sites(config: SweepConfig, adapter: TransformerAdapter) -> tuple[list[str], list[str]]:
    """(ablated sites, readout sites) of a sweep with ``adapter``."""
    readout_sites = adapter.readout_sites(config.granularity)
    return select_sites(adapter.sites(config.granularity), config.sites), readout_sites


def plan_sweep(
    config: SweepConfig,
    adapter: TransformerAdapter,
    progress: bool = False,
    *,
    prompts: list[Prompt] | None = None,
    pool: Tensor | None = None,
) -> SweepPlan:
    """Load and check the prompts (unless given), tokenize them, pick the sites, and build the
    ablation pool (unless ``pool`` is given: one read from a results folder)."""
    if prompts is None:
        prompts = sweep_prompts(config)
    tokens = [adapter.encode(p.text) for p in prompts]
    check_lengths(prompts, [len(t) for t in tokens], adapter_max_length(adapter))
    sites, readout_sites = sweep_sites(config, adapter)
    columns = pool_sites(sites, readout_sites)
    if pool is None:
        site_index = torch.tensor([readout_sites.index(s) for s in columns])
        pool = build_pool(adapter, tokens, site_index, config.granularity, progress)
    else:
        expected = (len(prompts), len(columns), adapter.arch.d_model)  # heads too: [d] each
        if tuple(pool.shape) != expected:
            raise ShapeError(f"the pool has shape {tuple(pool.shape)}, expected {expected}")
        pool = pool.to(device=adapter.device)
    return SweepPlan(config, prompts, tokens, sites, readout_sites, pool)


def compute_prompt(
    adapter: TransformerAdapter, plan: SweepPlan, index: int, keep_patches: bool
) -> PromptRows:
    """The clean run (run with its group's: :mod:`causalnet.hydra.cleanruns`), the batched
    ablated runs and the rows of prompt ``plan.prompts[index]``."""
    config, prompt = plan.config, plan.prompts[index]
    clean = plan.clean_runs.take(adapter, plan.tokens, config.granularity, index)
    values, source_rows = ablation_values(config, plan.pool, index)
    if any("+" in s for s in plan.sites):  # sets: one value per member, all from one source
        columns = pool_sites(plan.sites, plan.readout_sites)
        values = values[member_columns(plan.sites, columns).to(values.device)]
    patched = adapter.patch(clean, plan.sites, values.to(clean.site_values.dtype))
    source_ids = [plan.prompts[j].id for j in source_rows]
    effects, readouts, patches, patch_effects = prompt_tables(
        adapter, prompt, clean, patched, plan.sites, plan.readout_sites, source_ids, keep_patches
    )
    return PromptRows(index, prompt.id, effects, readouts, patches, patch_effects)


def prompt_tables(
    adapter: TransformerAdapter,
    prompt: Prompt,
    clean: CleanRun,
    patched: PatchedRun,
    sites: list[str],
    readout_sites: list[str],
    source_ids: list[PromptId],
    keep_patches: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None, pd.DataFrame]:
    """The rows of one prompt: effects (per site), readouts (per site and readout), with
    ``keep_patches`` per-patch readouts (Figure 1), and per-patch effects (per site and patch:
    the total effect, the ablated site's own direct effect and the repair split)."""
    dec = decompose(
        sites,
        readout_sites,
        clean.direct_effects.double().cpu(),
        patched.direct_effects.double().cpu(),
        patched.total_effect.double().cpu(),
        adapter.arch.parallel_residual,
    )
    split = split_repair(
        sites,
        readout_sites,
        clean.direct_effects.double().cpu(),
        patched.direct_effects.double().cpu(),
        float(clean.sigma),
        patched.sigma.double().cpu(),
        dec.total,
        adapter.arch.parallel_residual,
    )
    te_sigma = total_at_clean_sigma(
        patched.centred_logit.double().cpu(),
        float(clean.centred_logit),
        float(clean.readout_const),
        float(clean.sigma),
        patched.sigma.double().cpu(),
    )
    target = int(clean.target)
    true_token = attribute_first_token(adapter, prompt.attribute)
    r_index = {r: j for j, r in enumerate(readout_sites)}
    de_clean = clean.direct_effects.double().cpu()
    de_abl = patched.direct_effects.double().cpu()
    parsed = [parse_unit(s) for s in sites]
    mixers = bool(getattr(adapter.arch, "mixer_blocks", False))
    own_clean = [sum(float(de_clean[r_index[m]]) for m in members(s)) for s in sites]
    effects = pd.DataFrame(
        {
            "prompt_id": [prompt.id] * len(sites),
            "site": sites,
            "kind": [p.kind for p in parsed],  # "set" for a set; its layer: the earliest
            "layer": [p.layer for p in parsed],
            "head": [p.head for p in parsed],
            "target_token": target,
            "target_str": adapter.tokenizer.decode([target]),
            "target_is_true": true_token is not None and target == true_token,
            "direct_effect": own_clean,
            "total_effect": dec.total.mean(1).numpy(),
            "total_effect_std": dec.total.std(1, unbiased=False).numpy(),
            "direct_effect_ablated_self": dec.delta_self.mean(1).numpy() + own_clean,
            "compensatory_effect": dec.compensatory.mean(1).numpy(),
            # a model of one-part blocks has no attention / MLP part: NaN, not applicable
            "compensatory_attn": _part(dec.compensatory_attn, mixers).mean(1).numpy(),
            "compensatory_mlp": _part(dec.compensatory_mlp, mixers).mean(1).numpy(),
            "delta_de_upstream": dec.delta_upstream.mean(1).numpy(),
            "clean_centred_logit": float(clean.centred_logit),
            "sources": ",".join(str(s) for s in source_ids),
            **{
                name: part.mean(1).numpy()
                for name, part in _repair_columns(split, te_sigma, mixers)
            },
        }
    )
    n_s, n_p, n_r = de_abl.shape
    patch_sources = source_ids if source_ids else list(range(n_p))
    patch_effects = pd.DataFrame(
        {
            "prompt_id": [prompt.id] * (n_s * n_p),
            "site": [s for s in sites for _ in range(n_p)],
            "patch": [p for _ in range(n_s) for p in range(n_p)],
            "source_id": [str(patch_sources[p]) for _ in range(n_s) for p in range(n_p)],
            "total_effect": dec.total.reshape(-1).numpy(),
            "direct_effect_ablated_self": (
                dec.delta_self + torch.tensor(own_clean, dtype=torch.float64)[:, None]
            )
            .reshape(-1)
            .numpy(),
            **{
                name: part.reshape(-1).numpy()
                for name, part in _repair_columns(split, te_sigma, mixers)
            },
            "sigma_ratio": split.sigma_ratio.reshape(-1).numpy(),
        }
    )
    readouts = pd.DataFrame(
        {
            "prompt_id": [prompt.id] * (n_s * n_r),
            "ablated_site": [s for s in sites for _ in range(n_r)],
            "readout_site": readout_sites * n_s,
            "direct_effect_clean": de_clean.repeat(n_s).numpy(),
            "direct_effect_ablated": de_abl.mean(1).reshape(-1).numpy(),
            "delta_de": dec.delta_de.mean(1).reshape(-1).numpy(),
        }
    )
    if not keep_patches:
        return effects, readouts, None, patch_effects
    patches = pd.DataFrame(
        {
            "prompt_id": [prompt.id] * (n_s * n_p * n_r),
            "ablated_site": [s for s in sites for _ in range(n_p * n_r)],
            "patch": [p for _ in range(n_s) for p in range(n_p) for _ in range(n_r)],
            "source_id": [
                str(patch_sources[p]) for _ in range(n_s) for p in range(n_p) for _ in range(n_r)
            ],
            "readout_site": readout_sites * (n_s * n_p),
            "direct_effect_ablated": de_abl.reshape(-1).numpy(),
        }
    )
    return effects, readouts, patches, patch_effects


def _part(part: Tensor, mixers: bool) -> Tensor:
    """An attention or MLP part of the compensation, or NaN (not applicable) in a model of
    one-part blocks (docs/conventions.md, "A model without attention")."""
    return torch.full_like(part, float("nan")) if mixers else part


def _repair_columns(
    split: RepairSplit, te_sigma: Tensor, mixers: bool = False
) -> list[tuple[str, Tensor]]:
    """The repair columns of the effects and patch-effects tables, [S, P] each."""
    return [
        ("repair_attn", _part(split.repair_attn, mixers)),
        ("repair_mlp", _part(split.repair_mlp, mixers)),
        ("repair_norm", split.repair_norm),
        ("repair_sibling", split.repair_sibling),
        ("total_effect_sigma_clean", te_sigma),
    ]


def attribute_first_token(adapter: TransformerAdapter, attribute: str | None) -> int | None:
    """The first token of " " + attribute (no special tokens), or None without an attribute."""
    if not attribute:
        return None
    ids = adapter.tokenizer(" " + attribute, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids else None


def adapter_max_length(adapter: TransformerAdapter) -> int:
    """The longest prompt the model takes (its context length; a model of recurrent one-part
    blocks, Mamba, has none: it reads any length through its state)."""
    cfg = adapter.model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    if getattr(adapter.arch, "mixer_blocks", False):
        return sys.maxsize
    raise ResultsError(f"cannot tell the context length of model type {cfg.model_type!r}")
