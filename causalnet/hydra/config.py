"""What a Hydra sweep is asked to do: :class:`SweepConfig`, checked field by field when built.

Every field is checked for type and value in ``__post_init__``, so a bad value fails where it is
written (``SweepConfig(dtype="nope")``, ``limit=2.5``, ``seed=10**20``, ``device="tpu9"``,
``sites=","``) with a :class:`~causalnet.errors.ConfigError` naming the field, never later as a
raw traceback from torch. What depends on the machine -- whether a CUDA device is present --
is checked when the sweep starts (:func:`check_device_available`), before anything is loaded or
written.

:func:`normalise_paths` gives a local model folder or prompt file its absolute, resolved path,
so ``--model ./m``, ``--model m/`` and ``--model /abs/m`` name the same run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ..errors import ConfigError, DeviceError

#: The ablations of the sweep (see :mod:`causalnet.hydra.pool` for their values).
ABLATIONS = ("resample", "zero", "mean", "noise")
#: The model and activation dtypes a sweep may run in.
DTYPES = ("float32", "float64", "bfloat16", "float16")
#: Prompt sets that name bundled data rather than a file (``lre:<relation>`` too).
NAMED_PROMPT_SETS = ("known_1000", "lre")
#: The largest seed: a prompt's generator is seeded with ``seed * 1_000_003 + index``
#: (:func:`causalnet.hydra.pool.prompt_generator`), which torch takes up to 2**64 - 1; room is
#: left for 2**32 prompt indices.
MAX_SEED = (2**64 - 1 - 2**32) // 1_000_003


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
        for name in ("model", "prompts"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"SweepConfig.{name} must be a non-empty str, got {value!r}")
        _choice("ablation", self.ablation, ABLATIONS)
        _choice("granularity", self.granularity, ("layer", "head"))
        _choice("dtype", self.dtype, DTYPES)
        _int("k", self.k, 1)
        _int("seed", self.seed, 0, MAX_SEED)
        if self.limit is not None:
            _int("limit", self.limit, 1)
        if self.sites is not None:
            if not isinstance(self.sites, str):
                raise ConfigError(f"SweepConfig.sites must be a str or None, got {self.sites!r}")
            if not site_patterns(self.sites):
                raise ConfigError(
                    f"SweepConfig.sites {self.sites!r} names no site; give names or globs such "
                    "as 'attn.*,mlp.3', or leave it out to ablate every site"
                )
        if self.noise_std is not None:
            value = self.noise_std
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"SweepConfig.noise_std must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"SweepConfig.noise_std must be finite and >= 0, got {value}")
        parse_device(self.device)

    @classmethod
    def field_names(cls) -> list[str]:
        """The names of the fields, in order."""
        return [f.name for f in fields(cls)]


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"SweepConfig.{name} must be one of {allowed}, got {value!r}")


def _int(name: str, value: object, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"SweepConfig.{name} must be an int, got {value!r} ({type(value).__name__})"
        )
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"SweepConfig.{name} must be {bound}, got {value}")


def site_patterns(spec: str) -> list[str]:
    """The non-empty names or globs of a comma-separated ``sites`` spec."""
    return [p.strip() for p in spec.split(",") if p.strip()]


def parse_device(device: object) -> torch.device | None:
    """The torch device a ``device`` string names (None for ``"auto"``); DeviceError for a
    string torch does not parse (``"tpu9"``) or for ``"meta"`` (which holds no numbers)."""
    if not isinstance(device, str):
        raise DeviceError(f"SweepConfig.device must be a str, got {device!r}")
    if device == "auto":
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise DeviceError(
            f"device {device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:N' or 'auto' "
            f"({str(err).splitlines()[0]})"
        ) from None
    if parsed.type == "meta":
        raise DeviceError("device 'meta' holds no values and cannot run a sweep; use 'cpu'")
    return parsed


def check_device_available(device: str) -> None:
    """DeviceError unless this machine has ``device`` (checked before a model is loaded)."""
    parsed = parse_device(device)
    if parsed is None or parsed.type == "cpu":
        return
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
            raise DeviceError(
                f"device {device!r}: CUDA is not available on this machine (torch "
                f"{torch.__version__}, {built}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise DeviceError(
                f"device {device!r}: this machine has {count} CUDA device(s), numbered from 0"
            )
        return
    backend = getattr(torch, parsed.type, None)
    if parsed.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise DeviceError(f"device {device!r} is not available on this machine; use 'cpu'")


def _is_bundled(name: str) -> bool:
    from ..adapters.loading import BUNDLED  # (no transformers import)

    return name.lower() in BUNDLED


def normalise_paths(config: SweepConfig) -> SweepConfig:
    """``config`` with a local model path and a prompt file path made absolute and resolved
    (a trailing ``/``, ``./`` or ``~`` then names the same run); a bundled model name lower-cased;
    names of bundled prompt sets and paths that do not exist left as given."""
    model = config.model
    if _is_bundled(model):
        model = model.lower()
    else:
        path = Path(model).expanduser()
        if path.exists():
            model = str(path.resolve())
    prompts = config.prompts
    if prompts not in NAMED_PROMPT_SETS and not prompts.startswith("lre:"):
        path = Path(prompts).expanduser()
        if path.is_file():
            prompts = str(path.resolve())
    if (model, prompts) == (config.model, config.prompts):
        return config
    return replace(config, model=model, prompts=prompts)


def check_model_exists(model: str) -> None:
    """ModelError unless ``model`` is a bundled name or an existing local path (checked before
    anything is written, so a typo in ``--model`` leaves the results folder untouched)."""
    from ..errors import ModelError

    if _is_bundled(model) or Path(model).expanduser().exists():
        return
    from ..adapters.loading import BUNDLED

    raise ModelError(
        f"model {model!r} is neither a bundled model ({', '.join(BUNDLED)}) nor an existing "
        f"local folder or .gguf file (working directory {os.getcwd()}); causalnet never "
        "downloads models"
    )
