"""Your own decoder (issue 10, section 3): a nanoGPT-style module that is not a transformers model,
its parts named in a Declaration; the same verification runs on it.

Oracles: the module's own logits, and the one-forward-per-patch oracle (1e-4 float32 / 1e-9
float64).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from causalnet.adapters import Declaration, adapt
from causalnet.adapters.verify import check_patching
from causalnet.errors import UnsupportedModelError

D, H, V, L = 32, 4, 50, 3


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_attn = nn.Linear(D, 3 * D)
        self.c_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(D, dim=2)
        q, k, v = (y.view(b, t, H, D // H).transpose(1, 2) for y in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D // H)
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        y = F.softmax(att, dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).reshape(b, t, D))


class Block(nn.Module):
    def __init__(self, parallel: bool) -> None:
        super().__init__()
        self.parallel = parallel
        self.ln_1, self.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention()
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            return x + self.attn(self.ln_1(x)) + self.mlp(self.ln_2(x))
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, parallel: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(16, D)
        self.blocks = nn.ModuleList(Block(parallel) for _ in range(L))
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim == 1:
                    p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


DECL = Declaration(
    embed="wte",
    blocks="blocks",
    attn="attn",
    mlp="mlp",
    final_norm="ln_f",
    unembed="lm_head",
    o_proj="attn.c_proj",
    n_heads=H,
)
TOKENS = torch.tensor([1, 7, 3, 22, 9, 4, 13])


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_a_declared_nanogpt_is_verified_and_patched_exactly(parallel, dtype):
    model = NanoGPT(parallel).to(dtype)
    adapter = adapt(model, declare=DECL)
    assert adapter.arch.parallel_residual is parallel  # measured, not declared
    assert adapter.parts.final_norm.form == "layer" and adapter.head_refusal is None
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert adapter.verification.eq21 <= tol and adapter.verification.readout <= tol
    with torch.no_grad():
        logits = model(TOKENS[None])[0, -1].double()
    clean = adapter.clean_run(TOKENS, "head")
    centred = float(logits[clean.target] - logits.mean())
    assert abs(float(clean.direct_effects.sum()) + clean.readout_const - centred) <= 10 * tol
    for granularity in ("layer", "head"):
        assert check_patching(adapter, TOKENS, granularity) <= (
            1e-4 if dtype == torch.float32 else 1e-9
        )


def test_a_declaration_naming_the_parts_the_wrong_way_round_is_refused():
    swapped = Declaration(
        blocks="blocks", attn="mlp", mlp="attn", final_norm="ln_f", unembed="lm_head"
    )
    with pytest.raises(UnsupportedModelError, match=r"declared attn 'mlp' does not read"):
        adapt(NanoGPT(), declare=swapped)


def test_a_declared_part_that_does_not_exist_is_named():
    bad = Declaration(blocks="layers", attn="attn", mlp="mlp", unembed="lm_head")
    with pytest.raises(UnsupportedModelError, match="'layers' is not a submodule"):
        adapt(NanoGPT(), declare=bad)


def test_without_n_heads_a_declared_model_has_layer_granularity_only():
    decl = Declaration(
        blocks="blocks", attn="attn", mlp="mlp", final_norm="ln_f", unembed="lm_head"
    )
    adapter = adapt(NanoGPT(), declare=decl)
    assert "number of heads is unknown" in adapter.head_refusal
