"""Linear layers for the adapters' block methods and patch engine, on the fastest exact kernel.

Every function here computes what its ``torch.nn.functional`` spelling computes, in the input's
dtype, on the weights as given (never copied or re-laid-out between calls):

- :func:`linear`:       ``y = x W^T + b``
- :func:`linear_silu`:  ``y = silu(x W^T + b)``,  silu(u) = u * sigmoid(u)
- :func:`linear_mul`:   ``y = (x W^T + b) * other``  (elementwise, ``other`` of y's shape)

Why not just ``F.linear``: on x86 CPUs PyTorch sends float32 ``F.linear`` to Intel MKL, which on
non-Intel CPUs (AMD EPYC/Ryzen) runs its AVX2 code path; oneDNN (also bundled with PyTorch)
picks its kernels by instruction set and runs AVX-512 there, measured 2-3x faster on the
matrix shapes of a 135M-parameter model's final-position rows (``benchmarks/bench_sweep.py``),
and it fuses the SwiGLU activation and gating into the matrix multiply (no extra passes over
the [rows, d_ff] intermediate). The results differ from MKL's only by float32 rounding (another
summation order): ~1e-7 relative, far below the 1e-4 the adapters are tested to.

Packed weights (a COPY, accounted): oneDNN multiplies fastest with weights in its own blocked
layout. Handed a plain [out, in] weight it re-lays it out on every call, which costs little next
to 900 rows of arithmetic but dominates a clean run's ~10 rows (measured on SmolLM2-135M, one
thread: patch 519 -> 476 ms, clean run 62 -> 47 ms per prompt). So the first float32 CPU call
with a weight stores a packed copy (``torch.ops.mkldnn._reorder_linear_weight``) and later calls
use it: one extra copy of every linear weight used this way (SmolLM2-135M: the 30 layers' q, k,
v, o, gate, up, down = 106M parameters, 425 MB; :func:`packed_bytes` says how much is held). The
copy is keyed by the weight tensor, its storage, shape and in-place version counter: an edited
or replaced weight is packed again, and the copy is dropped when the weight is freed.
``CAUSALNET_PACKED_WEIGHTS=0`` turns packing off (plain weights, no copy; read at each call).

The oneDNN path (``torch.ops.mkldnn._linear_pointwise``, the op PyTorch's own compiler emits for
CPU linear layers) is used only where it is exact and safe:

- float32 tensors on the CPU (bfloat16/float16 ``F.linear`` on the CPU already go to oneDNN,
  float64 is not supported by oneDNN, GPUs use cuBLAS through ``F.linear``);
- no autograd: outside ``torch.no_grad()`` with a tensor that requires grad, ``F.linear`` is
  used, so gradients through the block methods keep working;
- the op exists in this PyTorch build and passes a probe against ``F.linear`` (once per
  process); otherwise the fallback is ``F.linear`` and :func:`status` says why;
- not switched off: ``CAUSALNET_ONEDNN=0`` in the environment (read at each call, so setting it
  after import takes effect), or the :func:`reference_kernels` context manager (the tests use
  it to compare both paths).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.nn import functional as F


def _env_on(name: str) -> bool:
    """Switch ``name`` as the environment holds it now (on unless 0/false/no/off): read at each
    use, never cached at import, so a value set later takes effect."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


_reference_only = False  # inside reference_kernels()
_packed: dict[int, tuple[weakref.ref, tuple, Tensor, int]] = {}
_pack_lock = threading.Lock()


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Within this context every function here is its plain ``torch.nn.functional`` spelling."""
    global _reference_only
    before = _reference_only
    _reference_only = True
    try:
        yield
    finally:
        _reference_only = before


def _onednn_on() -> bool:
    return not _reference_only and _env_on("CAUSALNET_ONEDNN")


def _pack_on() -> bool:
    return _env_on("CAUSALNET_PACKED_WEIGHTS")


_probe_lock = threading.Lock()


def _probe() -> str | None:
    """None if oneDNN's fused linear ops exist and agree with F.linear, else the reason.

    Run once per process, under a lock: threads that reach their first linear layer together
    (the sweep's prompt threads) wait for one probe instead of running oneDNN's first calls
    side by side."""
    with _probe_lock:
        return _probe_once()


@functools.cache
def _probe_once() -> str | None:
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is None or not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (mkldnn)"
    try:
        pointwise = ops._linear_pointwise
        binary = ops._linear_pointwise.binary
    except (AttributeError, RuntimeError) as err:
        return f"torch.ops.mkldnn._linear_pointwise is missing ({err})"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 48, generator=gen)
    w = torch.randn(40, 48, generator=gen) / 7
    b = torch.randn(40, generator=gen)
    other = torch.randn(37, 40, generator=gen)
    ref = x @ w.T + b
    try:
        got = (
            pointwise(x, ops._reorder_linear_weight(w, None), b, "none", [], ""),
            pointwise(x, w, b, "swish", [], ""),
            binary(x, other, w, b, "mul"),
        )
    except RuntimeError as err:  # an op whose schema or fusions changed in this version
        return f"oneDNN linear probe failed: {err}"
    expect = (ref, F.silu(ref), ref * other)
    for name, g, e in zip(("linear", "linear+silu", "linear*other"), got, expect, strict=True):
        if g.shape != e.shape or not torch.allclose(g, e, rtol=1e-5, atol=1e-5):
            return f"oneDNN {name} disagrees with torch.nn.functional in the probe"
    return None


def status() -> str:
    """Which kernel float32 CPU linears use now, and why (for benchmark reports)."""
    if not _onednn_on():
        return "torch.nn.functional (oneDNN switched off)"
    reason = _probe()
    if reason is not None:
        return f"F.linear: {reason}"
    packing = "packed weight copies" if _pack_on() else "plain weights"
    return f"oneDNN (torch.ops.mkldnn._linear_pointwise, {packing})"


def _use_onednn(*tensors: Tensor | None) -> bool:
    x = tensors[0]
    assert x is not None
    if x.device.type != "cpu" or x.dtype != torch.float32 or not _onednn_on():
        return False
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            return False
        if t is not None and t.is_mkldnn:  # an opaque tensor from elsewhere: not ours to read
            return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return _probe() is None


def _packed_weight(weight: Tensor) -> Tensor:
    """oneDNN's packed copy of ``weight`` (made on first use, see the module docstring), or the
    weight itself with packing switched off."""
    if not _pack_on():
        return weight
    key = (weight.data_ptr(), tuple(weight.shape), weight._version)
    hit = _packed.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == key:
        return hit[2]
    with _pack_lock:
        hit = _packed.get(id(weight))
        if hit is not None and hit[0]() is weight and hit[1] == key:
            return hit[2]
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        ident = id(weight)

        def forget(_: weakref.ref) -> None:
            _packed.pop(ident, None)

        nbytes = weight.numel() * weight.element_size()
        _packed[ident] = (weakref.ref(weight, forget), key, packed, nbytes)
    return packed


def packed_bytes() -> int:
    """Bytes held by packed weight copies now (0 with packing off or before the first use)."""
    return sum(entry[3] for entry in list(_packed.values()) if entry[0]() is not None)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x W^T + b``: x [..., in], weight [out, in], bias [out] -> [..., out]."""
    if _use_onednn(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(weight), bias, "none", [], "")
    return F.linear(x, weight, bias)


def linear_silu(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``silu(x W^T + b)`` with silu(u) = u * sigmoid(u): [..., in] -> [..., out]."""
    if _use_onednn(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(weight), bias, "swish", [], "")
    return F.silu(F.linear(x, weight, bias))


def linear_mul(x: Tensor, other: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``(x W^T + b) * other``: x [..., in], other [..., out] -> [..., out]."""
    if other.shape[:-1] == x.shape[:-1] and _use_onednn(x, weight, bias, other):
        return torch.ops.mkldnn._linear_pointwise.binary(
            x, other, _packed_weight(weight), bias, "mul"
        )
    return F.linear(x, weight, bias) * other
