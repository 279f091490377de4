"""Before a sweep: will a model work, how will its numbers be computed, and how long will it take.

``causalnet check --model PATH`` (:func:`preflight`, :func:`preflight_text`) loads the model as
``causalnet hydra`` would and writes nothing. It reports

- the decomposition: the discovered blocks, parts, final norm and readout
  (:meth:`causalnet.adapters.discover.Decomposition.summary`), or the hand-written family;
- how the numbers would be computed (:mod:`causalnet.hydra.provenance`: the verification on a
  probe, the patch path or why the fast one was refused);
- the sites a sweep patches and reads out;
- on the first prompt of the prompt set, the sweep's patches (one per site) against an
  independent oracle: the hooked re-forward of the whole prompt for a discovered model, one
  hooked full forward per site of the Hugging Face model (:func:`causalnet.adapters.naive.
  naive_patch`) for a hand-written family; a disagreement beyond the patching tolerance
  (1e-4 float32, 1e-9 float64 of max(1, |centred logit|)) makes the command exit with status 1;
- the time of prompts computed as the sweep computes them (:func:`causalnet.hydra.plan.
  compute_prompt`: the clean run, K patches of every site, the rows), and the sweep's time
  extrapolated to the prompt set (writing the rows comes on top).

The sample is the first K + 2 prompts and ``n_timed`` + 1 later ones of the first prompt's
token length (else the next ones): the ablation pool is the sample's, so the values differ from
a full sweep's, the work per prompt does not. The first prompt and the first later one run
untimed: the first pays once-per-process costs (kernels built for each row count, the first
allocations), the second lets a discovered model learn that prompts of one length share its
blocks' arguments at t (:func:`causalnet.adapters.replay.arguments_by_length`), as almost every
prompt of a long sweep finds (known_1000's 1,209 prompts have 23 token lengths with SmolLM2's
tokenizer).
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..errors import CausalNetError
from .config import SweepConfig
from .heap import keep_heap_on_cpu
from .plan import compute_prompt, plan_sweep, pool_sites, sweep_prompts
from .pool import ablation_values
from .provenance import REFORWARD, computed_by, describe

#: how close the sweep's patches must come to the oracle, relative to max(1, |centred logit|)
TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


@dataclass
class Preflight:
    """What :func:`preflight` found (module docstring)."""

    model: str
    model_class: str
    dtype: str
    device: str
    decomposition: str
    computed_by: dict[str, Any]
    granularity: str
    sites: list[str]
    n_readout_sites: int
    prompt_id: Any
    n_tokens: int
    oracle: str | None  # None: the patches are the re-forward itself
    disagreement: float | None
    tolerance: float
    k: int
    seconds: list[float]  # per timed prompt
    timed: list[Any]  # the timed prompts' ids
    timed_tokens: list[int]  # and their lengths
    n_prompts: int  # in the prompt set

    @property
    def agrees(self) -> bool:
        return self.disagreement is None or self.disagreement <= self.tolerance


def preflight(config: SweepConfig, adapter: Any = None, n_timed: int = 2) -> Preflight:
    """Load ``config.model`` (unless ``adapter`` is given), check its patches against an oracle
    on the first prompt and time ``n_timed`` prompts as a sweep computes them (module
    docstring). Nothing is written."""
    from .devices import load_for_config  # the adapters import transformers

    if n_timed < 1:
        raise CausalNetError(f"n_timed must be at least 1, got {n_timed}")
    prompts = sweep_prompts(config)
    if adapter is None:
        adapter = load_for_config(config.model, config.dtype, config.device)
    keep_heap_on_cpu(adapter)  # as a sweep's process does
    how = computed_by(adapter)
    base, rest = prompts[: config.k + 2], prompts[config.k + 2 :]
    n0 = len(adapter.encode(base[0].text))
    same = (q for q in rest if len(adapter.encode(q.text)) == n0)
    chosen = list(itertools.islice(same, n_timed + 1))
    if len(chosen) < n_timed + 1:  # too few of the first prompt's length: the next ones
        chosen = rest[: n_timed + 1]
    sample = base + chosen
    plan = plan_sweep(replace(config, limit=None), adapter, prompts=sample)
    oracle, disagreement = _agreement(adapter, plan, how)
    # untimed: the first prompt (once-per-process costs) and a second of its length (a
    # discovered model learns there that prompts of one length share the blocks' arguments)
    for i in (0, len(base)):
        if i < len(sample):
            compute_prompt(adapter, plan, i, False)
    timed = list(range(len(base) + 1, len(sample))) or [1]  # too few prompts: the second
    seconds = []
    for i in timed:
        t0 = time.perf_counter()
        compute_prompt(adapter, plan, i, False)
        seconds.append(time.perf_counter() - t0)
    parts = getattr(adapter, "parts", None)
    arch = adapter.arch
    return Preflight(
        model=config.model,
        model_class=type(adapter.model).__name__,
        dtype=how["dtype"],
        device=str(adapter.device),
        decomposition=parts.summary()
        if parts is not None
        else (
            f"hand-written family {arch.family}: {arch.n_layers} layers, {arch.n_heads} heads "
            f"({arch.n_kv_heads} key/value) of {arch.d_head}, d_model {arch.d_model}"
        ),
        computed_by=how,
        granularity=config.granularity,
        sites=plan.sites,
        n_readout_sites=len(plan.readout_sites),
        prompt_id=plan.prompts[0].id,
        n_tokens=len(plan.tokens[0]),
        oracle=oracle,
        disagreement=disagreement,
        tolerance=TOLERANCE.get(adapter.dtype, 1e-4),
        k=config.k,
        seconds=seconds,
        timed=[plan.prompts[i].id for i in timed],
        timed_tokens=[len(plan.tokens[i]) for i in timed],
        n_prompts=len(prompts),
    )


def _agreement(adapter: Any, plan: Any, how: dict[str, Any]) -> tuple[str | None, float | None]:
    """(the oracle, the largest difference of centred logits, sigmas and direct effects from it
    relative to max(1, |clean centred logit|)) of the sweep's patches of the first prompt, one
    patch per single site; (None, None) where the patches are the re-forward itself (``how``:
    :func:`causalnet.hydra.provenance.computed_by`) or every ablated site is a set (sets are
    patched by the re-forward)."""
    from causalnet.adapters.finalrows import relative_difference
    from causalnet.adapters.naive import naive_patch, naive_readout
    from causalnet.adapters.trace import reforward_patch

    config = plan.config
    columns = pool_sites(plan.sites, plan.readout_sites)
    sites = [s for s in plan.sites if "+" not in s]  # sets (a+b) are re-forwards anyway
    if not sites or how["patching"] == REFORWARD:
        return None, None
    clean = adapter.clean_run(plan.tokens[0], config.granularity)
    values, _ = ablation_values(config, plan.pool, 0)  # [pool columns, K, d]
    rows = torch.tensor([columns.index(s) for s in sites])
    values = values[rows, :1].to(clean.site_values.dtype).contiguous()  # [S, 1, d]
    got = adapter.patch(clean, sites, values)
    if how["decomposition"] == "discovered":
        want = reforward_patch(adapter, clean, [adapter.site(s) for s in sites], values)
        return "the hooked re-forward of the whole prompt", relative_difference(got, want, clean)
    worst = 0.0
    for i, site in enumerate(sites):
        run = naive_patch(adapter, plan.tokens[0], site, values[i], granularity=config.granularity)
        centred, direct, sigma = naive_readout(adapter, run, clean.target)
        for a, b in (
            (got.centred_logit[i], centred),
            (got.sigma[i], sigma),
            (got.direct_effects[i], direct),
        ):
            worst = max(worst, float((a.double() - b.double()).abs().max()))
    return "one hooked full forward of the model per site", worst / max(
        1.0, abs(float(clean.centred_logit))
    )


def preflight_text(p: Preflight) -> str:
    """The report ``causalnet check`` prints."""
    first, last = p.sites[0], p.sites[-1]
    lines = [
        f"model: {p.model} ({p.model_class}, {p.dtype} on {p.device})",
        f"decomposition: {p.decomposition}",
        f"computed by: {describe(p.computed_by)}",
        f"sites: {len(p.sites)} at {p.granularity} granularity ({first} ... {last}), each read "
        f"out at {p.n_readout_sites}",
    ]
    singles = sum("+" not in s for s in p.sites)
    each_site = "site" if singles == len(p.sites) else f"single site ({singles} of {len(p.sites)})"
    where = f"prompt {p.prompt_id!r} ({p.n_tokens} tokens), one patch per {each_site}"
    if p.oracle is None:
        lines.append(f"agreement on {where}: not compared (the patches are the re-forward)")
    else:
        verdict = "agrees" if p.agrees else "DISAGREES"
        lines.append(
            f"agreement on {where}: {verdict} with {p.oracle} to {p.disagreement:.1e} of "
            f"max(1, |centred logit|) (tolerance {p.tolerance:.0e})"
        )
    each = statistics.median(p.seconds)
    lines.append(
        f"time per prompt as a sweep computes it (clean run, K={p.k} patches of every site, the "
        f"rows): {', '.join(f'{s:.2f}' for s in p.seconds)} s; "
        f"{p.n_prompts:,} prompts: about {each * p.n_prompts / 60:.1f} min, writing aside"
    )
    return "\n".join(lines) + "\n"
