"""Shared fixtures and helpers of the test suite."""

from __future__ import annotations

import os
import zlib

# Idle OpenMP threads sleep instead of spinning. Must be set before torch loads libgomp. On a shared,
# oversubscribed CI machine, spinning teams of thousands of tiny calls (gradcheck) starve each other
# and make the suite several times slower; results do not depend on it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FLOAT_DTYPES = (torch.float32, torch.float64)


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test's id: every test draws its own, reproducible, random inputs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def make_volume(shape, dtype=torch.float64, noncontiguous=False, generator=None, scale=1.0) -> torch.Tensor:
    """Standard-normal values times ``scale``, of ``shape`` and ``dtype``.

    With ``noncontiguous=True`` the result is a view into a larger tensor, with permuted strides and a
    step along the last axis, so that kernels that assume a contiguous layout would read wrong values.
    """
    shape = tuple(shape)
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # float16/bfloat16: drawn, then cast
    if not noncontiguous:
        return (torch.randn(shape, generator=generator, dtype=draw_dtype) * scale).to(dtype)
    n, c, d, h, w = shape
    # Stored in (W', H', D, C, N) order, viewed back as (N, C, D, H', W'), then sliced.
    storage = torch.randn((2 * w + 1, h + 1, d, c, n), generator=generator, dtype=draw_dtype) * scale
    view = storage.to(dtype).permute(4, 3, 2, 1, 0)[:, :, :, 1:, ::2][..., :w]
    assert view.shape == shape and (w == 1 or not view.is_contiguous())
    return view


def non_contiguous_grad_output(shape, layout, generator=None) -> torch.Tensor:
    """A float64 gradient as autograd may hand it to a backward: ``"expanded"`` (stride 0, what
    ``out.sum().backward()`` passes) or ``"strided"`` (a permuted, sliced view)."""
    if layout == "expanded":
        grad = torch.ones((), dtype=torch.float64).expand(shape)
    else:
        grad = make_volume(shape, torch.float64, True, generator)
    assert not grad.is_contiguous()
    return grad


def value_and_grads(fn, inputs, grad_output=None):
    """``fn(*inputs)`` and its vector-Jacobian product with ``grad_output`` (default: 1, for a scalar)
    w.r.t. every input (zeros for an input the output does not depend on). The leaves are detached views,
    so they keep the inputs' strides."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = fn(*leaves)
    if grad_output is None:
        grad_output = torch.ones_like(out)
    return out.detach(), torch.autograd.grad(out, leaves, grad_output, materialize_grads=True)

