"""The readout of a discovered decoder: its final norm and unembedding, identified numerically.

The final norm is identified by fitting the module's own outputs against candidate forms, never
by its class name (:func:`fit_final_norm`):

- ``rms``:   y = g * z / sigma + b,          sigma = sqrt(mean(z ** 2) + eps)
- ``layer``: y = g * (z - mean z) / sigma + b, sigma = sqrt(var(z) + eps)  (biased variance)
- ``none``:  no final norm (sigma = 1, g = 1, b = 0)

with the gain g one of the module's ``weight``, ``1 + weight`` (Gemma) or 1, the bias its
``bias`` or 0, eps from the module or the config, and sigma computed in the model's dtype or in
float32 (Hugging Face's RMSNorms compute in float32 even for a float64 model). A module that
matches no candidate within the dtype's tolerance is refused with the best fit's error.

The readout (Eqs 9, 10, 24-28; docs/conventions.md): the model's pre-cap logits are
``pi = s * (W_U norm(z) + beta)`` (s a logit multiplier: Granite's 1 / logits_scaling), so the
centred logit of token i is  ``sum_sites (c . w_i) / sigma + const_i`` with
``u_i = W_U[i] - mean_j W_U[j]`` and

- rms:   w_i = s * g * u_i,          const_i = s * (b . u_i + beta_i - mean beta)
- layer: w_i = centre(s * g * u_i),  same const_i (the centring over the hidden dimension).
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from causalnet.errors import ModelError, UnsupportedModelError

from .hooks import rel_err, tolerance
from .readout import accumulation_dtype, vocab_mean

NormForm = Literal["rms", "layer", "none"]
_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")
_EPS_CONFIG = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps", "norm_epsilon")


@dataclass
class FinalNorm:
    """The final norm as identified: ``form``, gain and bias (exact tensors of the module, or
    None for 1 and 0), ``eps`` and the dtype sigma is computed in (``compute_dtype``)."""

    module: nn.Module | None
    name: str
    form: NormForm
    gain: Tensor | None
    bias: Tensor | None
    eps: float
    compute_dtype: torch.dtype
    gain_source: str  # "weight", "1 + weight" or "1"
    fit_error: float  # max relative error of the fit on the probe and synthetic inputs

    def scale(self, z: Tensor) -> Tensor:
        """sigma(z) [...] in the readout precision, computed as the module computes it."""
        acc = accumulation_dtype(z.dtype)
        if self.form == "none":
            return torch.ones(z.shape[:-1], dtype=acc, device=z.device)
        x = z.to(self.compute_dtype)
        if self.form == "layer":
            x = x - x.mean(-1, keepdim=True)
        inv = torch.rsqrt(x.pow(2).mean(-1) + self.eps)
        return (1.0 / inv).to(acc)

    def apply(self, z: Tensor) -> Tensor:
        """The norm's output from the identified form (for the fit and the logit check)."""
        if self.form == "none":
            return z
        x = z.to(self.compute_dtype)
        if self.form == "layer":
            x = x - x.mean(-1, keepdim=True)
        y = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(z.dtype)
        if self.gain is not None:
            y = y * self.gain.to(z.dtype)
        if self.bias is not None:
            y = y + self.bias.to(z.dtype)
        return y


def _eps_candidates(module: nn.Module, config: Any) -> list[float]:
    found = [getattr(module, a) for a in _EPS_ATTRS if isinstance(getattr(module, a, None), float)]
    found += [
        getattr(config, a) for a in _EPS_CONFIG if isinstance(getattr(config, a, None), float)
    ]
    return list(dict.fromkeys(found + [1e-5, 1e-6, 1e-12]))


def fit_final_norm(
    module: nn.Module | None,
    name: str,
    inputs: Tensor,
    config: Any = None,
    what: str = "final norm",
) -> FinalNorm:
    """Identify ``module`` (the final norm; None: there is none) from its outputs on the probe's
    final residuals ``inputs`` [N, d] and on synthetic inputs of scales 1e-3 .. 1e2. ``what``
    names the norm in errors (the same fit identifies a norm after the attention,
    :func:`causalnet.adapters.heads.find_post_norm`).

    UnsupportedModelError names the module and the smallest error any candidate form reached.
    """
    dtype = inputs.dtype
    if module is None:
        return FinalNorm(None, "", "none", None, None, 0.0, dtype, "1", 0.0)
    d = inputs.shape[-1]
    gen = torch.Generator().manual_seed(0)
    synth = [torch.randn(16, d, generator=gen, dtype=torch.float64) * s for s in (1e-3, 1, 100)]
    synth_t = torch.cat(synth).to(device=inputs.device, dtype=dtype) + 0.3
    x = torch.cat([inputs.reshape(-1, d), synth_t])
    with torch.no_grad():
        try:
            y = module(x)
        except (TypeError, RuntimeError):  # needs more than one tensor: the probe records only
            x = inputs.reshape(-1, d)
            y = module(x)
    if not isinstance(y, Tensor) or y.shape != x.shape:
        raise UnsupportedModelError(f"{what} {name}: its output is not one tensor like its input")
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    gains: list[tuple[str, Tensor | None]] = [("1", None)]
    if isinstance(weight, Tensor) and weight.shape == (d,):
        gains = [("weight", weight), ("1 + weight", 1 + weight.detach())] + gains
    biases: list[Tensor | None] = [None]
    if isinstance(bias, Tensor) and bias.shape == (d,):
        biases = [bias, None]
    tol = tolerance(dtype)
    best: FinalNorm | None = None
    compute = list(dict.fromkeys([dtype, torch.float32]))
    for form, cd, (src, g), b, eps in itertools.product(
        ("rms", "layer"), compute, gains, biases, _eps_candidates(module, config)
    ):
        cand = FinalNorm(module, name, form, g, b, eps, cd, src, 0.0)  # type: ignore[arg-type]
        with torch.no_grad():
            cand.fit_error = rel_err(cand.apply(x), y)
        if best is None or cand.fit_error < best.fit_error:
            best = cand
    assert best is not None
    if best.fit_error > max(tol, tolerance(best.compute_dtype)):
        raise UnsupportedModelError(
            f"{what} {name} ({type(module).__name__}) is of no known form: the best "
            f"candidate ({best.form}, gain {best.gain_source}, eps {best.eps:g}) misses its "
            f"output by {best.fit_error:.2e} of its scale (tolerance {tol:g}); supported: "
            "RMSNorm, LayerNorm, gains weight or 1 + weight"
        )
    return best


@dataclass
class Readout:
    """The unembedding and what surrounds it: ``logits = cap(s * (W_U (c n) + beta))`` with n
    the final norm's output (c = 1 but in MiniCPM3, which divides n by ``logits_scaling``)."""

    unembed: nn.Module
    weight: Tensor  # W_U [V, d]
    bias: Tensor | None  # beta [V]
    logit_scale: float  # s
    softcap: float | None  # Gemma 2: pi -> c * tanh(pi / c); the readout is before the cap
    input_scale: float = 1.0  # c: the unembedding's input is c times the final norm's output

    def logits(self, unembedded: Tensor) -> Tensor:
        """The model's logits from the unembedding's output (applies s and the cap)."""
        pi = unembedded.to(accumulation_dtype(unembedded.dtype)) * self.logit_scale
        return pi if self.softcap is None else self.softcap * torch.tanh(pi / self.softcap)

    def direction(self, norm: FinalNorm, token: int) -> tuple[Tensor, float]:
        """``(w_i, const_i)`` of token i (module docstring), in the readout precision."""
        try:
            token = operator.index(token)
        except TypeError:
            raise ModelError(f"token must be an integer id, got {token!r}") from None
        n_vocab = self.weight.shape[0]
        if not 0 <= token < n_vocab:
            raise ModelError(f"token {token} is outside the vocabulary [0, {n_vocab})")
        acc = accumulation_dtype(self.weight.dtype)
        with torch.no_grad():
            u = (self.weight[token] - vocab_mean(self.weight)).to(acc) * self.logit_scale
            u = u * self.input_scale
            const = 0.0
            if self.bias is not None:
                const += float(self.bias[token].to(acc) - self.bias.to(acc).mean())
            const *= self.logit_scale
            if norm.bias is not None:
                const += float(norm.bias.to(acc) @ u)
            w = u if norm.gain is None else u * norm.gain.to(acc)
            if norm.form == "layer":
                w = w - w.mean()
        return w, const


def input_scale(x: Tensor, y: Tensor, tol: float) -> float | None:
    """c with ``y = c x`` within ``tol`` of y's scale: 1.0 where y is x, a least-squares c
    where y is a constant times x (MiniCPM3's final norm output / logits_scaling), else None.

    >>> input_scale(torch.ones(3), torch.full((3,), 0.5), 1e-6)
    0.5
    """
    if x.shape != y.shape:
        return None
    if rel_err(x, y) <= tol:
        return 1.0
    xd, yd = x.detach().double(), y.detach().double()
    den = float((xd * xd).sum())
    if den == 0.0:
        return None
    c = float((xd * yd).sum()) / den
    if not math.isfinite(c) or c == 0.0 or rel_err(xd * c, yd) > tol:
        return None
    return c


def fit_readout(
    unembed: nn.Module, x: Tensor, out: Tensor, logits: Tensor, config: Any = None
) -> Readout:
    """Check that ``unembed`` is linear (its output ``out`` = x W_U^T + beta on the probe) and
    find s and the cap with ``logits = cap(s * out)`` (config candidates, then a fitted s).
    UnsupportedModelError says what did not match and by how much."""
    weight = getattr(unembed, "weight", None)
    bias = getattr(unembed, "bias", None)
    name = type(unembed).__name__
    if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        raise UnsupportedModelError(f"the unembedding ({name}) has no weight [V, d]")
    bias = bias if isinstance(bias, Tensor) and bias.shape == weight.shape[:1] else None
    tol = tolerance(x.dtype)
    with torch.no_grad():
        lin = x @ weight.T + (0 if bias is None else bias)
    err = rel_err(lin, out)
    if err > tol:
        raise UnsupportedModelError(
            f"the unembedding ({name}) is not x @ W_U^T + b: off by {err:.2e} of its scale"
        )
    scales = [1.0]
    for key, invert in (("logits_scaling", True), ("logit_scale", False), ("scale_logits", False)):
        value = getattr(config, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value:
            scales.append(1.0 / value if invert else float(value))
    caps: list[float | None] = [None]
    cap = getattr(config, "final_logit_softcapping", None)
    if isinstance(cap, (int, float)) and cap:
        caps.insert(0, float(cap))
    want = logits.double()
    tol_logits = max(tol, tolerance(logits.dtype))
    tried = []
    for s, c in itertools.product(scales, caps):
        r = Readout(unembed, weight, bias, s, c)
        e = rel_err(r.logits(out.double()), want)
        tried.append(e)
        if e <= tol_logits:
            return r
    o = out.double()
    s_fit = float((o * want).sum() / (o * o).sum())
    r = Readout(unembed, weight, bias, s_fit, None)
    e = rel_err(r.logits(o), want)
    if e <= tol_logits:
        return r
    raise UnsupportedModelError(
        f"the model's logits are not cap(s * unembedding output) for any s, cap: best error "
        f"{min(tried + [e]):.2e} of their scale (tolerance {tol_logits:g})"
    )
