"""Prompt sets for the Hydra sweep: Counterfact known_1000, the LRE relations, a user's file.

Every loader returns a list of :class:`Prompt`. The protocol reads the model at the final
position of ``Prompt.text`` (paper Section 2.2: subject and relation only, no object); the
true object is kept as ``Prompt.attribute`` so the sweep can record whether the model's
maximum-likelihood token (Eq 10) is the first token of ``" " + attribute``.

Sources (provenance and licenses in ``causalnet/data/README.md``):

- ``known_1000``: the 1,209 Counterfact "known facts" prompts (Meng et al. 2022), bundled as
  package data; ``id`` is the record's ``known_id``.
- ``lre``: the 47 relations of Hernandez et al. 2023, bundled as package data
  (``causalnet/data/lre/<group>/<name>.json``, read with :mod:`importlib.resources`, so an
  installed wheel has them) or read from a folder of the same layout; each sample's subject
  fills the ``{}`` of one of the relation's templates; ``id`` is ``"<file stem>/<sample index>"``.
- a JSON file (a list of objects) or a JSONL file (one object per line) with at least
  ``prompt`` (or ``text``) and optionally ``id`` (or ``known_id``), ``attribute``, ``subject``,
  ``relation`` (or ``relation_id``).

Every malformed input raises :class:`~causalnet.errors.DataError` naming the file and the
record (index, id, or JSONL line), when the prompts are loaded, before a sweep writes anything:
ids must be ints that fit int64 or non-empty strings (no bools, floats or nulls; unique; one
type per set) short enough for a shard file name, and every text field valid Unicode (a lone
surrogate, which JSON's ``\\ud800`` escapes can produce, cannot be written to UTF-8).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import DataError, ResultsError
from .store import encode_prompt_id

try:
    from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10
    from importlib.abc import Traversable

PromptId = int | str

#: The bundled LRE relations: package data ``causalnet/data/lre`` (a Path in an unpacked install).
DEFAULT_LRE_ROOT: Traversable = resources.files("causalnet.data").joinpath("lre")

_INT64 = (-(2**63), 2**63 - 1)


@dataclass(frozen=True)
class Prompt:
    """One prompt of a sweep.

    ``id`` is unique within its set (an ``int`` or a ``str``, never a mix within one set);
    ``attribute`` is the true object (None when unknown); ``source`` names the data set.
    """

    id: PromptId
    text: str
    attribute: str | None
    subject: str | None
    relation: str | None
    source: str


def load_known_1000() -> list[Prompt]:
    """The 1,209 Counterfact known-facts prompts bundled with causalnet (ids = ``known_id``)."""
    ref = resources.files("causalnet.data").joinpath("known_1000.json")
    name = "causalnet/data/known_1000.json"
    try:
        text = ref.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"{name}: cannot read the bundled prompts: {err}") from err
    records = _parse_json_list(text, name)
    prompts = []
    for i, rec in enumerate(records):
        where = f"{name} record {i}"
        _require_mapping(rec, where)
        pid = _id_value(rec.get("known_id"), f"{where}: field 'known_id'")
        where = f"{name} record {i} (known_id {pid!r})"
        prompts.append(
            Prompt(
                id=pid,
                text=_text_value(rec, ("prompt",), where),
                attribute=_optional_str(rec, "attribute", where),
                subject=_optional_str(rec, "subject", where),
                relation=_optional_str(rec, "relation_id", where),
                source="known_1000",
            )
        )
    _check_unique(prompts, name)
    return prompts


def lre_relations(root: str | os.PathLike[str] | None = None) -> dict[str, Traversable]:
    """The LRE relation files (``<group>/<relation>.json``) under ``root``, keyed by file stem
    (``"city_in_country"``), sorted by group and stem.

    ``root`` defaults to the bundled relations (:data:`DEFAULT_LRE_ROOT`). Raises DataError
    when it holds none.
    """
    return {stem: file for stem, (_, file) in _lre_files(root).items()}


def _lre_files(root: str | os.PathLike[str] | None) -> dict[str, tuple[str, Traversable]]:
    base: Traversable = Path(root) if root is not None else DEFAULT_LRE_ROOT
    if not base.is_dir():
        raise DataError(
            f"{base}: LRE data folder not found; pass root= the folder holding "
            "<group>/<relation>.json"
        )
    out: dict[str, tuple[str, Traversable]] = {}
    for group in sorted(base.iterdir(), key=lambda t: t.name):
        if group.name.startswith(".") or not group.is_dir():
            continue
        for f in sorted(group.iterdir(), key=lambda t: t.name):
            if f.name.startswith(".") or not f.name.endswith(".json") or not f.is_file():
                continue
            stem = f.name[: -len(".json")]
            if stem in out:
                raise DataError(f"{f}: relation {stem!r} also defined in {out[stem][1]}")
            out[stem] = (group.name, f)
    if not out:
        raise DataError(f"{base}: no <group>/<relation>.json files in the LRE data folder")
    return out


def load_lre(
    root: str | os.PathLike[str] | None = None,
    relations: Iterable[str] | None = None,
    template_index: int = 0,
    zero_shot: bool = False,
) -> list[Prompt]:
    """Prompts from the LRE relations (Hernandez et al. 2023), all 47 by default.

    ``relations`` names relations by file stem (``"city_in_country"``) or ``"group/stem"``
    (``"factual/city_in_country"``), in the order given; default all, sorted by group and stem.
    Each sample's subject fills the ``{}`` of ``prompt_templates[template_index]`` (or of
    ``prompt_templates_zs`` with ``zero_shot=True``). Ids are ``"<stem>/<sample index>"``,
    ``relation`` the stem, ``attribute`` the sample's object.
    """
    available = _lre_files(root)
    if relations is None:
        chosen = [file for _, file in available.values()]
    else:
        chosen = []
        for name in relations:
            stem = name.split("/")[-1]
            found = available.get(stem)
            if found is None or ("/" in name and f"{found[0]}/{stem}" != name):
                raise DataError(
                    f"unknown LRE relation {name!r}; available: {', '.join(sorted(available))}"
                )
            chosen.append(found[1])
    key = "prompt_templates_zs" if zero_shot else "prompt_templates"
    prompts: list[Prompt] = []
    for path in chosen:
        prompts.extend(_lre_file(path, key, template_index))
    _check_unique(prompts, "LRE relations")
    return prompts


def _lre_file(path: Traversable, key: str, template_index: int) -> list[Prompt]:
    stem = path.name[: -len(".json")]
    data = _parse_json(_read(path), str(path))
    _require_mapping(data, str(path))
    templates = data.get(key)
    if not isinstance(templates, list) or not templates:
        raise DataError(f"{path}: field {key!r} must be a non-empty list of templates")
    if not -len(templates) <= template_index < len(templates):
        raise DataError(
            f"{path}: template_index {template_index} out of range; {key} has "
            f"{len(templates)} template(s): {templates}"
        )
    template = templates[template_index]
    if not isinstance(template, str) or template.count("{}") != 1:
        raise DataError(f"{path}: {key}[{template_index}] = {template!r} must contain one '{{}}'")
    _check_unicode(template, str(path), f"{key}[{template_index}]")
    samples = data.get("samples")
    if not isinstance(samples, list):
        raise DataError(f"{path}: field 'samples' must be a list")
    out = []
    for i, sample in enumerate(samples):
        where = f"{path} sample {i}"
        _require_mapping(sample, where)
        subject = _optional_str(sample, "subject", where)
        if subject is None or not subject.strip():
            raise DataError(f"{where}: missing or empty field 'subject'")
        out.append(
            Prompt(
                id=_id_value(f"{stem}/{i}", f"{where}: id"),
                text=template.replace("{}", subject),
                attribute=_optional_str(sample, "object", where),
                subject=subject,
                relation=stem,
                source="lre",
            )
        )
    return out


def load_prompt_file(path: str | os.PathLike[str]) -> list[Prompt]:
    """Prompts from a user's JSON (a list of objects) or JSONL (``.jsonl``/``.ndjson``) file.

    Each record needs ``prompt`` (or ``text``); optional ``id`` (or ``known_id``; default: the
    record's 0-based index), ``attribute``, ``subject``, ``relation`` (or ``relation_id``).
    Ids must be all ints or all strings, and unique. Blank lines of a JSONL file are skipped.
    """
    p = Path(path)
    text = _read(p)
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        located = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{p} line {lineno}"
            located.append((_parse_json(line, where, one_line=True), where))
    else:
        located = [(rec, f"{p} record {i}") for i, rec in enumerate(_parse_json_list(text, p))]
    if not located:
        raise DataError(f"{p}: no prompt records")
    prompts = []
    for i, (rec, where) in enumerate(located):
        _require_mapping(rec, where)
        raw_id = rec["id"] if "id" in rec else rec.get("known_id", i)
        pid = _id_value(raw_id, f"{where}: field 'id'")
        where = f"{where} (id {pid!r})"
        relation_key = "relation" if "relation" in rec else "relation_id"
        prompts.append(
            Prompt(
                id=pid,
                text=_text_value(rec, ("prompt", "text"), where),
                attribute=_optional_str(rec, "attribute", where),
                subject=_optional_str(rec, "subject", where),
                relation=_optional_str(rec, relation_key, where),
                source=p.name,
            )
        )
    _check_unique(prompts, str(p))
    return prompts


def load_prompts(spec: str) -> list[Prompt]:
    """Resolve a prompt-set spec: ``"known_1000"``, ``"lre"``, ``"lre:<relation>[,<relation>]"``
    (stems or ``group/stem``), or the path of a JSON/JSONL file (:func:`load_prompt_file`)."""
    if spec == "known_1000":
        return load_known_1000()
    if spec == "lre":
        return load_lre()
    if spec.startswith("lre:"):
        names = [n.strip() for n in spec[4:].split(",") if n.strip()]
        if not names:
            raise DataError(f"prompt spec {spec!r} names no LRE relation")
        return load_lre(relations=names)
    if Path(spec).is_file():
        return load_prompt_file(spec)
    raise DataError(
        f"prompt set {spec!r} is neither 'known_1000', 'lre', 'lre:<relation>' nor an "
        "existing JSON/JSONL file"
    )


def check_lengths(prompts: Sequence[Prompt], token_counts: Sequence[int], max_len: int) -> None:
    """Raise DataError if a prompt tokenizes to no token or to more than ``max_len`` tokens.

    ``token_counts[i]`` is the tokenized length of ``prompts[i]`` (the tokenizer lives with the
    model). The message names the first offending prompt (id and source) and how many offend.
    """
    if len(prompts) != len(token_counts):
        raise DataError(
            f"{len(prompts)} prompts but {len(token_counts)} token counts; they must pair up"
        )
    bad = [(p, n) for p, n in zip(prompts, token_counts, strict=True) if n < 1 or n > max_len]
    if bad:
        p, n = bad[0]
        more = f" ({len(bad) - 1} more prompt(s) too)" if len(bad) > 1 else ""
        raise DataError(
            f"{p.source} prompt id {p.id!r} ({p.text[:60]!r}) has {n} tokens; the model "
            f"takes 1 to {max_len}{more}"
        )


# ---- helpers --------------------------------------------------------------------------------


def _read(path: Traversable) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise DataError(f"{path}: file not found") from err
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read as UTF-8 text: {err}") from err


def _parse_json(text: str, where: str, one_line: bool = False) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        at = f"column {err.colno}" if one_line else f"line {err.lineno} column {err.colno}"
        raise DataError(f"{where}: invalid JSON at {at}: {err.msg}") from err


def _parse_json_list(text: str, name: str | Path) -> list[Any]:
    data = _parse_json(text, str(name))
    if not isinstance(data, list):
        raise DataError(
            f"{name}: the top level must be a list of prompt objects, got {type(data).__name__}"
        )
    return data


def _require_mapping(rec: Any, where: str) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")


def _id_value(value: Any, where: str) -> PromptId:
    """A prompt id the results store can write (checked here, before any prompt is run)."""
    if value is None:
        raise DataError(f"{where} is missing or null")
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DataError(f"{where} must be an int or a string, got {value!r}")
    if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
        raise DataError(f"{where} is {value}, beyond the int64 range of the prompt_id column")
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where} is an empty string")
        _check_unicode(value, where, None)
    try:
        encode_prompt_id(value)
    except ResultsError as err:
        raise DataError(f"{where}: {err}") from err
    return value


def _check_unicode(value: str, where: str, field: str | None) -> None:
    """DataError for a string holding a lone surrogate (not writable as UTF-8)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        what = f"field {field!r}" if field else "the value"
        raise DataError(
            f"{where}: {what} holds a lone surrogate {value[err.start]!r} at character "
            f"{err.start}, not valid Unicode text ({value[:40]!r})"
        ) from err


def _text_value(rec: dict[str, Any], keys: tuple[str, ...], where: str) -> str:
    present = [k for k in keys if k in rec]
    if not present:
        raise DataError(f"{where}: missing field {' or '.join(repr(k) for k in keys)}")
    values = {rec[k] for k in present if isinstance(rec[k], str)}
    if len(values) > 1:
        raise DataError(f"{where}: fields {present} disagree; give one prompt text")
    text = rec[present[0]]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {present[0]!r} must be a string, got {text!r}")
    if not text.strip():
        raise DataError(f"{where}: field {present[0]!r} is empty or whitespace only")
    _check_unicode(text, where, present[0])
    return text


def _optional_str(rec: dict[str, Any], key: str, where: str) -> str | None:
    value = rec.get(key)
    if value is None:
        return value
    if isinstance(value, str):
        _check_unicode(value, where, key)
        return value
    raise DataError(f"{where}: field {key!r} must be a string or null, got {value!r}")


def _check_unique(prompts: Sequence[Prompt], name: str) -> None:
    seen: dict[PromptId, int] = {}
    kinds = {type(p.id) for p in prompts}
    if len(kinds) > 1:
        first_str = next(i for i, p in enumerate(prompts) if isinstance(p.id, str))
        first_int = next(i for i, p in enumerate(prompts) if isinstance(p.id, int))
        raise DataError(
            f"{name}: ids mix ints and strings (record {first_int} id {prompts[first_int].id!r}, "
            f"record {first_str} id {prompts[first_str].id!r}); use one type"
        )
    for i, p in enumerate(prompts):
        if p.id in seen:
            raise DataError(f"{name}: duplicate id {p.id!r} in records {seen[p.id]} and {i}")
        seen[p.id] = i
