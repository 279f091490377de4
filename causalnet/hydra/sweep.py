"""The Hydra sweep: every prompt, every site, K patches, every readout (paper Sections 2, 4).

For each prompt x (one cached clean run, then one batched patched pass):

1. target i = argmax of the clean logits at the final position t (Eq 10);
2. direct effect of every readout site in the clean run, final scale frozen (Eq 10);
3. for every ablated site k and patch p: do(site_k = value_p) at position t, and in that run the
   centred target logit (total effect, Eq 12) and every readout site's direct effect at the
   run's own final scale (Eq 13);
4. Delta_DE, the compensatory effect and its attention/MLP split (Eqs 33, 34), via
   :func:`causalnet.hydra.protocol.decompose`.

Ablation values (``CONVENTIONS.md``, Appendix A): ``resample`` -- the site's final-position value
in K other prompts' clean runs (K distinct source prompts drawn per prompt from the swept
prompts, seeded by (seed, prompt index), shared by every site of that prompt); ``zero``; ``mean``
-- the mean of the site's final-position values over the swept prompts; ``noise`` -- the
clean value plus N(0, std^2) noise, K draws, std by default the site's standard deviation over
the swept prompts. The pool of final-position values is computed once per results folder
(``pool.pt``) and reused on resume.
"""

from __future__ import annotations

import fnmatch
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .. import __version__
from ..ablations import Resample
from ..errors import CausalNetError, ResultsError
from ..sites import parse_site
from .data import Prompt, check_lengths, load_prompts
from .protocol import decompose
from .store import ResultsStore

ABLATIONS = ("resample", "zero", "mean", "noise")


@dataclass(frozen=True)
class SweepConfig:
    """Everything that determines a sweep's numbers (stored in ``run.json``)."""

    model: str = "smollm2-135m"
    prompts: str = "known_1000"
    ablation: str = "resample"
    k: int = 15
    seed: int = 0
    granularity: str = "layer"
    sites: str | None = None  # comma-separated names or globs, e.g. "attn.*,mlp.20"
    limit: int | None = None
    noise_std: float | None = None
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.ablation not in ABLATIONS:
            raise CausalNetError(f"ablation {self.ablation!r} is not one of {ABLATIONS}")
        if self.granularity not in ("layer", "head"):
            raise CausalNetError(f"granularity {self.granularity!r} is not 'layer' or 'head'")
        if self.k < 1:
            raise CausalNetError(f"k must be at least 1, got {self.k}")
        if self.limit is not None and self.limit < 1:
            raise CausalNetError(f"limit must be at least 1, got {self.limit}")


def select_sites(all_sites: list[str], spec: str | None) -> list[str]:
    """The sites matching a comma-separated list of names or globs, in residual order."""
    if not spec:
        return list(all_sites)
    patterns = [p.strip() for p in spec.split(",") if p.strip()]
    for pattern in patterns:
        if not fnmatch.filter(all_sites, pattern):
            raise CausalNetError(
                f"--sites pattern {pattern!r} matches no site of this model; sites look like "
                f"{all_sites[0]!r} .. {all_sites[-1]!r}"
            )
    return [s for s in all_sites if any(fnmatch.fnmatchcase(s, p) for p in patterns)]


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of one prompt: depends on (seed, index) only, so resumes and shards
    draw exactly what an uninterrupted single-process run draws."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def ablation_values(config: SweepConfig, pool: Tensor, index: int) -> tuple[Tensor, list[int]]:
    """Ablation values [n_sites, n_patches, d] for prompt ``index`` and the pool rows used.

    ``pool`` [n_prompts, n_sites, d] holds every swept prompt's clean final-position values.
    """
    n, n_sites, d = pool.shape
    gen = prompt_generator(config.seed, index)
    if config.ablation == "resample":
        own = torch.tensor([index])
        sources = Resample.draw_sources(1, n, config.k, gen, own=own)[:, 0]
        return pool[sources.to(pool.device)].transpose(0, 1), [int(s) for s in sources]
    if config.ablation == "zero":
        return torch.zeros(n_sites, 1, d, dtype=pool.dtype, device=pool.device), []
    if config.ablation == "mean":
        return pool.mean(0).unsqueeze(1), []
    std = (
        pool.std(dim=(0, 2), keepdim=True).transpose(0, 1)
        if config.noise_std is None
        else torch.tensor(config.noise_std, dtype=pool.dtype)
    )
    noise = torch.randn(n_sites, config.k, d, generator=gen, dtype=pool.dtype)
    return pool[index].unsqueeze(1) + std.to(pool.device) * noise.to(pool.device), []


def _atomic_torch_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def build_pool(
    adapter: Any, tokens: list[Tensor], site_index: Tensor, granularity: str, progress: bool
) -> Tensor:
    """Clean final-position values of the ablated sites for every prompt: [n, n_sites, d].

    The values of each prompt's clean run (``clean_run(tokens).site_values[site_index]``),
    computed in batches of right-padded prompts without the vocabulary projection
    (:meth:`causalnet.adapters.TransformerAdapter.final_values`; equal up to float rounding).
    """
    from .threads import map_in_threads, prompt_threads  # (imports this module)

    chunk = 32  # prompts per call: bounds the memory of head-granularity values
    chunks = [tokens[start : start + chunk] for start in range(0, len(tokens), chunk)]

    def values_of(part: list[Tensor]) -> Tensor:
        values = adapter.final_values(part, granularity=granularity)
        return values[:, site_index.to(values.device)]

    threads = prompt_threads(adapter, str(getattr(adapter, "device", "cpu")))
    rows = map_in_threads(values_of, chunks, threads)
    bar = tqdm(rows, total=len(chunks), desc="clean runs (pool)", leave=False, disable=not progress)
    return torch.cat(list(bar))


def load_or_build_pool(
    path: Path,
    adapter: Any,
    prompts: list[Prompt],
    tokens: list[Tensor],
    sites: list[str],
    site_index: Tensor,
    granularity: str,
    progress: bool,
) -> Tensor:
    """The pool of clean site values, computed once per results folder and reused on resume."""
    ids = [p.id for p in prompts]
    if path.exists():
        saved = torch.load(path, weights_only=False)
        if saved.get("ids") != ids or saved.get("sites") != sites:
            raise ResultsError(f"{path} was computed for other prompts or sites; remove it")
        return saved["values"]
    values = build_pool(adapter, tokens, site_index, granularity, progress)
    _atomic_torch_save({"ids": ids, "sites": sites, "values": values}, path)
    return values


def prompt_tables(
    adapter: Any,
    prompt: Prompt,
    clean: Any,
    patched: Any,
    sites: list[str],
    readout_sites: list[str],
    source_ids: list[Any],
    keep_patches: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None]:
    """The rows of one prompt: effects (per site), readouts (per site and readout) and, with
    ``keep_patches``, per-patch readouts (Figure 1)."""
    dec = decompose(
        sites,
        readout_sites,
        clean.direct_effects.double().cpu(),
        patched.direct_effects.double().cpu(),
        patched.total_effect.double().cpu(),
        adapter.arch.parallel_residual,
    )
    target = int(clean.target)
    true_token = attribute_first_token(adapter, prompt.attribute)
    r_index = {r: j for j, r in enumerate(readout_sites)}
    de_clean = clean.direct_effects.double().cpu()
    de_abl = patched.direct_effects.double().cpu()
    parsed = [parse_site(s) for s in sites]
    effects = pd.DataFrame(
        {
            "prompt_id": [prompt.id] * len(sites),
            "site": sites,
            "kind": [p.kind for p in parsed],
            "layer": [p.layer for p in parsed],
            "head": [p.head for p in parsed],
            "target_token": target,
            "target_str": adapter.tokenizer.decode([target]),
            "target_is_true": true_token is not None and target == true_token,
            "direct_effect": [float(de_clean[r_index[s]]) for s in sites],
            "total_effect": dec.total.mean(1).numpy(),
            "total_effect_std": dec.total.std(1, unbiased=False).numpy(),
            "direct_effect_ablated_self": dec.delta_self.mean(1).numpy()
            + [float(de_clean[r_index[s]]) for s in sites],
            "compensatory_effect": dec.compensatory.mean(1).numpy(),
            "compensatory_attn": dec.compensatory_attn.mean(1).numpy(),
            "compensatory_mlp": dec.compensatory_mlp.mean(1).numpy(),
            "delta_de_upstream": dec.delta_upstream.mean(1).numpy(),
            "clean_centred_logit": float(clean.centred_logit),
            "sources": ",".join(str(s) for s in source_ids),
        }
    )
    n_s, n_p, n_r = de_abl.shape
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
        return effects, readouts, None
    patch_sources = source_ids if source_ids else list(range(n_p))
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
    return effects, readouts, patches


def attribute_first_token(adapter: Any, attribute: str | None) -> int | None:
    """The first token of " " + attribute (no special tokens), or None without an attribute."""
    if not attribute:
        return None
    ids = adapter.tokenizer(" " + attribute, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if ids else None


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


@dataclass
class PromptRows:
    """One prompt's rows: effects, readouts, and (for figure prompts) per-patch readouts."""

    index: int
    prompt_id: Any
    effects: pd.DataFrame
    readouts: pd.DataFrame
    patches: pd.DataFrame | None


def plan_sweep(
    config: SweepConfig, adapter: Any, pool_path: Path | None = None, progress: bool = False
) -> SweepPlan:
    """Load and check the prompts, pick the sites, and build (or load) the ablation pool."""
    prompts = load_prompts(config.prompts)
    if config.limit is not None:
        prompts = prompts[: config.limit]
    tokens = [adapter.encode(p.text) for p in prompts]
    check_lengths(prompts, [len(t) for t in tokens], adapter_max_length(adapter))
    if config.ablation == "resample" and len(prompts) <= config.k:
        raise CausalNetError(
            f"resample ablation with k={config.k} needs more than {config.k} prompts, "
            f"got {len(prompts)}"
        )
    readout_sites = adapter.readout_sites(config.granularity)
    sites = select_sites(adapter.sites(config.granularity), config.sites)
    site_index = torch.tensor([readout_sites.index(s) for s in sites])
    if pool_path is None:
        pool = build_pool(adapter, tokens, site_index, config.granularity, progress)
    else:
        pool = load_or_build_pool(
            pool_path, adapter, prompts, tokens, sites, site_index, config.granularity, progress
        )
    return SweepPlan(config, prompts, tokens, sites, readout_sites, pool)


def compute_prompt(adapter: Any, plan: SweepPlan, index: int, keep_patches: bool) -> PromptRows:
    """The clean run, the batched ablated runs and the rows of prompt ``plan.prompts[index]``."""
    config, prompt = plan.config, plan.prompts[index]
    clean = adapter.clean_run(plan.tokens[index], granularity=config.granularity)
    values, source_rows = ablation_values(config, plan.pool, index)
    patched = adapter.patch(clean, plan.sites, values.to(clean.site_values.dtype))
    source_ids = [plan.prompts[j].id for j in source_rows]
    effects, readouts, patches = prompt_tables(
        adapter, prompt, clean, patched, plan.sites, plan.readout_sites, source_ids, keep_patches
    )
    return PromptRows(index, prompt.id, effects, readouts, patches)


def run_sweep(
    config: SweepConfig,
    out: str | os.PathLike[str],
    *,
    adapter: Any = None,
    progress: bool = True,
    figure_prompts: int = 1,
    workers: int = 1,
    ray_address: str | None = None,
    executor: Any = None,
) -> Path:
    """Run (or resume) the Hydra sweep into the results folder ``out``; returns its path.

    Results are written per prompt as they are computed (atomically), so a killed sweep resumes
    where it stopped when run again with the same ``config``; different arguments raise
    :class:`ResultsError`. Per-patch readouts are kept for the first ``figure_prompts`` prompts
    (Figure 1/3). ``workers > 1`` or a ``ray_address`` computes the prompts on Ray workers
    (:class:`causalnet.hydra.distributed.RayExecutor`, or the given ``executor``); this process
    still plans, builds the pool and writes every row, so the results are the same.
    ``config.device == "auto"`` spreads the model over all devices (:mod:`.devices`).
    """
    from .devices import load_for_config  # the adapters import transformers: only when sweeping

    if workers < 1:
        raise CausalNetError(f"workers must be at least 1, got {workers}")
    t_start = time.perf_counter()
    out = Path(out)
    store = ResultsStore(out)
    store.open(run_arguments(config), resume=True)
    if adapter is None:
        adapter = load_for_config(config.model, config.dtype, config.device)
    t_loaded = time.perf_counter()
    plan = plan_sweep(config, adapter, out / "pool.pt", progress)
    t_pool = time.perf_counter()

    done = store.completed_ids()
    todo = [i for i, p in enumerate(plan.prompts) if p.id not in done]
    if executor is None and (workers > 1 or ray_address is not None):
        from .distributed import RayExecutor

        executor = RayExecutor(workers=workers, address=ray_address)
    threads = 1
    if executor is None and todo:
        from .threads import compute_in_threads, prompt_threads

        threads = prompt_threads(adapter, config.device)
    if threads > 1:  # prompts side by side, one torch thread each (causalnet.hydra.threads)

        def write_rows(rows: PromptRows) -> None:
            store.write_prompt(rows.prompt_id, rows.effects, rows.readouts, rows.patches)

        compute_in_threads(adapter, plan, todo, write_rows, threads, figure_prompts, progress)
    elif executor is None or not todo:
        for i in tqdm(todo, desc="hydra sweep", unit="prompt", disable=not progress):
            rows = compute_prompt(adapter, plan, i, keep_patches=i < figure_prompts)
            store.write_prompt(rows.prompt_id, rows.effects, rows.readouts, rows.patches)
    else:
        adapter = None  # the workers load their own; let this process's copy go

        def write(rows: PromptRows) -> None:
            store.write_prompt(rows.prompt_id, rows.effects, rows.readouts, rows.patches)

        executor.run(plan, todo, write, figure_prompts=figure_prompts, progress=progress)
    t_end = time.perf_counter()
    store.finalize(
        {
            "n_prompts": len(plan.prompts),
            "n_sites": len(plan.sites),
            "n_readout_sites": len(plan.readout_sites),
            "n_computed_this_run": len(todo),
            "workers": 1 if executor is None else executor.workers,
            "prompt_threads": threads,
            "time_load_s": round(t_loaded - t_start, 3),
            "time_pool_s": round(t_pool - t_loaded, 3),
            "time_sweep_s": round(t_end - t_pool, 3),
            "time_total_s": round(t_end - t_start, 3),
            "s_per_prompt": round((t_end - t_pool) / max(len(todo), 1), 4),
        }
    )
    return out


def run_arguments(config: SweepConfig) -> dict[str, Any]:
    """The arguments that define a results folder (``run.json``)."""
    return {**asdict(config), "library_version": __version__}


def adapter_max_length(adapter: Any) -> int:
    """The longest prompt the model takes (its context length)."""
    cfg = adapter.model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ResultsError(f"cannot tell the context length of model type {cfg.model_type!r}")
