"""Triton kernels of the gradreg_fast ops: one module per op, each a set of plain functions on
contiguous float32/float64 tensors of one device (the op files in :mod:`gradreg_fast.ops` check and
prepare the arguments, and own autograd).

Conventions shared by every kernel:

* A program handles ``BLOCK`` consecutive voxels of one (item, channel) volume, x fastest, so loads
  and stores are coalesced. The volume index comes from ``program_id`` as a scalar (no per-lane
  division for it), and only the voxel index inside a volume is a vector.
* Voxel indices inside one volume are int32 (:func:`check_voxels` guarantees they fit); every
  offset that adds a volume or channel base is int64.
* Every load and store is masked; no output buffer is assumed to be zero.
* Constants of the computation (eps, 0.001 m, ...) are formed in the tensor's own dtype: a Python
  float passed as a kernel argument would arrive as float32 and lose precision in float64.
* Compiled for a GPU, float32 ``/``, ``tl.exp`` and ``tl.log`` are the hardware's approximate ones (a few
  ulp; only box_mean divides with ``div_rn``), so float32 results agree with the CPU and CUDA cores to
  rounding, not bit for bit; the tests compare with tolerances. The interpreter computes them exactly.

Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (slowly), which is how the test
suite checks them on a machine without a GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

INT32_LIMIT = 2**31 - 1
# Passed to every launch. No contraction of a * b + c into an FMA: the results then follow the
# formulas' IEEE evaluation (as the reference and the CPU core do) whatever Triton's default,
# which changes in Triton 3.10; these kernels are memory-bound, so FMAs would buy nothing.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}
# Voxel indices inside a volume are int32: half the range leaves room for a block's tail and for
# neighbour offsets computed before their mask is applied.
MAX_VOXELS = 2**30


def check_voxels(op: str, spatial: tuple[int, int, int]) -> int:
    """D*H*W of ``spatial``; raises if it is too large for the kernels' int32 voxel indices."""
    d, h, w = spatial
    voxels = d * h * w
    if voxels > MAX_VOXELS:
        raise ValueError(
            f"gradreg_fast.{op} (triton): a volume of {d}x{h}x{w} = {voxels} voxels exceeds the "
            f"{MAX_VOXELS} voxels a Triton kernel indexes; use the CUDA or CPU backend"
        )
    return voxels


def volume_grid(op: str, voxels: int, volumes: int, block: int) -> tuple[tuple[int], int]:
    """A 1D launch grid of ``volumes`` x ceil(voxels / block) programs, and the blocks per volume."""
    blocks = triton.cdiv(voxels, block)
    programs = volumes * blocks
    if programs > INT32_LIMIT:
        raise ValueError(
            f"gradreg_fast.{op} (triton): {volumes} volumes of {voxels} voxels need {programs} programs, "
            f"more than the {INT32_LIMIT} one launch allows"
        )
    return (programs,), blocks


@triton.jit
def voxel_count(D, H, W):
    """D*H*W as an int64 scalar: a volume of up to MAX_VOXELS fits int32, but the channel offsets built from it
    (k * D*H*W for the 3 flow or 5 LNCC channels) pass 2**31 from 2**29 voxels on."""
    return tl.cast(D, tl.int64) * H * W


@triton.jit
def voxel_coordinates(pid, blocks_per_volume, D, H, W, BLOCK: tl.constexpr):
    """(volume index as an int64 scalar, voxel index p, z, y, x, in-bounds mask) of program ``pid``
    of a grid made by :func:`volume_grid`."""
    volume = (pid // blocks_per_volume).to(tl.int64)
    p = (pid % blocks_per_volume) * BLOCK + tl.arange(0, BLOCK)
    mask = p < D * H * W
    x = p % W
    y = (p // W) % H
    z = p // (H * W)
    return volume, p, z, y, x, mask


@triton.jit
def axis_line(z, y, x, D, H, W, AXIS: tl.constexpr):
    """(coordinate, size, element stride) along spatial axis AXIS (0: z, 1: y, 2: x), for kernels that work
    along one axis of a contiguous (D, H, W) volume."""
    if AXIS == 0:
        return z, D, H * W
    elif AXIS == 1:
        return y, H, W
    else:
        return x, W, 1
