"""Coverage, measured: every causal-LM model type of the installed transformers, adapted or refused.

For each model type of transformers' causal-LM auto mapping, :func:`walk_one` builds the tiny
random model of :mod:`causalnet.adapters.tiny_configs` (float32, CPU) and records one of:

- ``works (heads)``: :func:`causalnet.adapters.adapt` passed its identities (Eq 21 per block,
  logits equal the model's own, direct effects sum to the centred logit; checked inside
  ``adapt``), and ``adapter.patch`` agrees with an independent hooked re-forward of the model
  (one full forward per patch, every site, two random values each) within 1e-4 of the clean
  centred logit's scale in float32 -- at layer AND head granularity;
- ``layer granularity only``: the same at layer granularity; heads refused with the reason;
- ``refused``: ``adapt`` raised UnsupportedModelError; the reason is its message;
- ``out of scope``: not a decoder-only text model (encoder-decoder, multimodal, audio, a
  draft model, or an encoder whose earlier positions read the last token -- measured);
- ``not built``: the tiny config or the model could not be built here (a gap of the walk);
- ``error`` / ``wrong``: an exception other than UnsupportedModelError, or patching that
  disagrees with the oracle: bugs, never expected (the coverage test fails on them).

``python -m causalnet.adapters.coverage`` walks every type and writes ``docs/coverage.json``
(the recorded run), ``docs/coverage.md`` and the README's coverage section between its markers,
all rendered from the record by :func:`render_table` -- never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from causalnet.errors import CausalNetError, ModelError, UnsupportedModelError

from .tiny_configs import causal_lm_types, probe_tokens, scope, tiny_model

STATUSES = (
    "works (heads)",
    "layer granularity only",
    "refused",
    "out of scope",
    "not built",
    "error",
    "wrong",
)
WORKS = ("works (heads)", "layer granularity only")
PATCH_ATOL = 1e-4  # float32, relative to max(1, |clean centred logit|)
README_START = "<!-- coverage:start (written by python -m causalnet.adapters.coverage) -->"
README_END = "<!-- coverage:end -->"


@dataclass(frozen=True)
class CoverageRow:
    """What the walk found for one model type."""

    model_type: str
    model_class: str
    status: str  # one of STATUSES
    reason: str  # why not (empty for "works (heads)")
    adapter: str  # the adapter class that handled it ("" if none)
    patch_error: float | None  # worst patch-vs-oracle difference found (relative)
    seconds: float
    patching: str = ""  # how patches are computed (:func:`patching_of`); "" if it does not work


def patching_of(adapter: object) -> str:
    """How ``adapter`` computes patches: ``fast`` (its final position replayed, the hand-written
    families' cached path or a discovered model's own blocks / recurrent states, checked on a
    probe) or ``re-forward: <why>`` (the exact hooked re-forward of the whole prompt)."""
    refusal = getattr(adapter, "fast_refusal", None)
    return "fast" if refusal is None else f"re-forward: {_short(str(refusal), 160)}"


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def walk_one(model_type: str, seed: int = 0) -> CoverageRow:
    """Build, adapt, verify and patch-check the tiny ``model_type`` (module docstring)."""
    start = time.perf_counter()
    class_name = causal_lm_types()[model_type]

    patching = ""

    def row(status: str, reason: str = "", adapter: str = "", err: float | None = None):
        took = round(time.perf_counter() - start, 2)
        how = patching if status in WORKS else ""
        return CoverageRow(model_type, class_name, status, reason, adapter, err, took, how)

    why = scope(model_type)
    if why is not None:
        return row("out of scope", why)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tiny_model(model_type, seed=seed)
            tokens = probe_tokens(_vocab(model), seed=seed)
            why = non_causal_reason(model, tokens)
    except Exception as e:  # any failure to build is a gap of the walk, recorded as such
        return row("not built", f"{type(e).__name__}: {_short(e)}")
    if why is not None:
        return row("out of scope", why)
    from . import adapt  # noqa: PLC0415 (the package imports this module lazily, if at all)

    try:
        adapter = adapt(model)
    except UnsupportedModelError as e:
        return row("refused", _reason(e))
    except Exception as e:
        return row("error", f"adapt raised {type(e).__name__}: {_short(e)}")
    name = type(adapter).__name__
    try:
        patching = patching_of(adapter)
        worst = patch_error(adapter, tokens, "layer")
        try:
            adapter.clean_run(tokens, granularity="head")
        except ModelError as e:
            if worst > PATCH_ATOL:
                return row("wrong", f"layer patching off by {worst:.2e}", name, worst)
            return row("layer granularity only", _reason(e), name, worst)
        worst = max(worst, patch_error(adapter, tokens, "head"))
    except UnsupportedModelError as e:
        return row("wrong", _reason(e), name)
    except Exception as e:
        return row("error", f"{type(e).__name__}: {_short(e)}", name)
    if worst > PATCH_ATOL:
        return row("wrong", f"patching off by {worst:.2e} (tolerance {PATCH_ATOL:g})", name, worst)
    return row("works (heads)", "", name, worst)


def _vocab(model: torch.nn.Module) -> int:
    out = model.get_output_embeddings()
    n = out.weight.shape[0] if out is not None else model.config.vocab_size
    return min(int(n), 128)


def _reason(err: BaseException) -> str:
    """The part of a refusal that names the cause (without the list of hand-written families)."""
    return _short(str(err).split(". Hand-written families:")[0])


@torch.no_grad()
def non_causal_reason(model: torch.nn.Module, tokens: torch.Tensor) -> str | None:
    """A reason if the built model's logits at earlier positions move when the last token
    changes (beyond float32 rounding: batched expert matmuls differ in the last bits)."""
    logits = model(input_ids=tokens[None]).logits
    if not torch.isfinite(logits).all():
        raise ModelError("the tiny model's logits are not finite")
    other = tokens.clone()
    other[-1] = 3 + (int(other[-1]) - 2) % (_vocab(model) - 3)
    moved = (model(input_ids=other[None]).logits[0, :-1] - logits[0, :-1]).abs().max()
    if float(moved) > 1e-4 * max(1.0, float(logits.abs().max())):  # beyond float32 rounding
        return "not causal: earlier positions' logits depend on the last token (an encoder)"
    return None


@torch.no_grad()
def patch_error(adapter: object, tokens: torch.Tensor, granularity: str) -> float:
    """Worst difference, relative to max(1, |clean centred logit|), between ``adapter.patch``
    and an independent hooked re-forward, over every site and two random values each.

    A discovered adapter is checked by :func:`causalnet.adapters.verify.check_patching` (one
    hooked forward per row, the discovered parts' multipliers applied); a hand-written family
    by :func:`causalnet.adapters.naive.naive_patch`, the Hugging Face model itself hooked
    and read out from its own full logits. Raises UnsupportedModelError beyond 1e-4.
    """
    from .generic import GenericAdapter  # noqa: PLC0415
    from .naive import naive_patch, naive_readout  # noqa: PLC0415
    from .verify import check_patching  # noqa: PLC0415

    if isinstance(adapter, GenericAdapter):
        return check_patching(adapter, tokens, granularity=granularity, n_patches=2)
    clean = adapter.clean_run(tokens, granularity=granularity)
    sites = adapter.sites(granularity)  # heads under a post-attention norm: naive.py's shares
    gen = torch.Generator().manual_seed(1)
    base = torch.stack([clean.value(s) for s in sites])
    noise = torch.randn((len(sites), 2, base.shape[-1]), generator=gen, dtype=base.dtype)
    values = base[:, None] + noise * base.abs().amax(-1, keepdim=True)[:, None]
    run = adapter.patch(clean, sites, values)
    worst = 0.0
    for i, site in enumerate(sites):
        naive = naive_patch(adapter, clean.tokens, site, values[i], clean.position, granularity)
        centred, direct, sigma = naive_readout(adapter, naive, clean.target)
        for got, want in (
            (run.centred_logit[i], centred),
            (run.sigma[i], sigma),
            (run.direct_effects[i], direct),
        ):
            worst = max(worst, float((got - want).abs().max()))
    worst /= max(1.0, abs(float(clean.centred_logit)))
    if worst > PATCH_ATOL:
        raise UnsupportedModelError(
            f"patching vs the naive hooked re-forward: off by {worst:.2e} (tolerance 1e-4)"
        )
    return worst


def walk(model_types: list[str] | None = None, progress: bool = False) -> list[CoverageRow]:
    """:func:`walk_one` over ``model_types`` (default: every causal-LM type), in order."""
    rows = []
    for mt in model_types or list(causal_lm_types()):
        rows.append(walk_one(mt))
        if progress:
            r = rows[-1]
            print(f"{r.model_type:28s} {r.status:24s} {r.seconds:6.2f}s {r.reason[:90]}")
    return rows


def counts(rows: list[CoverageRow]) -> dict[str, int]:
    """Rows per status, in :data:`STATUSES` order, plus ``in scope`` and ``works``."""
    c = Counter(r.status for r in rows)
    out = {s: c[s] for s in STATUSES if c[s] or s in STATUSES[:5]}
    out["in scope"] = len(rows) - c["out of scope"]
    out["works"] = c[WORKS[0]] + c[WORKS[1]]
    return out


def render_table(record: dict) -> str:
    """The Markdown of a recorded run: the counts, then one row per model type."""
    rows = [CoverageRow(**r) for r in record["rows"]]
    n = counts(rows)
    classes = len({r.model_class for r in rows if r.status in WORKS})
    lines = [
        f"Measured by `python -m causalnet.adapters.coverage` on transformers "
        f"{record['transformers']} (torch {record['torch']}, CPU, float32): "
        f"{len(rows)} causal-LM model types in {record['seconds']:.0f} s.",
        "",
        "| status | model types |",
        "| --- | ---: |",
        f"| **works** (exact: identities and patching vs the hooked re-forward) | "
        f"**{n['works']}** ({classes} distinct classes) |",
    ]
    lines += [f"| {s} | {k} |" for s, k in n.items() if s not in ("works", "in scope")]
    lines += [f"| in scope (all but out of scope) | {n['in scope']} |"]
    fast = sum(r.patching == "fast" for r in rows if r.status in WORKS)
    lines += [f"| of those that work: patched at the final position (fast) | {fast} |", ""]
    lines += [
        "| model type | class | status | patching | reason |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        reason = r.reason.replace("|", "\\|")
        how = r.patching.replace("|", "\\|")
        lines.append(f"| `{r.model_type}` | {r.model_class} | {r.status} | {how} | {reason} |")
    return "\n".join(lines) + "\n"


def record_of(rows: list[CoverageRow], seconds: float) -> dict:
    """The JSON record of a walk (what :func:`render_table` reads)."""
    import transformers  # noqa: PLC0415

    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "seconds": round(seconds, 1),
        "rows": [asdict(r) for r in rows],
    }


def readme_section(record: dict) -> str:
    """The README's coverage block: the table inside a collapsed section, between markers."""
    return (
        f"{README_START}\n<details><summary>Coverage table (every causal-LM model type)"
        f"</summary>\n\n{render_table(record)}\n</details>\n{README_END}"
    )


def write(record: dict, json_path: Path, md_path: Path, readme: Path | None) -> None:
    """Write the record, its Markdown, and the README's block between the markers."""
    json_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    md_path.write_text("# Coverage\n\n" + render_table(record), encoding="utf-8")
    if readme is not None:
        text = readme.read_text(encoding="utf-8")
        if README_START not in text or README_END not in text:
            raise CausalNetError(f"{readme} has no coverage markers {README_START!r} ...")
        head, rest = text.split(README_START, 1)
        tail = rest.split(README_END, 1)[1]
        readme.write_text(head + readme_section(record) + tail, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("types", nargs="*", help="model types (default: all)")
    parser.add_argument("--json", default="docs/coverage.json", type=Path)
    parser.add_argument("--md", default="docs/coverage.md", type=Path)
    parser.add_argument("--readme", default="README.md", help="'' to leave it alone")
    parser.add_argument("--update", action="store_true", help="replace only these types' rows")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = walk(args.types or None, progress=True)
    record = record_of(rows, time.perf_counter() - start)
    if args.update:  # re-walked types replace their rows in the existing record
        old = json.loads(args.json.read_text(encoding="utf-8"))
        new = {r["model_type"]: r for r in record["rows"]}
        record = old | {"rows": [new.get(r["model_type"], r) for r in old["rows"]]}
    write(record, args.json, args.md, Path(args.readme) if args.readme else None)
    print({k: v for k, v in counts(rows).items()}, f"{record['seconds']} s")


if __name__ == "__main__":
    main()
