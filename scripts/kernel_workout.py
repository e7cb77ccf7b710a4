"""Runs every kernel of one backend, forward and backward, on small odd-sized inputs: the workload that
scripts/cuda_sanitizer.sh puts under compute-sanitizer (memcheck, racecheck, synccheck).

Sizes of 1 along an axis, odd sizes, batches of 2, float32 and float64, every mode and flag each op has, so
that every launch path (and every branch of its indexing) runs at least once. Results are not compared here
(the tests do that), except the fused MIND loss against the reference, as a sanity check that the run did
real work.

Usage: python scripts/kernel_workout.py [--device cuda] [--backend cuda]
(``--device cpu --backend cpu`` runs the same calls on the CPU core: tests/test_cuda.py does, so that the
workload stays valid on machines without a GPU.)
"""

from __future__ import annotations

import argparse

import torch

import gradreg_fast
from gradreg_fast import reference


def grads(out, inputs):
    return torch.autograd.grad(out, inputs, torch.randn_like(out))


def workout(device: str, backend: str, check_values: bool = True) -> None:
    """Every call once; ``check_values`` False skips the one comparison of results (for runs whose kernels
    are compiled but not launched: tests/test_triton_compiles.py)."""
    torch.manual_seed(0)
    on = dict(dtype=None, device=device)
    for dtype in (torch.float32, torch.float64):
        on["dtype"] = dtype
        for shape in ((2, 3, 5, 4, 7), (1, 2, 1, 9, 37), (1, 1, 3, 5, 1)):
            n, c, d, h, w = shape
            vol = torch.randn(shape, **on, requires_grad=True)
            grads(gradreg_fast.gradient_magnitude(vol, backend=backend), [vol])
            for passes in (0, 1, 2):
                grads(gradreg_fast.box_mean(vol, passes, backend=backend), [vol])  # the backward: the adjoint

            flow = (2.5 * torch.randn((n, 3, d, h, w), **on)).requires_grad_()
            for mode in ("bilinear", "nearest"):
                for padding_mode in ("zeros", "border"):
                    for deterministic in (False, True):
                        out = gradreg_fast.warp(vol, flow, mode, padding_mode, deterministic, backend=backend)
                        grads(out, [vol, flow] if mode == "bilinear" else [vol])
                        grads(gradreg_fast.warp(vol, flow.detach(), mode, padding_mode, deterministic,
                                                backend=backend), [vol])

            single = vol[:, :1].detach().clone().requires_grad_()
            fixed = torch.randn_like(single)
            for op in (gradreg_fast.mind_ssc, gradreg_fast.mind):
                for per_item in (False, True):
                    grads(op(single, per_item=per_item, backend=backend), [single])
            grads(gradreg_fast.mind_ssc(single, radius=9, dilation=1, backend=backend), [single])  # wide halos
            for descriptor in ("ssc", "mind"):
                for penalty in ("l1", "l2"):
                    loss = gradreg_fast.mind_loss(single, fixed, descriptor, penalty, backend=backend)
                    torch.autograd.grad(loss, single)
                    if check_values:
                        expected = reference.mind_loss(single.detach(), fixed, descriptor, penalty)
                        torch.testing.assert_close(loss.detach(), expected, rtol=1e-4, atol=1e-6)

            other = fixed.clone().requires_grad_()
            for convention in ("voxelmorph", "monai"):
                for window in (1, 3, 9):
                    for reduction in ("mean", "none"):
                        loss = gradreg_fast.lncc_loss(single, other, window, reduction=reduction,
                                                      convention=convention, backend=backend)
                        grads(loss, [single, other])

            velocity = (0.5 * torch.randn((n, 3, d, h, w), **on)).requires_grad_()
            for padding_mode in ("zeros", "border"):
                grads(gradreg_fast.integrate_velocity(velocity, 3, padding_mode, backend=backend), [velocity])
                for weighted in (False, True):
                    weight = torch.rand((n, 1, d, h, w), **on) if weighted else None
                    moving = vol.detach().clone().requires_grad_()
                    target = torch.randn_like(moving)
                    grads(gradreg_fast.warped_sq_diff(moving, target, flow, weight, padding_mode, backend=backend),
                          [moving, flow])

            descriptors = [torch.randn((n, 4, d, h, w), **on).requires_grad_() for _ in range(2)]
            for grid in (1, 2):
                if min(d, h, w) >= grid:
                    grads(gradreg_fast.mind_cost_volume(*descriptors, radius=1, grid=grid, backend=backend),
                          descriptors)
            cost = torch.rand((n, 27, d, h, w), **on)
            field = torch.randn((n, 3, d, h, w), **on)
            for mirrored in (False, True):
                gradreg_fast.coupled_argmin(cost, field, 0.3, mirrored=mirrored, backend=backend)
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backend", default="cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("kernel_workout.py: needs a CUDA device (or --device cpu --backend cpu)")
    workout(args.device, args.backend)
    print(f"every {args.backend} kernel ran")


if __name__ == "__main__":
    main()
