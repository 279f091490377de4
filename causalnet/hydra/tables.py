"""The results tables' columns and rows: pyarrow schemas, row validation, sort keys, prompt-id keys.

:class:`~causalnet.hydra.store.ResultsStore` writes each finished prompt's rows through
:func:`to_arrow` (validated, cast to the table's fixed column types, sorted by
:func:`site_sort_key`) and names its shard files by :func:`encode_prompt_id`.

**Tables** (all effects in centred logits of the target token i,
the argmax of the clean logits at the last position, Eqs 9, 10):

- ``effects`` (per prompt and ablated site k): ``prompt_id`` (int64 or string), ``site``
  (``embed``, ``attn.l``, ``mlp.l``, ``attn.l.hH``), ``kind`` (``embed|attn|head|mlp``),
  ``layer`` (int64, -1 for embed), ``head`` (int64, -1 unless a head), ``target_token``
  (int64), ``target_str``, ``target_is_true`` (bool: i is the first token of " " + the true
  attribute), ``direct_effect`` (k's clean Delta_unembed, Eq 10), ``total_effect``
  (Delta_ablate, Eq 12, mean over patches, Eq 39), ``total_effect_std`` (over patches),
  ``direct_effect_ablated_self`` (k's own direct effect in its ablated runs, Eq 13, mean),
  ``compensatory_effect`` (CE, Eq 33, mean), ``compensatory_attn``, ``compensatory_mlp`` (its
  attention and MLP parts), ``delta_de_upstream`` (sum of Delta_DE, Eq 34, over the embedding
  and the non-downstream sites), ``clean_centred_logit``, ``sources`` (the patches' source
  prompt ids joined with ","; empty without resampling); the repair split
  (``docs/conventions.md``, "The repair, split"; means over patches): ``repair_attn``,
  ``repair_mlp`` (value parts of the downstream attention / MLP sites), ``repair_norm`` (scale
  parts of every site but k), ``repair_sibling`` (value parts of k's non-downstream siblings;
  0 to rounding but under a norm after the attention), ``total_effect_sigma_clean`` (the total
  effect at the clean final scale, do(sigma = clean)). All floats float64. Folders written
  before the repair split lack these five columns (all or none; one folder never mixes the two).
  In a model of one-part blocks (sites ``embed`` and ``mixer.l``: Mamba) the compensation has no
  attention and no MLP part: ``compensatory_attn``, ``compensatory_mlp``, ``repair_attn`` and
  ``repair_mlp`` (:data:`NOT_APPLICABLE`) hold NaN, ``compensatory_effect`` is the downstream
  mixers' part and the mixers' value part of the repair is ``total_effect + removed -
  repair_norm - repair_sibling``. Only a prompt with no attention, head or MLP row may hold
  NaN, and only there; every other float is finite.
- ``readouts`` (per prompt, ablated site and readout site l): ``prompt_id``, ``ablated_site``,
  ``readout_site``, ``direct_effect_clean`` (Eq 10), ``direct_effect_ablated`` (Eq 13, mean
  over patches), ``delta_de`` (Eq 34, mean over patches).
- ``patches`` (optional, per prompt, ablated site, patch and readout site): ``prompt_id``,
  ``ablated_site``, ``patch`` (int64, 0-based), ``source_id`` (string, null when none),
  ``readout_site``, ``direct_effect_ablated`` (Eq 13, that patch's run).
- ``patch_effects`` (optional, per prompt, ablated site and patch): ``prompt_id``, ``site``,
  ``patch``, ``source_id``, ``total_effect``, ``direct_effect_ablated_self``, the five repair
  columns of ``effects`` for that patch's run, ``sigma_ratio`` (sigma' / sigma).

``<key>`` encodes the prompt id reversibly: ``i<int>`` for an int id, ``s<base64url of the
UTF-8 string>`` for a str id, so the completed ids are read from file names alone.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import ResultsError, UnknownNodeError
from ..sites import parse_unit, unit_sort_key

PromptId = int | str

_FLOAT = pa.float64()
_INT = pa.int64()
_STR = pa.string()


def _fields(prompt_id_type: pa.DataType, spec: list[tuple[str, pa.DataType]]) -> pa.Schema:
    return pa.schema(
        [pa.field("prompt_id", prompt_id_type, nullable=False)]
        + [pa.field(name, t, nullable=(name == "source_id")) for name, t in spec]
    )


_EFFECTS_SPEC = [
    ("site", _STR),
    ("kind", _STR),
    ("layer", _INT),
    ("head", _INT),
    ("target_token", _INT),
    ("target_str", _STR),
    ("target_is_true", pa.bool_()),
    ("direct_effect", _FLOAT),
    ("total_effect", _FLOAT),
    ("total_effect_std", _FLOAT),
    ("direct_effect_ablated_self", _FLOAT),
    ("compensatory_effect", _FLOAT),
    ("compensatory_attn", _FLOAT),
    ("compensatory_mlp", _FLOAT),
    ("delta_de_upstream", _FLOAT),
    ("clean_centred_logit", _FLOAT),
    ("sources", _STR),
]
#: The effects columns added with the repair split (absent, all five, from older folders).
REPAIR_COLUMNS = (
    "repair_attn",
    "repair_mlp",
    "repair_norm",
    "repair_sibling",
    "total_effect_sigma_clean",
)
_EFFECTS_SPEC += [(name, _FLOAT) for name in REPAIR_COLUMNS]
#: The attention / MLP parts of the compensation: NaN (not applicable) in a model of mixers.
NOT_APPLICABLE = ("compensatory_attn", "compensatory_mlp", "repair_attn", "repair_mlp")
_READOUTS_SPEC = [
    ("ablated_site", _STR),
    ("readout_site", _STR),
    ("direct_effect_clean", _FLOAT),
    ("direct_effect_ablated", _FLOAT),
    ("delta_de", _FLOAT),
]
_PATCHES_SPEC = [
    ("ablated_site", _STR),
    ("patch", _INT),
    ("source_id", _STR),
    ("readout_site", _STR),
    ("direct_effect_ablated", _FLOAT),
]
_PATCH_EFFECTS_SPEC = [
    ("site", _STR),
    ("patch", _INT),
    ("source_id", _STR),
    ("total_effect", _FLOAT),
    ("direct_effect_ablated_self", _FLOAT),
    *[(name, _FLOAT) for name in REPAIR_COLUMNS],
    ("sigma_ratio", _FLOAT),
]

#: Column types of the three tables, for int prompt ids (str ids: ``prompt_id`` is a string).
EFFECTS_SCHEMA = _fields(_INT, _EFFECTS_SPEC)
READOUTS_SCHEMA = _fields(_INT, _READOUTS_SPEC)
PATCHES_SCHEMA = _fields(_INT, _PATCHES_SPEC)
PATCH_EFFECTS_SCHEMA = _fields(_INT, _PATCH_EFFECTS_SPEC)


@dataclass(frozen=True)
class Table:
    """One results table: its columns, which of them hold site names and which identify a row."""

    name: str
    spec: list[tuple[str, pa.DataType]]
    sites: tuple[str, ...]  # columns holding site names, in sort order
    key: tuple[str, ...]  # columns that identify a row within a prompt
    optional: bool = False  # a prompt may have no shard of this table
    legacy: tuple[str, ...] = ()  # columns that older folders lack (all of them)

    def spec_of(self, legacy: bool) -> list[tuple[str, pa.DataType]]:
        return [f for f in self.spec if f[0] not in self.legacy] if legacy else self.spec

    def schema(self, id_type: type, legacy: bool = False) -> pa.Schema:
        return _fields(_INT if id_type is int else _STR, self.spec_of(legacy))

    def is_legacy(self, schema: pa.Schema, id_type: type) -> bool:
        """Whether a shard's schema is this table's older one; ResultsError if neither."""
        for legacy in (False, True) if self.legacy else (False,):
            if schema.equals(self.schema(id_type, legacy)):
                return legacy
        raise ResultsError(f"columns {schema} are not the {self.name} table's")


#: The four tables of a results folder, by name (also the shard and file name suffixes).
TABLES = {
    "effects": Table("effects", _EFFECTS_SPEC, ("site",), ("site",), legacy=REPAIR_COLUMNS),
    "readouts": Table(
        "readouts",
        _READOUTS_SPEC,
        ("ablated_site", "readout_site"),
        ("ablated_site", "readout_site"),
    ),
    "patches": Table(
        "patches",
        _PATCHES_SPEC,
        ("ablated_site", "readout_site"),
        ("ablated_site", "patch", "readout_site"),
        optional=True,
    ),
    "patch_effects": Table(
        "patch_effects", _PATCH_EFFECTS_SPEC, ("site",), ("site", "patch"), optional=True
    ),
}

_INT64 = (-(2**63), 2**63 - 1)


def site_sort_key(name: str) -> tuple[int, int, int, int, str]:
    """Residual order of a site: ``embed``, then per layer ``attn.l``, its heads, ``mlp.l``; a
    set of sites (``a+b``) right after its earliest member."""
    return unit_sort_key(name)


def encode_prompt_id(prompt_id: PromptId) -> str:
    """The file-name key of a prompt id (``i<int>`` or ``s<base64url>``); see the module doc."""
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, int | str):
        raise ResultsError(f"prompt id {prompt_id!r} must be an int or a str")
    if isinstance(prompt_id, int):
        if not _INT64[0] <= prompt_id <= _INT64[1]:
            raise ResultsError(f"prompt id {prompt_id} does not fit the int64 prompt_id column")
        return f"i{prompt_id}"
    try:
        raw = prompt_id.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ResultsError(
            f"prompt id {prompt_id!r} is not valid Unicode text (a lone surrogate at "
            f"character {err.start}); it cannot be stored"
        ) from err
    key = "s" + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")
    if len(key) > 200:
        raise ResultsError(f"prompt id {prompt_id[:40]!r}... is too long for a shard file name")
    return key


def decode_prompt_id(key: str) -> PromptId:
    """Inverse of :func:`encode_prompt_id`; ResultsError for a key it did not write."""
    try:
        if key.startswith("i"):
            return int(key[1:])
        if key.startswith("s"):
            raw = key[1:] + "=" * (-len(key[1:]) % 4)
            return base64.urlsafe_b64decode(raw.encode("ascii")).decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError) as err:
        raise ResultsError(f"shard key {key!r} does not encode a prompt id: {err}") from err
    raise ResultsError(f"shard key {key!r} does not encode a prompt id")


def to_arrow(table: Table, frame: pd.DataFrame, prompt_id: PromptId) -> pa.Table:
    """Validate one prompt's rows of ``table``, sort them, and cast them to the table's schema."""
    where = f"prompt {prompt_id!r}, {table.name} rows"
    if not isinstance(frame, pd.DataFrame):
        raise ResultsError(f"{where}: expected a pandas DataFrame, got {type(frame).__name__}")
    if len(frame) == 0:
        raise ResultsError(f"{where}: no rows")
    frame = frame.reset_index(drop=True)
    if "prompt_id" in frame.columns:
        ids = pd.unique(frame["prompt_id"])
        if len(ids) != 1 or ids[0] != prompt_id or isinstance(ids[0], bool | np.bool_):
            raise ResultsError(
                f"{where}: column prompt_id holds {pd.Series(ids).tolist()[:5]}, not {prompt_id!r}"
            )
    legacy = bool(table.legacy) and not any(c in frame.columns for c in table.legacy)
    spec = table.spec_of(legacy)
    wanted = [name for name, _ in spec]
    missing = [c for c in wanted if c not in frame.columns]
    extra = [c for c in frame.columns if c not in wanted and c != "prompt_id"]
    if missing or extra:
        raise ResultsError(f"{where}: missing columns {missing}, unexpected columns {extra}")
    frame = frame[wanted].copy()
    frame.insert(0, "prompt_id", [prompt_id] * len(frame))
    for col in table.sites:
        for name in pd.unique(frame[col]):
            if not isinstance(name, str):
                raise ResultsError(f"{where}: column {col} holds {name!r}, not a site name")
            try:
                parse_unit(name)
            except UnknownNodeError as err:
                raise ResultsError(f"{where}: column {col}: {err}") from err
    if table.name == "effects":
        _check_effects_sites(frame, where)
        frame["sources"] = [
            ",".join(str(s) for s in v) if isinstance(v, list | tuple | np.ndarray) else v
            for v in frame["sources"]
        ]
    if table.name in ("patches", "patch_effects"):
        frame["source_id"] = [None if _is_missing(v) else str(v) for v in frame["source_id"]]
    check_duplicates(table, frame, where)
    sort_cols = []
    for col in table.key:
        if col in table.sites:
            order = {s: site_sort_key(s) for s in pd.unique(frame[col])}
            ranked = sorted(order, key=order.__getitem__)
            frame[f"_{col}_rank"] = frame[col].map({s: i for i, s in enumerate(ranked)})
            sort_cols.append(f"_{col}_rank")
        else:
            sort_cols.append(col)
    frame = frame.sort_values(sort_cols, kind="stable").drop(
        columns=[c for c in sort_cols if c.startswith("_")]
    )
    no_parts = _without_attention(frame, table)
    for name, dtype in spec:
        if dtype == _FLOAT:
            try:
                values = np.asarray(frame[name], dtype=np.float64)
            except (TypeError, ValueError) as err:
                raise ResultsError(f"{where}: column {name} is not numeric: {err}") from err
            if no_parts and name in NOT_APPLICABLE:
                values = np.where(np.isnan(values), 0.0, values)  # not applicable: NaN allowed
            if not np.isfinite(values).all():
                bad = frame.iloc[int(np.flatnonzero(~np.isfinite(values))[0])]
                raise ResultsError(
                    f"{where}: column {name} is not finite at "
                    + ", ".join(f"{c}={bad[c]!r}" for c in table.key)
                )
    schema = table.schema(type(prompt_id), legacy)
    nan_parts = [c for c in NOT_APPLICABLE if no_parts and c in frame.columns]
    kept = {c: np.asarray(frame[c], dtype=np.float64) for c in nan_parts}
    try:
        arrow = pa.Table.from_pandas(
            frame.fillna({c: 0.0 for c in nan_parts}),
            schema=schema,
            preserve_index=False,
            safe=True,
        )
    except (pa.ArrowException, TypeError, ValueError) as err:
        raise ResultsError(f"{where}: values do not fit the column types: {err}") from err
    for c, values in kept.items():  # NaN as a float, not as a null (pandas' reading)
        i = arrow.schema.get_field_index(c)
        arrow = arrow.set_column(i, arrow.schema.field(i), pa.array(values, from_pandas=False))
    arrow = arrow.replace_schema_metadata(None)
    return arrow


def _without_attention(frame: pd.DataFrame, table: Table) -> bool:
    """Whether a prompt's rows are of a model of one-part blocks: no ablated site (or set
    member) is an attention layer, a head or an MLP, and one is a mixer."""
    if not table.sites:
        return False
    kinds = {
        m.kind for name in pd.unique(frame[table.sites[0]]) for m in _members(parse_unit(name))
    }
    return "mixer" in kinds and not kinds & {"attn", "head", "mlp"}


def _members(unit: Any) -> tuple[Any, ...]:
    return unit.members if hasattr(unit, "members") else (unit,)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA


def _check_effects_sites(frame: pd.DataFrame, where: str) -> None:
    for row in frame[["site", "kind", "layer", "head"]].drop_duplicates().itertuples():
        site = parse_unit(row.site)  # a set: kind "set", its earliest member's layer, head -1
        if (row.kind, row.layer, row.head) != (site.kind, site.layer, site.head):
            raise ResultsError(
                f"{where}: site {row.site!r} has kind/layer/head {row.kind!r}/{row.layer}/"
                f"{row.head}, expected {site.kind!r}/{site.layer}/{site.head}"
            )


def check_duplicates(table: Table, frame: pd.DataFrame, where: str) -> None:
    dup = frame.duplicated(list(table.key), keep=False)
    if dup.any():
        first = frame.loc[dup, list(table.key)].iloc[0].to_dict()
        raise ResultsError(f"{where}: {int(dup.sum())} duplicate {table.name} rows, e.g. {first}")
