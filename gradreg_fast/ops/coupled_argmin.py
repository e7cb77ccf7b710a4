"""coupled_argmin: registration (``torch.ops.gradreg.coupled_argmin``), fake, dispatch. No autograd: the
output is an index."""

from __future__ import annotations


import torch

from .. import reference
from . import _common as c
from .cost_volume import MAX_RADIUS

OP = "coupled_argmin"


def _radius(op: str, count: int) -> int:
    """r with count == (2r + 1)^3, or a clear error."""
    side = round(count ** (1 / 3))
    if side ** 3 != count or side % 2 == 0 or (side - 1) // 2 > MAX_RADIUS:
        raise ValueError(f"{op}: `cost` must have (2r + 1)^3 displacements in dim 1 (27, 125, 343, ...; "
                         f"r <= {MAX_RADIUS}), got {count}")
    return (side - 1) // 2


def _launch(cost, field, coupling, mirrored, backend):
    name = c.resolve(backend, cost, OP)
    if name == "reference":
        return reference.coupled_argmin(cost, field, coupling, mirrored)
    cost, field = cost.contiguous(), field.contiguous()
    radius = _radius(OP, cost.shape[1])
    if name == "triton":
        from ..triton_kernels import coupled_argmin as kernel

        return kernel.forward(cost, field, coupling, radius, mirrored)
    n, _, d, h, w = cost.shape
    index = torch.empty((n, d, h, w), dtype=torch.int64, device=cost.device)
    if name == "cpu":
        c.cpu_core().coupled_argmin(c.dtype_name(cost), cost.data_ptr(), field.data_ptr(), coupling,
                                    index.data_ptr(), n, d, h, w, radius, mirrored, c.threads(cost.numel()))
    else:
        c.raise_cuda_error(OP, c.cuda_core().coupled_argmin_forward(
            cost.dtype == torch.float64, cost.data_ptr(), field.data_ptr(), coupling, index.data_ptr(), n, d, h, w,
            radius, mirrored, c.stream(cost)))
    return index


@torch.library.custom_op("gradreg::coupled_argmin", mutates_args=())
def _coupled_argmin_op(cost: torch.Tensor, field: torch.Tensor, coupling: float, mirrored: bool,
                       backend: str) -> torch.Tensor:
    with c.on_device_of(cost):
        return _launch(cost, field, coupling, mirrored, backend)


@_coupled_argmin_op.register_fake
def _(cost, field, coupling, mirrored, backend):
    n, _, d, h, w = cost.shape
    return cost.new_empty((n, d, h, w), dtype=torch.int64)


def coupled_argmin(cost: torch.Tensor, field: torch.Tensor, coupling: float = 0.0, mirrored: bool = False,
                   backend: str | None = None) -> torch.Tensor:
    """The search step of the coupled convex optimisation (ConvexAdam), fused: at every point, the
    displacement of a cost volume that minimises its cost plus a coupling to a smooth field,

    ``index[n, p] = argmin_k  C[n, k, p] + coupling * |d_k - field[n, :, p]|^2``

    without materialising the coupled costs (one pass over the volume per call).

    * ``d_k`` are the displacements of :func:`gradreg_fast.mind_cost_volume` (``(dz, dy, dx)`` in
      ``[-r, r]^3``, dx fastest; :func:`gradreg_fast.mind_cost_volume_displacements` gives the table),
      in the steps of the cost volume's control grid; ``field`` is in the same steps.
    * ``C`` is ``cost`` itself, or with ``mirrored`` the cost of the opposite search read where
      displacement k lands: ``C[n, k, p] = cost[n, K-1-k, clamp(p + d_k)]`` (``d_{K-1-k} = -d_k``). For a
      cost volume of fixed -> moving matching on one control grid, that is the moving -> fixed cost
      volume (exactly, away from the borders, where the landing point is clamped), at no extra cost.
    * A NaN coupled cost counts as +inf. Of equal coupled costs, the displacement nearest ``field`` wins,
      then the lowest k: without coupling, a point whose costs are all equal (a uniform region) keeps the
      displacement nearest ``field`` instead of the first one, (-r, -r, -r).

    Args:
        cost: (N, K, D, H, W), K = (2r+1)^3, float32 or float64 (float16/bfloat16 computed in float32).
        field: (N, 3, D, H, W), same dtype and device.
        coupling: weight >= 0 of the squared distance to ``field``, in cost units per step^2.
        mirrored: read ``cost`` as the opposite search (see above).
        backend: see :func:`gradreg_fast.gradient_magnitude`.

    Returns:
        (N, D, H, W) int64 indices into the K displacements.
    """
    c.check_volume(OP, "cost", cost)
    c.check_volume(OP, "field", field, channels=3)
    c.check_same(OP, ("cost", "field"), cost, field, spatial_only=True)
    _radius(OP, cost.shape[1])
    coupling = c.check_number_argument(OP, "coupling", coupling)
    mirrored = c.check_bool_argument(OP, "mirrored", mirrored)
    backend = c.backend_for(backend, cost, OP)
    dtype = c.compute_dtype(cost)
    return _coupled_argmin_op(cost.to(dtype), field.to(dtype), coupling, mirrored, backend)
