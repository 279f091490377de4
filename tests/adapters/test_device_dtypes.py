"""Devices and dtypes: the patch engine on CUDA and in half precision agrees with float32 on CPU.

(Named ``test_device_dtypes.py``: ``tests/hydra/test_devices.py`` exists, and two test files with
one basename in folders without ``__init__.py`` cannot both be collected.)

Every test runs on the CPU; the ``cuda`` cases run where a GPU is present and are skipped with
the reason where not. Reference: the same model in float32 on the CPU. Tolerances (max abs
difference, scale = max(1, max |reference|) of the compared quantity):

- float32 on CUDA: 1e-4 (TF32 matmuls switched off in the test);
- float16: 1e-2 * scale; bfloat16: 5e-2 * scale -- their 11 and 8 significand bits, through a
  few layers; readouts accumulate in float32 either way (``accumulation_dtype``) and are
  returned in float32.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import REPRESENTATIVE

from causalnet.adapters import adapt
from causalnet.adapters.naive import naive_patch, naive_readout
from causalnet.adapters.readout import accumulation_dtype

NO_CUDA = "no CUDA GPU on this machine: the cuda paths run where one is present"
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)),
]
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
FAMILIES = REPRESENTATIVE  # for cost: one tiny model per adapter and residual wiring


@pytest.fixture(autouse=True)
def _no_tf32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _sites(adapter, granularity):
    last = adapter.arch.n_layers - 1
    if granularity == "head":
        return ["embed", "attn.0.h1", "mlp.0", f"attn.{last}.h0", f"mlp.{last}"]
    return ["embed", "attn.0", "mlp.1", f"attn.{last}", f"mlp.{last}"]


def _run(model, tokens, granularity, values):
    a = adapt(model)
    clean = a.clean_run(tokens.to(a.device), granularity=granularity)
    return clean, a.patch(clean, _sites(a, granularity), values.to(a.device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"]
)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_patch_on_each_device_and_dtype_agrees_with_float32_cpu(
    shared_tiny, tiny_factory, device, dtype, family, granularity
):
    if device == "cpu" and dtype == torch.float32:
        pytest.skip("that is the reference itself")
    ref_tiny = shared_tiny(family, torch.float32)
    ref_a = ref_tiny.adapter
    ref_clean = ref_a.clean_run(ref_tiny.tokens, granularity=granularity)
    sites = _sites(ref_a, granularity)
    gen = torch.Generator().manual_seed(3)
    values = torch.stack([ref_clean.value(s) for s in sites])[:, None, :] * (
        1 + 0.5 * torch.randn(len(sites), 3, 1, generator=gen)
    )
    ref = ref_a.patch(ref_clean, sites, values)

    # a private copy: .to() moves and casts the module in place
    model = tiny_factory(family, torch.float32).model.to(device=device, dtype=dtype)
    clean, run = _run(model, ref_tiny.tokens, granularity, values)
    assert clean.target == ref_clean.target
    acc = accumulation_dtype(dtype)
    for name in ("direct_effects", "centred_logit", "total_effect", "sigma"):
        got, want = getattr(run, name), getattr(ref, name)
        assert got.device.type == device and got.dtype == acc, name
        scale = 1.0 if dtype == torch.float32 else max(1.0, float(want.abs().max()))
        assert (got.cpu() - want).abs().max() <= TOL[dtype] * scale, name
    assert abs(clean.centred_logit - ref_clean.centred_logit) <= TOL[dtype] * max(
        1.0, abs(ref_clean.centred_logit)
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_on_cuda_equals_the_naive_oracle_on_cuda(tiny_factory, family):
    tiny = tiny_factory(family, torch.float32)  # private: moved to cuda in place
    model = tiny.model.to("cuda")
    a = adapt(model)
    tokens = tiny.tokens.to("cuda")
    clean = a.clean_run(tokens)
    sites = _sites(a, "layer")
    values = torch.stack([clean.value(s) for s in sites])[:, None, :].repeat(1, 2, 1) * 0.7
    run = a.patch(clean, sites, values)
    for i, site in enumerate(sites):
        centred, direct, sigma = naive_readout(
            a, naive_patch(a, tokens, site, values[i]), clean.target
        )
        assert (run.centred_logit[i] - centred).abs().max() <= 1e-4, site
        assert (run.direct_effects[i] - direct).abs().max() <= 1e-4, site
        assert (run.sigma[i] - sigma).abs().max() <= 1e-4, site


@pytest.mark.parametrize("device", DEVICES)
def test_final_values_on_each_device(shared_tiny, tiny_factory, device):
    tiny = shared_tiny("llama-tied-gqa", torch.float32)
    ref = tiny.adapter.final_values([tiny.tokens, tiny.tokens[:4]])
    a = adapt(tiny_factory("llama-tied-gqa", torch.float32).model.to(device))
    got = a.final_values([tiny.tokens.to(device), tiny.tokens[:4].to(device)])
    assert got.device.type == device
    assert (got.cpu() - ref).abs().max() <= 1e-4
