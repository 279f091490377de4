"""Measurements on a model's own forward pass, for :mod:`causalnet.adapters.discover`.

:class:`Recording` hooks every module for one forward and keeps its hidden-state input, its
first output and its number of calls. :func:`measure_roles` tells the attention part of a block
from its MLP part and sequential from parallel residual by perturbation, on one batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from causalnet.errors import UnsupportedModelError

from .hooks import HookSet, call_model, first, hidden_in, tolerance, with_hidden_in

PROBE_SHAPE = (2, 8)  # probe batch and length


class Recording:
    """Every module's hidden-state input and output (of its last call) and number of calls in one
    forward."""

    def __init__(self, model: nn.Module, tokens: Tensor) -> None:
        self.inp: dict[str, Tensor] = {}
        self.out: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {}
        self.order: dict[str, int] = {}
        self.bt = tuple(tokens.shape[:2])
        with HookSet() as hooks:
            for name, module in model.named_modules():
                if module is model:
                    continue
                hooks.pre(module, name, self._pre(name))
                hooks.post(module, name, self._post(name))
            self.logits = call_model(model, tokens)

    def _pre(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            self.order.setdefault(name, len(self.order))
            x = hidden_in(args, kwargs)
            if x is not None:
                self.inp[name] = x.detach().clone()

        return hook

    def _post(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            y = first(output)
            if y is not None and y.ndim == 2 and y.shape[0] == self.bt[0] * self.bt[1]:
                y = y.view(*self.bt, y.shape[-1])  # a part run on the stream as [B*T, d] (OPT)
            if y is not None:
                self.out[name] = y.detach().clone()

        return hook

    def last_call(self, name: str, shape: torch.Size) -> bool:
        """Called more than once, the last call (the one kept) with an input and an output of
        ``shape``: a final norm that also runs elsewhere, such as nanochat's one weightless norm
        applied to the embeddings and again after the last block."""
        return (
            self.calls.get(name, 0) > 1
            and name in self.inp
            and name in self.out
            and self.inp[name].shape == shape
            and self.out[name].shape == shape
        )

    def once(self, name: str, shape: torch.Size) -> bool:
        """Called exactly once, with an input and an output of ``shape``."""
        return (
            self.calls.get(name) == 1
            and name in self.inp
            and name in self.out
            and self.inp[name].shape == shape
            and self.out[name].shape == shape
        )


def measure_roles(
    model: nn.Module, blocks: list[str], pairs: list[tuple], tokens: Tensor
) -> tuple[list[bool], bool]:
    """(per block: whether the pair's first entry is the attention part; parallel residual).

    Measured on one batch: row 0 clean and, per block l, rows perturbing part 1's output at the
    last position t, part 2's output at t, and the block's input before t only."""
    n = len(blocks)
    t = tokens.shape[1] - 1
    batch = tokens[:1].expand(1 + 3 * n, -1).contiguous()
    got: dict[tuple[int, int], Tensor] = {}
    gen = torch.Generator().manual_seed(1)

    def part_hook(layer: int, which: int) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            y = first(output).clone()
            noise = torch.randn(y.shape[-1], generator=gen, dtype=torch.float64)
            y[1 + 3 * layer + which, t] += (noise * float(y[0, t].abs().max())).to(y)
            got[(layer, which)] = y[:, t].detach().double()
            return (y, *output[1:]) if isinstance(output, tuple) else y

        return hook

    def block_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            x = hidden_in(args, kwargs).clone()
            noise = torch.randn(x.shape[1] - 1, x.shape[-1], generator=gen, dtype=torch.float64)
            x[3 + 3 * layer, :t] += (noise * float(x[0].abs().max())).to(x)
            return with_hidden_in(args, kwargs, x)

        return hook

    mods = dict(model.named_modules())
    with HookSet() as hooks:
        for layer, (block, pair) in enumerate(zip(blocks, pairs, strict=True)):
            hooks.pre(mods[block], f"{block}:in", block_hook(layer))
            for which in (0, 1):
                hooks.part(mods[block], mods[pair[which]], pair[which], part_hook(layer, which))
        call_model(model, batch)
        hooks.check()
    tol = tolerance(batch_dtype(model))
    thr = max(100 * tol, 1e-6)

    def moved(layer: int, which: int, row: int) -> bool:
        v = got[(layer, which)]
        return float((v[row] - v[0]).abs().max()) > thr * float(v[0].abs().max() + 1e-30)

    attn_first, parallel = [], []
    for layer, block in enumerate(blocks):
        base = 1 + 3 * layer
        two_reads_one, one_reads_two = moved(layer, 1, base), moved(layer, 0, base + 1)
        prefix = [moved(layer, 0, base + 2), moved(layer, 1, base + 2)]
        names = pairs[layer][:2]
        if two_reads_one and one_reads_two:
            raise UnsupportedModelError(f"block {block}: {names} read each other")
        if two_reads_one or one_reads_two:
            first_part = 0 if two_reads_one else 1
            if not prefix[first_part]:
                raise UnsupportedModelError(
                    f"block {block}: its first sublayer {names[first_part]} does not read earlier "
                    "positions, so it is not an attention"
                )
            attn_first.append(first_part == 0)
            parallel.append(False)
        else:
            if prefix[0] == prefix[1]:
                raise UnsupportedModelError(
                    f"block {block}: parallel sublayers {names} of which "
                    f"{'both' if prefix[0] else 'neither'} read earlier positions"
                )
            attn_first.append(prefix[0])
            parallel.append(True)
    if len(set(parallel)) > 1:
        raise UnsupportedModelError(
            f"blocks mix parallel and sequential residuals (parallel: {parallel})"
        )
    return attn_first, parallel[0]


def batch_dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


def probe_tokens(model: nn.Module, n_vocab: int) -> Tensor:
    """The seeded probe [2, 8] of token ids below min(vocabulary, 1000)."""
    gen = torch.Generator().manual_seed(10)
    dev = next(model.parameters()).device
    return torch.randint(0, min(n_vocab, 1000), PROBE_SHAPE, generator=gen).to(dev)


def subtree(name: str, rec: Recording, shape: torch.Size) -> list[str]:
    """Submodules of ``name`` that ran once with an output of ``shape`` on the recording."""
    return [
        n
        for n in rec.calls
        if n.startswith(name + ".")
        and rec.calls[n] == 1
        and n in rec.out
        and rec.out[n].shape == shape
    ]


def snap_multiplier(value: float, config: Any, tol: float) -> float:
    """A fitted residual multiplier rounded to 1 or the config's ``residual_multiplier``
    (Granite) where it is that within the dtype's rounding; else itself."""
    for cand in (1.0, getattr(config, "residual_multiplier", None)):
        if isinstance(cand, (int, float)) and abs(value - cand) <= max(1e-4, tol) * abs(cand):
            return float(cand)
    return value
