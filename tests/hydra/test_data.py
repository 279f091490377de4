"""Prompt loaders: known_1000, LRE, user files, specs, and the DataErrors for bad input."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import causalnet
from causalnet.errors import CausalNetError, DataError
from causalnet.hydra.data import (
    DEFAULT_LRE_ROOT,
    Prompt,
    check_lengths,
    load_known_1000,
    load_lre,
    load_prompt_file,
    load_prompts,
    lre_relations,
)


def test_known_1000_has_1209_unique_prompts_with_known_ids_and_attributes():
    prompts = load_known_1000()
    assert len(prompts) == 1209
    assert [p.id for p in prompts[:3]] == [0, 1, 2]
    assert len({p.id for p in prompts}) == 1209
    first = prompts[0]
    assert first == Prompt(
        id=0,
        text="Vinson Massif is located in the continent of",
        attribute="Antarctica",
        subject="Vinson Massif",
        relation="P30",
        source="known_1000",
    )
    assert all(p.text.strip() and p.attribute for p in prompts)
    assert all(p.subject in p.text for p in prompts)


def test_lre_fills_the_first_template_with_each_subject():
    prompts = load_lre(relations=["city_in_country"])
    data = json.loads(DEFAULT_LRE_ROOT.joinpath("factual", "city_in_country.json").read_text())
    assert len(prompts) == len(data["samples"])
    p = prompts[1]
    assert p.id == "city_in_country/1"
    assert p.text == data["prompt_templates"][0].replace("{}", data["samples"][1]["subject"])
    assert p.attribute == data["samples"][1]["object"]
    assert (p.relation, p.source) == ("city_in_country", "lre")


def test_lre_template_choice_zero_shot_and_group_qualified_names():
    second = load_lre(relations=["factual/city_in_country"], template_index=1)
    assert second[0].text == "New York City is in the country of"
    zs = load_lre(relations=["city_in_country"], zero_shot=True)
    assert zs[0].text == "New York City is part of the country of"
    with pytest.raises(DataError, match=r"city_in_country\.json.*template_index 5"):
        load_lre(relations=["city_in_country"], template_index=5)


def test_all_47_lre_relations_load_with_unique_ids():
    assert len(lre_relations()) == 47
    prompts = load_prompts("lre")
    assert len(prompts) == 11089
    assert len({p.id for p in prompts}) == len(prompts)


def test_lre_specs_and_unknown_relation():
    two = load_prompts("lre:city_in_country, adj_antonym")
    assert {p.relation for p in two} == {"city_in_country", "adj_antonym"}
    with pytest.raises(DataError, match="unknown LRE relation 'no_such'.*city_in_country"):
        load_prompts("lre:no_such")
    with pytest.raises(DataError, match="unknown LRE relation 'linguistic/city_in_country'"):
        load_lre(relations=["linguistic/city_in_country"])


def test_lre_from_a_given_root_and_a_missing_root(tmp_path):
    (tmp_path / "g").mkdir()
    rel = {
        "name": "r",
        "prompt_templates": ["{} rhymes with"],
        "samples": [{"subject": "cat", "object": "hat"}, {"subject": "dog", "object": "fog"}],
    }
    (tmp_path / "g" / "rhyme.json").write_text(json.dumps(rel))
    prompts = load_lre(root=tmp_path)
    assert [(p.id, p.text, p.attribute) for p in prompts] == [
        ("rhyme/0", "cat rhymes with", "hat"),
        ("rhyme/1", "dog rhymes with", "fog"),
    ]
    with pytest.raises(DataError, match="LRE data folder not found"):
        load_lre(root=tmp_path / "absent")
    rel["samples"].append({"object": "x"})
    (tmp_path / "g" / "rhyme.json").write_text(json.dumps(rel))
    with pytest.raises(DataError, match=r"rhyme\.json sample 2: missing or empty field 'subject'"):
        load_lre(root=tmp_path)


def test_json_file_with_ids_attributes_and_text_alias(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(
        json.dumps(
            [
                {"id": "a", "prompt": "The Eiffel Tower is in", "attribute": "Paris"},
                {"id": "b", "text": "Rome is the capital of", "subject": "Rome"},
            ]
        )
    )
    prompts = load_prompt_file(path)
    assert prompts == [
        Prompt("a", "The Eiffel Tower is in", "Paris", None, None, "mine.json"),
        Prompt("b", "Rome is the capital of", None, "Rome", None, "mine.json"),
    ]
    assert load_prompts(str(path)) == prompts


def test_jsonl_file_defaults_ids_to_record_index_and_skips_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one"}\n\n{"prompt": "two", "relation_id": "P1"}\n')
    prompts = load_prompt_file(path)
    assert [(p.id, p.text, p.relation) for p in prompts] == [(0, "one", None), (1, "two", "P1")]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', r"bad\.jsonl line 2: invalid JSON"),
        ("bad.json", '[{"prompt": "a"},', r"bad\.json: invalid JSON at line 1"),
        ("top.json", '{"prompt": "a"}', r"top\.json: the top level must be a list.*dict"),
        ("empty.json", "[]", r"empty\.json: no prompt records"),
        ("miss.json", '[{"prompt": "a"}, {"id": 7}]', r"miss\.json record 1 \(id 7\): missing"),
        ("blank.json", '[{"prompt": "  \\n "}]', r"blank\.json record 0 \(id 0\).*whitespace"),
        ("type.json", '[{"prompt": 3}]', r"type\.json record 0.*must be a string"),
        ("dup.jsonl", '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}', "duplicate id 1"),
        ("mix.json", '[{"id": 1, "prompt": "a"}, {"id": "x", "prompt": "b"}]', "mix ints"),
        ("float.json", '[{"id": 1.5, "prompt": "a"}]', r"record 0: field 'id' must be an int"),
        ("null.json", '[{"id": null, "prompt": "a"}]', r"record 0: field 'id' is missing"),
        ("rec.jsonl", '{"prompt": "a"}\n[1, 2]\n', r"rec\.jsonl line 2: expected a JSON object"),
        ("attr.json", '[{"prompt": "a", "attribute": 5}]', r"field 'attribute' must be"),
        ("two.json", '[{"prompt": "a", "text": "b"}]', r"two\.json record 0.*disagree"),
        ("bool.json", '[{"id": true, "prompt": "a"}]', r"field 'id' must be an int.*True"),
        ("dups.json", '[{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}]', "duplicate"),
        (
            "big.json",
            '[{"id": 1, "prompt": "a"}, {"id": 9223372036854775808, "prompt": "b"}]',
            r"big\.json record 1: field 'id' is 9223372036854775808, beyond the int64 range",
        ),
        (
            "small.jsonl",
            '{"id": -9223372036854775809, "prompt": "b"}',
            r"small\.jsonl line 1: field 'id' is -9223372036854775809, beyond the int64",
        ),
        (
            "sid.json",
            '[{"id": "ok", "prompt": "a"}, {"id": "x\\ud800", "prompt": "b"}]',
            r"sid\.json record 1: field 'id': the value holds a lone surrogate '\\ud800'",
        ),
        (
            "stext.jsonl",
            '{"id": "ok", "prompt": "a"}\n{"id": "b", "prompt": "Paris \\udc80 is"}\n',
            r"stext\.jsonl line 2 \(id 'b'\): field 'prompt' holds a lone surrogate '\\udc80' at "
            "character 6",
        ),
        (
            "sattr.json",
            '[{"prompt": "a", "attribute": "\\udfff"}]',
            r"record 0 \(id 0\): field 'attribute' holds a lone surrogate",
        ),
        (
            "long.json",
            json.dumps([{"id": "x" * 200, "prompt": "a"}]),
            r"long\.json record 0: field 'id': prompt id 'xxx.* too long for a shard file name",
        ),
    ],
)
def test_malformed_files_raise_data_error_naming_file_and_record(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_prompt_file(path)


def test_missing_file_and_unknown_spec(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_prompt_file(tmp_path / "nope.json")
    with pytest.raises(DataError, match="prompt set 'knwon_1000' is neither"):
        load_prompts("knwon_1000")
    assert issubclass(DataError, CausalNetError)


def test_check_lengths_names_the_offending_prompt():
    prompts = [Prompt(i, f"text {i}", None, None, None, "t.json") for i in range(4)]
    check_lengths(prompts, [3, 8, 1, 8], max_len=8)
    with pytest.raises(DataError, match=r"t\.json prompt id 1 .* 9 tokens.*1 to 8 \(1 more"):
        check_lengths(prompts, [3, 9, 1, 12], max_len=8)
    with pytest.raises(DataError, match="prompt id 2 .* 0 tokens"):
        check_lengths(prompts, [3, 4, 0, 5], max_len=8)
    with pytest.raises(DataError, match="4 prompts but 3 token counts"):
        check_lengths(prompts, [1, 2, 3], max_len=8)


def test_ids_at_the_int64_bounds_load(tmp_path):
    path = tmp_path / "bounds.json"
    path.write_text(json.dumps([{"id": 2**63 - 1, "prompt": "a"}, {"id": -(2**63), "prompt": "b"}]))
    assert [p.id for p in load_prompt_file(path)] == [2**63 - 1, -(2**63)]


def test_a_bad_id_in_the_last_record_fails_the_sweep_before_anything_is_written(tmp_path):
    """The loader checks every record, so a sweep never starts (nor opens its folder) on a set
    whose late prompt cannot be stored."""
    from causalnet.hydra.sweep import SweepConfig, run_sweep
    from tiny_lm import save_tiny_llama

    path = tmp_path / "p.jsonl"
    lines = [json.dumps({"id": i, "prompt": f"prompt number {i} is"}) for i in range(5)]
    path.write_text("\n".join(lines + ['{"id": 18446744073709551616, "prompt": "x"}']) + "\n")
    model = save_tiny_llama(tmp_path / "model")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"p\.jsonl line 6: field 'id' .* beyond the int64"):
        run_sweep(SweepConfig(model=str(model), prompts=str(path), k=2), out, progress=False)
    assert not out.exists()


def test_the_lre_relations_are_package_data_not_a_folder_beside_the_checkout(monkeypatch):
    package = Path(causalnet.__file__).resolve().parent
    files = lre_relations()
    assert len(files) == 47
    for f in files.values():
        assert Path(str(f)).resolve().is_relative_to(package / "data" / "lre")
    assert (package / "data" / "LICENSE-lre").read_text().startswith("MIT License")
    # nothing outside the package is consulted: hide every path outside it from the loader
    real_is_dir = Path.is_dir
    monkeypatch.setattr(
        Path,
        "is_dir",
        lambda self: self.resolve().is_relative_to(package) and real_is_dir(self),
    )
    assert len(load_prompts("lre:city_in_country,adj_antonym")) > 0


@pytest.mark.slow
def test_an_installed_wheel_carries_the_bundled_prompt_sets(tmp_path):
    """Build the wheel from a copy of the sources (pyproject's package-data globs), unpack it
    away from the checkout, and load both bundled prompt sets from it."""
    pytest.importorskip("setuptools")
    root = Path(__file__).resolve().parents[2]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (root / name).exists():
            shutil.copy(root / name, src / name)
    for folder in ("causalnet", "adapters"):
        shutil.copytree(root / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-w", str(wheels), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    site = tmp_path / "site"
    with zipfile.ZipFile(next(wheels.glob("*.whl"))) as whl:
        names = whl.namelist()
        whl.extractall(site)
    assert sum(n.startswith("causalnet/data/lre/") and n.endswith(".json") for n in names) == 47
    assert {"causalnet/data/LICENSE-lre", "causalnet/data/known_1000.json"} <= set(names)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import causalnet; "
        "assert causalnet.__file__.startswith(sys.argv[1]), causalnet.__file__; "
        "from causalnet.hydra.data import load_prompts; "
        "print(len(load_prompts('lre')), len(load_prompts('known_1000')))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(site)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["11089", "1209"]
