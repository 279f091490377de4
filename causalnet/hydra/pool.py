"""The ablation pool of a sweep and the ablation values drawn from it (paper Appendix A).

**The pool** ``[n_prompts, n_sites, d]`` holds every swept prompt's clean final-position value
of every ablated site (:func:`build_pool`). It is computed once per results folder and stored
beside the results as two files, both written atomically:

- ``pool.safetensors``: one tensor ``values`` (safetensors: a JSON header and raw numbers; no
  code can be stored in it, and reading it runs none);
- ``pool.json``: ``{"format": 1, "ids": [...], "sites": [...], "shape": [...], "dtype": ...,
  "sha256": ...}`` -- the prompt ids and sites of the rows and columns, and the sha256 of
  ``pool.safetensors``. Written second, it marks the pool complete: a ``pool.safetensors``
  without it (a kill between the two) is recomputed.

:func:`read_pool` checks both files and raises :class:`~causalnet.errors.ResultsError` for a
truncated, altered or mismatched pool. It never reads ``pool.pt``, the pickle that
causalnet 0.1 wrote: loading a pickle runs whatever code it names, and results folders are
shared. A folder holding ``pool.pt`` is refused with a ResultsError naming the file (such a
folder also lacks the input fingerprints that a resume needs, see
:mod:`causalnet.hydra.fingerprints`); ``causalnet report`` and ``plot`` never read the pool.

**Ablation values** for prompt ``index`` (:func:`ablation_values`), per ablated site:

- ``resample``: the site's values in K *other* prompts' clean runs -- K distinct source prompts
  drawn per prompt, never the prompt itself, seeded by (seed, prompt index), shared by every
  site of the prompt (as :class:`causalnet.ablations.Resample` draws them);
- ``zero``: zeros (one patch);
- ``mean``: the mean over the *other* swept prompts, ``(sum_j pool[j] - pool[index]) / (n - 1)``
  -- the leave-one-out mean of :class:`causalnet.ablations.Mean` (one patch; accumulated in
  float64, then cast to the pool's dtype);
- ``noise``: the prompt's own value plus N(0, std^2) noise, K draws; std is ``noise_std`` or
  else the site's standard deviation over all swept prompts (over prompts and features).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..ablations import Resample
from ..errors import ConfigError, ResultsError
from .config import SweepConfig
from .parallel import map_in_threads, prompt_threads

if TYPE_CHECKING:
    from ..adapters import TransformerAdapter

POOL_FILE = "pool.safetensors"
POOL_INDEX = "pool.json"
#: The pickled pool of causalnet 0.1: never read (module doc).
LEGACY_POOL = "pool.pt"
POOL_FORMAT = 1


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of one prompt: depends on (seed, index) only, so resumes and shards
    draw exactly what an uninterrupted single-process run draws."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


_SUMS: dict[int, tuple[weakref.ref[Tensor], Tensor]] = {}


def _pool_sum(pool: Tensor) -> Tensor:
    """``pool.sum(0)`` in float64, computed once per pool tensor (in chunks of prompts)."""
    key = id(pool)
    hit = _SUMS.get(key)
    if hit is not None and hit[0]() is pool:
        return hit[1]
    total = torch.zeros(pool.shape[1:], dtype=torch.float64, device=pool.device)
    for start in range(0, pool.shape[0], 64):
        total += pool[start : start + 64].sum(0, dtype=torch.float64)
    _SUMS[key] = (weakref.ref(pool, lambda _: _SUMS.pop(key, None)), total)
    return total


def ablation_values(config: SweepConfig, pool: Tensor, index: int) -> tuple[Tensor, list[int]]:
    """Ablation values [n_sites, n_patches, d] for prompt ``index`` and the pool rows used
    (resample only). ``pool`` [n_prompts, n_sites, d]: see the module doc."""
    n, n_sites, d = pool.shape
    gen = prompt_generator(config.seed, index)
    if config.ablation == "resample":
        own = torch.tensor([index])
        sources = Resample.draw_sources(1, n, config.k, gen, own=own)[:, 0]
        return pool[sources.to(pool.device)].transpose(0, 1), [int(s) for s in sources]
    if config.ablation == "zero":
        return torch.zeros(n_sites, 1, d, dtype=pool.dtype, device=pool.device), []
    if config.ablation == "mean":
        if n < 2:
            raise ConfigError("mean ablation averages over the other prompts: needs 2 or more")
        mean = (_pool_sum(pool) - pool[index].double()) / (n - 1)
        return mean.to(pool.dtype).unsqueeze(1), []
    std = (
        pool.std(dim=(0, 2), keepdim=True).transpose(0, 1)
        if config.noise_std is None
        else torch.tensor(config.noise_std, dtype=pool.dtype)
    )
    noise = torch.randn(n_sites, config.k, d, generator=gen, dtype=pool.dtype)
    return pool[index].unsqueeze(1) + std.to(pool.device) * noise.to(pool.device), []


def build_pool(
    adapter: TransformerAdapter,
    tokens: list[Tensor],
    site_index: Tensor,
    granularity: str,
    progress: bool,
) -> Tensor:
    """Clean final-position values of the ablated sites for every prompt: [n, n_sites, d].

    The values of each prompt's clean run (``clean_run(tokens).site_values[site_index]``),
    computed in batches of right-padded prompts without the vocabulary projection
    (:meth:`causalnet.adapters.TransformerAdapter.final_values`; equal up to float rounding),
    batches side by side in threads where :func:`~causalnet.hydra.parallel.prompt_threads`
    allows.
    """
    chunk = 32  # prompts per call: bounds the memory of head-granularity values
    chunks = [tokens[start : start + chunk] for start in range(0, len(tokens), chunk)]

    def values_of(part: list[Tensor]) -> Tensor:
        values = adapter.final_values(part, granularity=granularity)
        return values[:, site_index.to(values.device)]

    threads = prompt_threads(adapter, str(getattr(adapter, "device", "cpu")))
    rows = map_in_threads(values_of, chunks, threads)
    bar = tqdm(rows, total=len(chunks), desc="clean runs (pool)", leave=False, disable=not progress)
    return torch.cat(list(bar))


@dataclass(frozen=True)
class StoredPool:
    """A pool read from a results folder: its rows' prompt ids, its columns' sites, values."""

    ids: list[Any]
    sites: list[str]
    values: Tensor
    folder: Path

    def check(self, ids: list[Any], sites: list[str]) -> None:
        """ResultsError unless the pool was computed for these prompts and sites."""
        if self.ids != ids or self.sites != sites:
            what = "prompts" if self.ids != ids else "sites"
            raise ResultsError(
                f"{self.folder / POOL_FILE} was computed for other {what} than this sweep's; "
                "its results cannot be mixed with new ones: start a new --out folder"
            )


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def save_pool(folder: Path, ids: list[Any], sites: list[str], values: Tensor) -> None:
    """Write ``pool.safetensors`` then ``pool.json`` into ``folder``, each atomically."""
    from safetensors.torch import save_file

    cpu = values.detach().to("cpu").contiguous()
    _atomic(folder / POOL_FILE, lambda tmp: save_file({"values": cpu}, str(tmp)))
    index = {
        "format": POOL_FORMAT,
        "ids": ids,
        "sites": sites,
        "shape": list(cpu.shape),
        "dtype": str(cpu.dtype).removeprefix("torch."),
        "sha256": _sha256(folder / POOL_FILE),
    }
    text = json.dumps(index, ensure_ascii=True) + "\n"
    _atomic(folder / POOL_INDEX, lambda tmp: tmp.write_text(text, encoding="ascii"))


def read_pool(folder: Path) -> StoredPool | None:
    """The pool stored in ``folder``, checked; None when there is none (or only a
    ``pool.safetensors`` whose ``pool.json`` never landed). ResultsError for a legacy
    ``pool.pt`` (never read) and for a damaged or inconsistent pool (module doc)."""
    legacy = folder / LEGACY_POOL
    if legacy.exists():
        raise ResultsError(
            f"{legacy}: a pickled pool (causalnet 0.1, or planted): causalnet never unpickles "
            "files from a results folder, since loading a pickle can run any code. This folder "
            "cannot be resumed; start a new --out folder ('causalnet report' and 'plot' still "
            "read its tables)"
        )
    index_path, values_path = folder / POOL_INDEX, folder / POOL_FILE
    if not index_path.exists():
        return None
    damaged = (
        f"delete {POOL_INDEX} and {POOL_FILE} to recompute the pool from the same model and "
        "prompts (the fingerprints in run.json make sure they are the same)"
    )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        ids, sites, shape = index["ids"], index["sites"], index["shape"]
        dtype, digest = index["dtype"], index["sha256"]
        if index["format"] != POOL_FORMAT or not all(
            isinstance(x, list) for x in (ids, sites, shape)
        ):
            raise ValueError("unknown format")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ResultsError(
            f"{index_path} is unreadable or not a pool index ({err}); {damaged}"
        ) from err
    if not values_path.is_file():
        raise ResultsError(f"{values_path} is missing although {index_path} exists; {damaged}")
    if _sha256(values_path) != digest:
        raise ResultsError(
            f"{values_path} does not match the sha256 in {index_path} (truncated or altered); "
            f"{damaged}"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(values_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ResultsError(
            f"{values_path} is not a readable safetensors file ({err}); {damaged}"
        ) from err
    values = tensors.get("values")
    if (
        set(tensors) != {"values"}
        or values is None
        or list(values.shape) != shape
        or str(values.dtype).removeprefix("torch.") != dtype
        or shape[:2] != [len(ids), len(sites)]
    ):
        raise ResultsError(f"{values_path} does not hold the pool {index_path} describes")
    return StoredPool(ids, sites, values, folder)
