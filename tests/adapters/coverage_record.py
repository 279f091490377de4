"""The recorded coverage walk (``docs/coverage.json``) as the slow coverage tests read it."""

from __future__ import annotations

import json
from pathlib import Path

RECORD = json.loads(
    (Path(__file__).resolve().parents[2] / "docs" / "coverage.json").read_text(encoding="utf-8")
)


def working(adapter: str | None = None) -> list[str]:
    """The model types that work (at head or only at layer granularity) in the record; with
    ``adapter``, only those adapted by that class (e.g. ``"GenericAdapter"``)."""
    return [
        r["model_type"]
        for r in RECORD["rows"]
        if r["status"] in ("works (heads)", "layer granularity only")
        and (adapter is None or r["adapter"] == adapter)
    ]
