"""Bad input to the sweep, tried as a new user would: each case gets a named error (exit code 2
from the command) or the correct recovery, and nothing already written is lost or changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from causalnet.adapters import load
from causalnet.cli import main
from causalnet.errors import ConfigError, DeviceError, ModelError, ResultsError
from causalnet.hydra.config import MAX_SEED, normalise_paths
from causalnet.hydra.fingerprints import folder_fingerprint, prompts_fingerprint
from causalnet.hydra.store import ResultsStore
from causalnet.hydra.sweep import SweepConfig, run_sweep
from tiny_lm import save_tiny_llama, write_prompts


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bad")
    return save_tiny_llama(root / "model", n_layers=2), write_prompts(root / "prompts.jsonl", 6)


@pytest.fixture(scope="module")
def finished(inputs, tmp_path_factory) -> Path:
    """A finished sweep to resume with changed inputs (copied per test)."""
    model, prompts = inputs
    config = SweepConfig(model=str(model), prompts=str(prompts), k=2)
    return run_sweep(config, tmp_path_factory.mktemp("done") / "r", progress=False)


def _args(model: Path | str, prompts: Path | str, out: Path, *extra: str) -> list[str]:
    return [
        "hydra", "--model", str(model), "--prompts", str(prompts), "--k", "2",
        "--out", str(out), "--no-plots", "--quiet", *extra,
    ]  # fmt: skip


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "results"
    shutil.copytree(folder, out)
    return out


# ---- a failed start leaves the folder as it was ------------------------------------------------


def test_a_typo_in_model_writes_nothing_and_the_corrected_command_runs(inputs, tmp_path, capsys):
    model, prompts = inputs
    out = tmp_path / "r"
    assert main(_args(str(model) + "x", prompts, out)) == 2
    assert "neither a bundled model" in capsys.readouterr().err
    assert not out.exists()
    assert main(_args(model, prompts, out)) == 0
    assert len(ResultsStore(out).load_effects()) == 6 * 4


def test_a_failed_start_in_an_existing_results_folder_changes_nothing(finished, inputs, tmp_path):
    model, prompts = inputs
    out = _copy(finished, tmp_path)
    before = _snapshot(out)
    bad = [
        ["--device", "tpu9"],
        ["--device", "meta"],
        ["--sites", ","],
        ["--workers", "0"],
        ["--limit", "0"],
        ["--seed", str(10**20)],
        ["--sites", "attn.9"],  # no such site: found after the model is loaded
    ]
    if not torch.cuda.is_available():
        bad.append(["--device", "cuda"])
    for extra in bad:
        assert main(_args(model, prompts, out, *extra)) == 2, extra
        assert _snapshot(out) == before, extra
    assert main(_args(str(model) + "x", prompts, out)) == 2
    assert _snapshot(out) == before


# ---- named errors instead of tracebacks ---------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (["--device", "tpu9"], DeviceError, "not a torch device"),
        (["--device", "meta"], DeviceError, "meta"),
        (["--sites", ","], ConfigError, "names no site"),
        (["--sites", " , "], ConfigError, "names no site"),
        (["--workers", "0"], ConfigError, "workers must be at least 1"),
        (["--seed", str(10**20)], ConfigError, "seed must be between 0"),
        (["--seed", "-1"], ConfigError, "seed must be between 0"),
        (["--k", "0"], ConfigError, "k must be"),
    ],
)
def test_bad_options_are_named_errors_with_exit_code_2(
    extra, error, message, inputs, tmp_path, capsys
):
    model, prompts = inputs
    out = tmp_path / "r"
    assert main(_args(model, prompts, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("causalnet: error: ") and message in err and "Traceback" not in err
    assert not out.exists()
    assert issubclass(error, ConfigError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_a_device_error(inputs, tmp_path, capsys):
    model, prompts = inputs
    assert main(_args(model, prompts, tmp_path / "r", "--device", "cuda")) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    config = SweepConfig(model=str(model), prompts=str(prompts), k=2, device="cuda:0")
    with pytest.raises(DeviceError, match="CUDA is not available"):
        run_sweep(config, tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()


def test_a_cuda_index_beyond_the_count_is_a_device_error(inputs, tmp_path):
    from causalnet.hydra.config import check_device_available

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA to count the devices")
    with pytest.raises(DeviceError, match="CUDA device"):
        check_device_available(f"cuda:{torch.cuda.device_count()}")


def test_a_seed_written_as_a_float_is_refused_by_the_parser(inputs, tmp_path, capsys):
    model, prompts = inputs
    with pytest.raises(SystemExit) as exit_info:
        main(_args(model, prompts, tmp_path / "r", "--seed", "1e20"))
    assert exit_info.value.code == 2 and "invalid int value" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dtype", "nope", "dtype must be one of"),
        ("limit", 2.5, "limit must be an int"),
        ("limit", 0, "limit must be at least 1"),
        ("seed", 10**20, "seed must be between 0"),
        ("seed", MAX_SEED + 1, "seed must be between 0"),
        ("k", True, "k must be an int"),
        ("k", "15", "k must be an int"),
        ("ablation", "Mean", "ablation must be one of"),
        ("granularity", None, "granularity must be one of"),
        ("noise_std", "0.1", "noise_std must be a number"),
        ("noise_std", -1.0, "noise_std must be finite and >= 0"),
        ("noise_std", float("inf"), "noise_std must be finite and >= 0"),
        ("model", "", "model must be a non-empty str"),
        ("prompts", 3, "prompts must be a non-empty str"),
        ("sites", ["attn.0"], "sites must be a str or None"),
        ("device", 0, "device must be a str"),
        ("device", "tpu9", "not a torch device"),
    ],
)
def test_every_sweep_config_field_is_checked_when_built(field, value, message):
    with pytest.raises(ConfigError, match=message):
        SweepConfig(**{field: value})


def test_the_largest_seed_draws_for_every_prompt_index():
    from causalnet.hydra.pool import prompt_generator

    SweepConfig(seed=MAX_SEED)  # accepted, and torch takes the seed of a large index
    assert prompt_generator(MAX_SEED, 2**32 - 1).initial_seed() > 0


# ---- a resume never mixes results of different inputs -------------------------------------------


def test_prompt_texts_edited_in_place_refuse_the_resume(finished, inputs, tmp_path):
    model, _ = inputs
    out = _copy(finished, tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    shutil.copy(ResultsStore(out).load_run()["args"]["prompts"], prompts)
    run = json.loads((out / "run.json").read_text())
    run["args"]["prompts"] = str(prompts.resolve())  # the same file, moved with the folder
    (out / "run.json").write_text(json.dumps(run))
    for shard in sorted((out / "shards").glob("*.parquet"))[:3]:
        shard.unlink()  # as if killed mid-sweep
    before = _snapshot(out)
    config = SweepConfig(model=str(model), prompts=str(prompts), k=2)
    lines = prompts.read_text().splitlines()
    record = json.loads(lines[4])
    record["prompt"] = record["prompt"].replace("capital", "largest city")
    prompts.write_text("\n".join([*lines[:4], json.dumps(record), *lines[5:]]) + "\n")
    with pytest.raises(ResultsError, match=r"the prompts \(ids, texts or attributes\) changed"):
        run_sweep(config, out, progress=False)
    assert _snapshot(out) == before
    prompts.write_text("\n".join(lines) + "\n")  # restored: the resume completes
    run_sweep(config, out, progress=False)
    assert len(ResultsStore(out).completed_ids()) == 6


def test_appended_prompts_refuse_the_resume_and_advise_a_new_folder(finished, inputs, tmp_path):
    model, _ = inputs
    prompts = tmp_path / "prompts.jsonl"
    out = _copy(finished, tmp_path)
    shutil.copy(ResultsStore(out).load_run()["args"]["prompts"], prompts)
    write_prompts(prompts, 8)  # two more prompts in the same file
    config = SweepConfig(model=str(model), prompts=str(prompts), k=2)
    run = json.loads((out / "run.json").read_text())
    run["args"]["prompts"] = config.prompts
    (out / "run.json").write_text(json.dumps(run))
    before = _snapshot(out)
    with pytest.raises(ResultsError, match="start a new --out folder") as info:
        run_sweep(config, out, progress=False)
    assert "pool" not in str(info.value) and _snapshot(out) == before


def test_model_weights_swapped_at_the_same_path_refuse_the_resume(finished, inputs, tmp_path):
    _, prompts = inputs
    out = _copy(finished, tmp_path)
    model = tmp_path / "model"
    shutil.copytree(ResultsStore(out).load_run()["args"]["model"], model)
    run = json.loads((out / "run.json").read_text())
    run["args"]["model"] = str(model.resolve())
    run["args"]["model_fingerprint"] = folder_fingerprint(model)
    (out / "run.json").write_text(json.dumps(run))
    config = SweepConfig(model=str(model), prompts=str(prompts), k=2)
    run_sweep(config, out, progress=False)  # the same weights at the new path: resumes
    before = _snapshot(out)
    save_tiny_llama(model, n_layers=2, seed=1)  # other weights, same names, sizes and shapes
    with pytest.raises(ResultsError, match=r"the model \(config or weights\) changed"):
        run_sweep(config, out, progress=False)
    assert _snapshot(out) == before


def test_a_folder_without_fingerprints_is_not_resumed(finished, inputs, tmp_path):
    model, prompts = inputs
    out = _copy(finished, tmp_path)
    run = json.loads((out / "run.json").read_text())
    del run["args"]["prompts_fingerprint"], run["args"]["model_fingerprint"]
    (out / "run.json").write_text(json.dumps(run))
    before = _snapshot(out)
    with pytest.raises(ResultsError, match="older causalnet"):
        run_sweep(SweepConfig(model=str(model), prompts=str(prompts), k=2), out, progress=False)
    assert _snapshot(out) == before


def test_an_in_memory_model_with_other_weights_refuses_the_resume(inputs, tmp_path):
    model, prompts = inputs
    config = SweepConfig(model=str(model), prompts=str(prompts), k=2, limit=4)
    adapter = load(str(model))
    out = run_sweep(config, tmp_path / "r", adapter=adapter, progress=False)
    assert ResultsStore(out).load_run()["args"]["model_fingerprint"].startswith("adapter:")
    run_sweep(config, out, adapter=load(str(model)), progress=False)  # same weights: resumes
    with torch.no_grad():
        adapter.model.model.layers[1].mlp.down_proj.weight[3, 5] += 0.5
    with pytest.raises(ResultsError, match="model"):
        run_sweep(config, out, adapter=adapter, progress=False)


def test_prompt_fingerprint_covers_ids_texts_and_attributes():
    from causalnet.hydra.data import Prompt

    base = Prompt(1, "Paris is in", "France", None, None, "x")
    variants = [
        Prompt(2, "Paris is in", "France", None, None, "x"),
        Prompt(1, "Paris is in ", "France", None, None, "x"),
        Prompt(1, "Paris is in", "Spain", None, None, "x"),
        Prompt(1, "Paris is in", None, None, None, "x"),
    ]
    prints = {prompts_fingerprint([base])} | {prompts_fingerprint([v]) for v in variants}
    assert len(prints) == 5
    same_source = Prompt(1, "Paris is in", "France", "Paris", "P17", "y")  # not what is swept
    assert prompts_fingerprint([same_source]) == prompts_fingerprint([base])


# ---- one model, one path -------------------------------------------------------------------------


def test_relative_and_trailing_slash_paths_are_the_same_run(inputs, tmp_path, monkeypatch):
    model, prompts = inputs
    monkeypatch.chdir(model.parent)
    out = tmp_path / "r"
    assert main(_args("model/", "prompts.jsonl", out, "--limit", "4")) == 0
    args = ResultsStore(out).load_run()["args"]
    assert args["model"] == str(model.resolve()) and args["prompts"] == str(prompts.resolve())
    monkeypatch.chdir(tmp_path)
    assert tmp_path.parent == model.parent.parent  # so the relative path below names the model
    for model_arg in (str(model), str(model) + "/", f"../{model.parent.name}/model/"):
        assert main(_args(model_arg, prompts, out, "--limit", "4")) == 0, model_arg


def test_normalise_paths_leaves_names_alone():
    config = SweepConfig(model="SmolLM2-135M", prompts="lre:capital")
    normal = normalise_paths(config)
    assert normal.model == "smollm2-135m" and normal.prompts == "lre:capital"
    missing = SweepConfig(model="no/such/folder", prompts="known_1000")
    assert normalise_paths(missing) == missing
    with pytest.raises(ModelError, match="no/such/folder"):
        run_sweep(missing, "/nonexistent/never/written", progress=False)


def test_the_bundled_model_fingerprint_follows_its_cache_manifest(tmp_path, monkeypatch):
    """The bundled model is fingerprinted by the sha256 of its weights and config recorded in
    the verified cache manifest: another weights file gives another fingerprint."""
    from causalnet.hydra.fingerprints import model_fingerprint

    monkeypatch.setenv("CAUSALNET_CACHE", str(tmp_path))
    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    files = {
        "config.json": {"size": 10, "sha256": "a" * 64},
        "model.safetensors": {"size": 99, "sha256": "b" * 64},
        "README.md": {"size": 5, "sha256": "c" * 64},
    }
    manifest = {"format": 1, "source": {"gguf": "x.gguf", "size": 1}, "files": files}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    first = model_fingerprint("SmolLM2-135M")
    assert first.startswith("bundled:") and first == model_fingerprint("smollm2-135m")
    files["README.md"]["sha256"] = "d" * 64  # not part of the model
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert model_fingerprint("smollm2-135m") == first
    files["model.safetensors"]["sha256"] = "e" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert model_fingerprint("smollm2-135m") != first
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="manifest"):
        model_fingerprint("smollm2-135m")
