"""MINDLoss as the similarity loss of VoxelMorph's own network: a few training steps of ``VxmPairwise``
(voxelmorph >= 0.3.4, the PyTorch release; ``pip install voxelmorph``, which needs no TensorFlow) on the
bundled CT (moving) / MR (fixed) pair, a multimodal pair where MSE or NCC would not apply.

    python examples/voxelmorph_mind.py --steps 20 --spacing 4

The only change to a VoxelMorph training loop is the loss: ``MINDLoss()(y_pred=warped, y_true=fixed)``
takes VoxelMorph's argument names. The smoothness term is VoxelMorph's ``Grad('l2')``
(:func:`gradreg_fast.losses.flow_smoothness`; voxelmorph 0.3.4 moved its own to neurite).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from gradreg_fast import MINDLoss
from gradreg_fast.io import load_pair
from gradreg_fast.losses import flow_smoothness

DATA = Path(__file__).resolve().parents[1] / "gradreg_fast" / "data" / "abdomen"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    parser.add_argument("--spacing", type=float, default=4.0, help="working grid spacing in mm (default 4)")
    parser.add_argument("--size", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                        help="working grid size in voxels, each rounded up to a multiple of 16 as the network's four "
                             "halvings need (default: the MR's field of view)")
    parser.add_argument("--features", type=int, default=16, help="UNet features per level (default 16)")
    parser.add_argument("--penalty", choices=("l1", "l2"), default="l1",
                        help="MIND penalty: l1 (MINDLoss's default) or l2 (TransMorph's)")
    parser.add_argument("--smoothness", type=float, default=1.0, help="weight of the smoothness term")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Train, print one line per step, and return the losses (for tests/test_examples.py)."""
    try:
        import voxelmorph as vxm
        vxm.nn.models.VxmPairwise  # noqa: B018  (older releases import but lack the torch models)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"this example needs voxelmorph >= 0.3.4 (pip install voxelmorph): {exc}") from exc
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    # The package's reader: both scans resampled onto the MR's grid, centres of mass aligned.
    pair = load_pair(DATA / "mr.nii.gz", DATA / "ct.nii.gz", spacing=args.spacing,
                     size=tuple(args.size) if args.size else None, init="com")
    fixed, moving = pair["fixed"][None].to(device), pair["moving"][None].to(device)  # (1, 1, D, H, W)

    model = vxm.nn.models.VxmPairwise(ndim=3, source_channels=1, target_channels=1,
                                      nb_features=(args.features,) * 4, integration_steps=5).to(device)
    similarity = MINDLoss(penalty=args.penalty)  # in place of VoxelMorph's MSE / NCC
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)

    history = []
    start = time.perf_counter()
    for step in range(args.steps):
        displacement, warped = model(moving, fixed, return_warped_source=True)
        sim = similarity(y_pred=warped, y_true=fixed)
        smooth = flow_smoothness(displacement)
        loss = sim + args.smoothness * smooth
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append({"step": step, "loss": loss.item(), "mind": sim.item(), "smoothness": smooth.item()})
        print(f"step {step:3d}  loss {loss.item():.5f}  MIND {sim.item():.5f}  smoothness {smooth.item():.2e}")
    seconds = time.perf_counter() - start
    with torch.no_grad():
        before = similarity(moving, fixed).item()
        after = similarity(model(moving, fixed, return_warped_source=True)[1], fixed).item()
    print(f"grid {tuple(fixed.shape[2:])}, {args.steps} steps in {seconds:.1f} s on {device}; "
          f"MIND loss unregistered {before:.5f}, after training {after:.5f}")
    return {"history": history, "before": before, "after": after, "shape": tuple(fixed.shape[2:])}


if __name__ == "__main__":
    main()
