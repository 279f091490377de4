"""Small helpers for hooking a model's own modules: what a module reads and writes, in one place.

A Hugging Face decoder layer is called ``layer(hidden_states, ...)`` or
``layer(hidden_states=..., ...)``; an attention module may return a tuple whose first element is
its output. :func:`hidden_in` / :func:`with_hidden_in` read and replace the hidden-state input of
a forward pre-hook (``with_kwargs=True``); :func:`first` / :func:`with_first` the output of a
forward hook. :class:`HookSet` registers hooks, counts their calls and raises if one that must
fire did not: a hook that silently does nothing would turn an intervention into a no-op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from causalnet.errors import InterventionError

from .fullcache import cache_kwargs

#: Comparison tolerances relative to the scale of what is compared, per dtype (docs/conventions.md,
#: "Tolerances": 1e-5 in float32, 1e-10 in float64; half precision is checked at 1e-2).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance of identities computed in ``dtype``."""
    return TOLERANCE.get(dtype, 1e-5)


def first(x: Any) -> Tensor | None:
    """A module's output tensor: the output itself or the first element of a tuple/list."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], Tensor):
        return x[0]
    return None


def with_first(x: Any, new: Tensor) -> Any:
    """``x`` with its output tensor (see :func:`first`) replaced by ``new``."""
    if isinstance(x, Tensor):
        return new
    return type(x)([new, *x[1:]]) if isinstance(x, list) else (new, *x[1:])


def hidden_in(args: tuple, kwargs: dict) -> Tensor | None:
    """The hidden-state input of a call: the first positional tensor or ``hidden_states=``."""
    if args and isinstance(args[0], Tensor):
        return args[0]
    value = kwargs.get("hidden_states")
    return value if isinstance(value, Tensor) else None


def with_hidden_in(args: tuple, kwargs: dict, new: Tensor) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with the hidden-state input (see :func:`hidden_in`) replaced."""
    if args and isinstance(args[0], Tensor):
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def rel_err(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want|, in float64 (``inf`` if shapes differ)."""
    if got.shape != want.shape:
        return float("inf")
    want64 = want.detach().double()
    scale = float(want64.abs().max()) if want64.numel() else 0.0
    diff = float((got.detach().double() - want64).abs().max()) if want64.numel() else 0.0
    return diff / max(scale, 1e-30)


class HookSet:
    """Hooks registered for one forward pass, removed on exit; :meth:`check` raises
    InterventionError naming every hook that must fire and did not."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.calls: dict[str, int] = {}

    def _wrap(self, key: str, fn: Callable) -> Callable:
        self.calls.setdefault(key, 0)

        def counted(*a: Any, **k: Any) -> Any:
            self.calls[key] += 1
            return fn(*a, **k)

        return counted

    def pre(self, module: nn.Module, key: str, fn: Callable) -> None:
        """``fn(module, args, kwargs) -> (args, kwargs) | None`` before ``module`` runs."""
        wrapped = self._wrap(key, fn)
        self.handles.append(module.register_forward_pre_hook(wrapped, with_kwargs=True))

    def post(self, module: nn.Module, key: str, fn: Callable) -> None:
        """``fn(module, args, output) -> output | None`` after ``module`` runs."""
        self.handles.append(module.register_forward_hook(self._wrap(key, fn)))

    def part(self, block: nn.Module, module: nn.Module, key: str, fn: Callable) -> None:
        """:meth:`post` on a part of ``block`` whose output may come flattened to [B*T, d]
        (OPT's ``fc2`` runs on the block's stream reshaped to [B*T, d]): ``fn`` sees it as
        [B, T, d] (the block's hidden-state input's leading shape); what it returns goes back
        in the module's own shape."""
        lead: dict[str, torch.Size] = {}

        def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            x = hidden_in(args, kwargs)
            if x is not None and x.ndim == 3:
                lead["bt"] = x.shape[:2]

        def post(mod: nn.Module, args: tuple, output: Any) -> Any:
            y = first(output)
            bt = lead.get("bt")
            if y is None or y.ndim != 2 or bt is None or y.shape[0] != bt[0] * bt[1]:
                return fn(mod, args, output)
            out = fn(mod, args, with_first(output, y.view(*bt, y.shape[-1])))
            return None if out is None else with_first(out, first(out).reshape(y.shape))

        self.handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        self.post(module, key, post)

    def check(self, must_fire: list[str] | None = None) -> None:
        keys = self.calls if must_fire is None else must_fire
        silent = [k for k in keys if self.calls.get(k, 0) == 0]
        if silent:
            raise InterventionError(
                f"hook(s) on {silent} did not fire: the module is not on the model's forward "
                "path, so the intervention or the readout would have been a silent no-op"
            )

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def call_model(
    model: nn.Module,
    tokens: Tensor,
    last_only: bool = False,
    keep: list | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """The model's logits [B, T, V] (or [B, 1, V] with ``last_only`` where the model supports
    ``logits_to_keep``) for token ids [B, T]; no KV cache, unless ``keep`` is a list: then a
    Hugging Face model runs with its cache and ``keep`` receives the cache object it returned
    (None if none). ``positions`` [B]: only row b's logits at ``positions[b]`` are needed; with
    B > 1, a model that slices by transformers' ``logits_to_keep`` as a [B, 1] tensor of
    positions returns those, [B, 1, V], and any other model all of them (its forward runs again
    without the argument where it refused it; an integer-only ``logits_to_keep`` refuses a
    tensor of more than one element, so B = 1 is never sent one). A module that is not a
    Hugging Face model is called as ``model(tokens)`` and may return logits, a tuple or an
    object with ``.logits``."""
    from transformers import PreTrainedModel

    with torch.no_grad():
        if isinstance(model, PreTrainedModel):
            kwargs: dict[str, Any] = {"input_ids": tokens, "use_cache": keep is not None}

            def fresh() -> dict[str, Any]:  # a new plain cache per call where marked (fullcache)
                return {**kwargs, **cache_kwargs(model, kwargs)}

            out = None
            if last_only:
                kwargs["logits_to_keep"] = 1
            elif positions is not None and len(positions) > 1:
                out = _logits_at(model, fresh(), positions, tokens.shape)
            if out is None:
                try:
                    out = model(**fresh())
                except TypeError:
                    kwargs.pop("logits_to_keep", None)
                    out = model(**fresh())
            cache = getattr(out, "past_key_values", None)
        else:
            out, cache = model(tokens), None
    if keep is not None:
        keep.append(cache)
    return _logits(out, model)


#: model classes whose forward did not take ``logits_to_keep`` as a [B, 1] tensor of positions
#: (:func:`call_model` computes all their logits): class -> what happened
POSITIONS_REFUSED: dict[type, str] = {}


def _logits_at(model: nn.Module, kwargs: dict, positions: Tensor, shape: torch.Size) -> Any:
    """The model's output with ``logits_to_keep`` = ``positions`` [B, 1], or None where its
    class refused that or returned logits of another shape (noted, and not asked again)."""
    if type(model) in POSITIONS_REFUSED:
        return None
    try:
        out = model(**kwargs, logits_to_keep=positions[:, None])
    except (TypeError, IndexError, RuntimeError, ValueError) as err:
        POSITIONS_REFUSED[type(model)] = f"{type(err).__name__}: {err}"
        return None
    logits = getattr(out, "logits", None)
    if logits is None or tuple(logits.shape[:2]) != (shape[0], 1):
        got = None if logits is None else tuple(logits.shape)
        POSITIONS_REFUSED[type(model)] = f"logits of shape {got} for tokens {tuple(shape)}"
        return None
    return out


def _logits(out: Any, model: nn.Module) -> Tensor:
    """The logits [B, T', V] of a model's output (an object with ``.logits``, or first)."""
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = first(out)
    if logits is None or logits.ndim != 3:
        raise InterventionError(
            f"{type(model).__name__}(tokens) returned no logits of shape [B, T, V]: "
            f"{type(out).__name__}"
        )
    return logits
