"""Synthetic Hydra results: tables with the sweep's columns whose numbers obey the protocol.

A fake model with ``n_layers`` layers: clean direct effects are random; ablating site s with
patch p scales every non-downstream site by a sigma ratio, leaves s with a small residue, and
lets the downstream sites (``causalnet.sites.is_downstream``) restore ``restore`` times the
direct effect that was removed, spread over them at random. So total = Delta_DE(self) + CE +
Delta_DE(upstream) holds exactly, and CE ~ restore * removed direct effect.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from causalnet.sites import is_downstream, parse_site


def site_names(n_layers: int, n_heads: int = 0) -> list[str]:
    """embed, then per layer attn.l (or its heads attn.l.hH when n_heads > 0) and mlp.l."""
    names = ["embed"]
    for layer in range(n_layers):
        if n_heads:
            names += [f"attn.{layer}.h{h}" for h in range(n_heads)]
        else:
            names.append(f"attn.{layer}")
        names.append(f"mlp.{layer}")
    return names


def synthetic_prompts(
    n_prompts: int = 3,
    n_layers: int = 4,
    n_heads: int = 0,
    n_patches: int = 3,
    restore: float = 0.7,
    seed: int = 0,
    str_ids: bool = False,
) -> dict[object, dict[str, pd.DataFrame]]:
    """Per prompt id: {"effects", "readouts", "patches"} frames, as the sweep would write them."""
    rng = np.random.default_rng(seed)
    sites = site_names(n_layers, n_heads)
    parsed = [parse_site(s) for s in sites]
    n_r = len(sites)
    ids = [f"rel/{i}" if str_ids else i for i in range(n_prompts)]
    out = {}
    for k, pid in enumerate(ids):
        clean = rng.normal(0.0, 1.0, n_r)
        abl = np.empty((n_r, n_patches, n_r))
        for s, site in enumerate(parsed):
            down = np.array([is_downstream(r, site, False) for r in parsed])
            for p in range(n_patches):
                ratio = 1.0 + 0.05 * rng.normal()
                row = clean * ratio
                row[s] = 0.1 * rng.normal()
                removed = clean[s] - row[s]
                if down.any():
                    share = rng.dirichlet(np.ones(down.sum()))
                    row[down] += restore * removed * share + 0.02 * rng.normal(size=down.sum())
                abl[s, p] = row
        delta = abl - clean
        total = delta.sum(-1)  # centred logit = sum of direct effects (+ a constant)
        down_attn = np.zeros((n_r, n_r), bool)
        down_mlp = np.zeros((n_r, n_r), bool)
        for s, site in enumerate(parsed):
            for r, rsite in enumerate(parsed):
                if is_downstream(rsite, site, False):
                    (down_attn if rsite.is_attention else down_mlp)[s, r] = True
        eye = np.eye(n_r, dtype=bool)
        upstream = ~(down_attn | down_mlp | eye)
        ce_attn = (delta * down_attn[:, None, :]).sum(-1)
        ce_mlp = (delta * down_mlp[:, None, :]).sum(-1)
        up = (delta * upstream[:, None, :]).sum(-1)
        others = [ids[(k + 1 + j) % n_prompts] for j in range(n_patches)]
        target = int(rng.integers(0, 50_000))
        effects = pd.DataFrame(
            {
                "prompt_id": pid,
                "site": sites,
                "kind": [s.kind for s in parsed],
                "layer": [s.layer for s in parsed],
                "head": [s.head for s in parsed],
                "target_token": target,
                "target_str": f" tok{target}",
                "target_is_true": bool(rng.integers(0, 2)),
                "direct_effect": clean,
                "total_effect": total.mean(1),
                "total_effect_std": total.std(1),
                "direct_effect_ablated_self": abl[np.arange(n_r), :, np.arange(n_r)].mean(1),
                "compensatory_effect": (ce_attn + ce_mlp).mean(1),
                "compensatory_attn": ce_attn.mean(1),
                "compensatory_mlp": ce_mlp.mean(1),
                "delta_de_upstream": up.mean(1),
                "clean_centred_logit": clean.sum() + 0.5,
                "sources": ",".join(str(i) for i in others),
            }
        )
        readouts = pd.DataFrame(
            {
                "prompt_id": pid,
                "ablated_site": np.repeat(sites, n_r),
                "readout_site": sites * n_r,
                "direct_effect_clean": np.tile(clean, n_r),
                "direct_effect_ablated": abl.mean(1).reshape(-1),
                "delta_de": delta.mean(1).reshape(-1),
            }
        )
        patches = pd.DataFrame(
            {
                "prompt_id": pid,
                "ablated_site": np.repeat(sites, n_patches * n_r),
                "patch": np.tile(np.repeat(np.arange(n_patches), n_r), n_r),
                "source_id": np.tile(np.repeat([str(o) for o in others], n_r), n_r),
                "readout_site": sites * (n_r * n_patches),
                "direct_effect_ablated": abl.reshape(-1),
            }
        )
        out[pid] = {"effects": effects, "readouts": readouts, "patches": patches}
    return out


def synthetic_tables(**kwargs) -> dict[str, pd.DataFrame]:
    """The concatenated effects, readouts and patches tables of :func:`synthetic_prompts`."""
    per_prompt = synthetic_prompts(**kwargs)
    return {
        name: pd.concat([t[name] for t in per_prompt.values()], ignore_index=True)
        for name in ("effects", "readouts", "patches")
    }


@pytest.fixture(scope="session")
def synth() -> SimpleNamespace:
    """The generators, as a fixture (test modules need not import this conftest by name)."""
    return SimpleNamespace(
        prompts=synthetic_prompts, tables=synthetic_tables, site_names=site_names
    )
