"""Environment variables: one table in the README lists them all, and each is read when used,
so setting it after the module was imported takes effect."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from causalnet.adapters import kernels, loading

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("causalnet", "adapters", "benchmarks", "examples")
_NAME = re.compile(r"\bCAUSALNET_[A-Z][A-Z0-9_]*\b")


def _readme_table() -> dict[str, list[str]]:
    """Rows of the table under ``## Environment variables``: name -> the other cells."""
    section = ROOT.joinpath("README.md").read_text(encoding="utf-8")
    section = section.split("\n## Environment variables\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(CAUSALNET_\w+)`", cells[0]) if len(cells) == 4 else None
        if match:
            rows[match.group(1)] = cells[1:]
    return rows


def _names_in_source() -> dict[str, str]:
    found: dict[str, str] = {}
    for d in SOURCE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            for name in _NAME.findall(path.read_text(encoding="utf-8")):
                found.setdefault(name, path.relative_to(ROOT).as_posix())
    return found


def test_every_causalnet_variable_in_the_source_is_in_the_readme_table():
    table, source = _readme_table(), _names_in_source()
    assert {"CAUSALNET_CACHE", "CAUSALNET_ONEDNN"} <= set(source), "the scan finds the variables"
    assert {n: where for n, where in source.items() if n not in table} == {}
    assert set(table) - set(source) == set(), "a README row for a variable nothing reads"
    for name, (default, effect, where) in table.items():
        assert default and effect, name
        files = re.findall(r"`([\w/]+\.py)`", where)
        assert files and all((ROOT / f).is_file() for f in files), (name, where)
        assert any(name in (ROOT / f).read_text(encoding="utf-8") for f in files), (name, where)


def test_cache_folder_set_after_import_takes_effect(monkeypatch, tmp_path):
    monkeypatch.setenv("CAUSALNET_CACHE", str(tmp_path / "a"))
    assert loading.cache_root() == tmp_path / "a"
    monkeypatch.setenv("CAUSALNET_CACHE", str(tmp_path / "b"))
    assert loading.cache_root() == tmp_path / "b"


def test_onednn_switched_off_after_import_gives_exactly_f_linear(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(7, 24, generator=gen), torch.randn(16, 24, generator=gen), None
    monkeypatch.setenv("CAUSALNET_ONEDNN", "0")
    assert kernels.status() == "torch.nn.functional (oneDNN switched off)"
    assert torch.equal(kernels.linear(x, w, b), F.linear(x, w, b))  # the fallback itself
    assert torch.equal(kernels.linear_silu(x, w, b), F.silu(F.linear(x, w, b)))
    monkeypatch.setenv("CAUSALNET_ONEDNN", "1")
    assert kernels.status() != "torch.nn.functional (oneDNN switched off)"


@pytest.mark.skipif(
    not kernels.status().startswith("oneDNN"), reason="packing is part of the oneDNN path only"
)
def test_packed_weights_switched_after_import_take_effect(monkeypatch):
    x = torch.randn(3, 8)
    monkeypatch.setenv("CAUSALNET_PACKED_WEIGHTS", "off")
    assert kernels.status().endswith("plain weights)")
    w = torch.randn(16, 8)
    held = kernels.packed_bytes()
    kernels.linear(x, w)
    assert kernels.packed_bytes() == held  # no copy made
    monkeypatch.setenv("CAUSALNET_PACKED_WEIGHTS", "1")
    assert kernels.status().endswith("packed weight copies)")
    kernels.linear(x, w)
    assert kernels.packed_bytes() == held + w.numel() * 4  # now packed: one copy, accounted


def test_prompt_threads_set_after_import_take_effect(monkeypatch):
    from causalnet.hydra.parallel import prompt_threads

    monkeypatch.setenv("CAUSALNET_PROMPT_THREADS", "3")
    assert prompt_threads(None, "cpu") == 3
    monkeypatch.setenv("CAUSALNET_PROMPT_THREADS", "1")
    assert prompt_threads(None, "cpu") == 1
