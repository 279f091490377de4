"""Fingerprints of a sweep's inputs, so that a resume never mixes results of different inputs.

``run.json`` stores the sweep's arguments; two more keys say what those arguments pointed to
when the folder was written, and a resume that finds them changed is refused (naming which):

- ``prompts_fingerprint``: the sha256 of the canonical JSON (sorted keys, ASCII) of the swept
  prompts' ``id``, ``text`` and ``attribute``, after ``limit``. Editing a prompt text in place,
  appending prompts that fall under the limit, or swapping the file changes it.
- ``model_fingerprint``: ``<kind>:<sha256>`` of what the weights were read from:

  - ``folder``: a local Hugging Face folder (or ``.gguf`` file): ``config.json`` and the
    tokenizer files in full, and for every weight file its name, its size, its safetensors
    header (names, dtypes, shapes, offsets) and 16 evenly spaced 64 KiB samples of its bytes
    -- at most ~1 MiB read per file, so cheap for a 70B model, and a swap of weights of the
    same shapes (a fine-tune, another seed) is still seen;
  - ``bundled``: the bundled model's verified cache: the sha256 of its weights and config
    recorded in the cache manifest (checked against the files at every load);
  - ``adapter``: a model object passed to :func:`~causalnet.hydra.sweep.run_sweep`: its config,
    every parameter's name, shape and dtype, 64 sampled values per parameter, and the integer
    sum of each parameter's bits (one pass over the weights where they are, exact and
    independent of the summation order, so any changed weight is seen).

Modification times are not used: a folder copied elsewhere keeps its fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ModelError

if TYPE_CHECKING:
    from ..adapters import TransformerAdapter
    from .data import Prompt

#: Suffixes of weight files (sampled) in a model folder.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
#: Small files of a model folder hashed in full: the config and the tokenizer.
CONFIG_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
_SAMPLES = 16
_SAMPLE_BYTES = 1 << 16
_MAX_HEADER = 100 << 20  # safetensors' own limit on the header length
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode()


def prompts_fingerprint(prompts: Iterable[Prompt]) -> str:
    """sha256 (hex) of the prompts' ids, texts and attributes, in order (module doc)."""
    records = [{"id": p.id, "text": p.text, "attribute": p.attribute} for p in prompts]
    return hashlib.sha256(_canonical(records)).hexdigest()


def _safetensors_header(f: Any, path: Path) -> bytes:
    raw = f.read(8)
    if len(raw) < 8:
        raise ModelError(f"{path}: too short for a safetensors file ({len(raw)} bytes)")
    (length,) = struct.unpack("<Q", raw)
    if length > _MAX_HEADER:
        raise ModelError(f"{path}: safetensors header of {length} bytes is not plausible")
    header = f.read(length)
    if len(header) != length:
        raise ModelError(f"{path}: truncated safetensors header")
    return header


def _weight_file_digest(path: Path, h: Any) -> None:
    size = path.stat().st_size
    h.update(_canonical({"name": path.name, "size": size}))
    with open(path, "rb") as f:
        start = 0
        if path.suffix == ".safetensors":
            header = _safetensors_header(f, path)
            h.update(header)
            start = 8 + len(header)
        span = max(size - start, 0)
        step = max((span - _SAMPLE_BYTES) // (_SAMPLES - 1), 1)
        for i in range(_SAMPLES):
            offset = start + min(i * step, max(span - _SAMPLE_BYTES, 0))
            f.seek(offset)
            h.update(f.read(_SAMPLE_BYTES))


def folder_fingerprint(path: str | Path) -> str:
    """``folder:<sha256>`` of a local model folder or ``.gguf`` file (module doc)."""
    path = Path(path).expanduser().resolve()
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
        folder = path.parent
    else:
        folder = path
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        index = sorted(p for p in path.iterdir() if p.name.endswith(".index.json"))
        for p in [folder / name for name in CONFIG_FILES] + index:
            if p.is_file():
                h.update(_canonical({"file": p.name}))
                h.update(p.read_bytes())
    if not files:
        raise ModelError(f"{folder}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) to load")
    for p in files:
        _weight_file_digest(p, h)
    return f"folder:{h.hexdigest()}"


def bundled_fingerprint(name: str) -> str:
    """``bundled:<sha256>`` of a bundled model's verified cache (the weights' and config's
    sha256 in its manifest); call after the model was loaded (the load builds the cache)."""
    from ..adapters.loading import MANIFEST, cache_root

    manifest_path = cache_root() / name.lower() / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        kept = {
            rel: entry["sha256"]
            for rel, entry in files.items()
            if rel == "config.json" or rel in CONFIG_FILES or Path(rel).suffix in WEIGHT_SUFFIXES
        }
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"cannot read the cache manifest {manifest_path}: {err}") from err
    if not kept:
        raise ModelError(f"{manifest_path} lists no weight files")
    return "bundled:" + hashlib.sha256(_canonical(kept)).hexdigest()


def adapter_fingerprint(adapter: TransformerAdapter) -> str:
    """``adapter:<sha256>`` of an in-memory model: config, parameter names, shapes, dtypes, 64
    sampled values and the integer sum of the bits of each parameter (module doc; parameters on
    the ``meta`` device contribute no values)."""
    model = adapter.model
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        cfg = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path",)}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            h.update(_canonical([name, list(param.shape), str(param.dtype)]))
            if param.device.type == "meta" or param.numel() == 0:
                continue
            flat = param.detach().reshape(-1)
            # float64: a float32 linspace rounds the last index of a large parameter (numel
            # 28,311,552: SmolLM2's embedding) up to numel, past the end
            idx = torch.linspace(0, flat.numel() - 1, min(64, flat.numel()), dtype=torch.float64)
            sample = flat[idx.long().to(flat.device)].to("cpu", torch.float64)
            h.update(sample.numpy().tobytes())
            bits = _INT_OF_SIZE.get(flat.element_size())
            if bits is not None:  # every weight's bits summed as integers: exact, any order
                h.update(str(int(flat.view(bits).sum(dtype=torch.int64))).encode())
    return f"adapter:{h.hexdigest()}"


def model_fingerprint(model: str, adapter: TransformerAdapter | None = None) -> str:
    """The fingerprint of the model a sweep computes with: ``adapter`` when one was passed in,
    else the bundled cache or local folder ``model`` names (module doc)."""
    if adapter is not None:
        return adapter_fingerprint(adapter)
    from ..adapters.loading import BUNDLED

    if model.lower() in BUNDLED:
        return bundled_fingerprint(model)
    return folder_fingerprint(model)
