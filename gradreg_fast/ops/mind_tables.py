"""Offset-pair tables of the MIND descriptors, shared by the CPU, CUDA and Triton paths.

Offsets are (dz, dy, dx) in units of ``dilation``. The naive reference (gradreg_fast/reference/mind.py)
keeps its own tables, written separately; a test checks that both agree.
"""

# The six-neighbourhood as indices into a 3x3x3 kernel centred at (1, 1, 1), in ConvexAdam's order.
SSC_OFFSETS_3X3X3 = ((0, 1, 1), (1, 1, 0), (1, 0, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1))
SIX_NEIGHBOURHOOD = tuple(tuple(c - 1 for c in o) for o in SSC_OFFSETS_3X3X3)

# ConvexAdam's final channel order: output channel k is its convolution's channel SSC_PERMUTATION[k].
SSC_PERMUTATION = (6, 8, 1, 11, 2, 10, 0, 7, 9, 4, 5, 3)


def _ssc_pairs():
    kept = []
    for i, a in enumerate(SIX_NEIGHBOURHOOD):  # row-major over a 6x6 grid
        for j, b in enumerate(SIX_NEIGHBOURHOOD):
            if i > j and sum((p - q) ** 2 for p, q in zip(a, b)) == 2:
                kept.append((a, b))
    assert len(kept) == 12
    return tuple(kept[k] for k in SSC_PERMUTATION)


# 12 pairs, already in the final channel order.
SSC_PAIRS = _ssc_pairs()
# MIND (Heinrich 2012) with the six-neighbourhood search region: D_p(I, x, x + r).
MIND_PAIRS = tuple(((0, 0, 0), r) for r in SIX_NEIGHBOURHOOD)

# Where several channels share a voxel's minimum, the one that takes the minimum's gradient is the one
# with the lowest tie rank. The originals (ConvexAdam, TransMorph, VoxelMorph++) take torch.min over
# their convolution's channel order, *before* permuting the channels, and torch.min picks the first of
# equal values: so an SSC channel's rank is its position in that order. On integer-valued volumes ties
# are common, and any other choice gives a different gradient.
SSC_TIE_RANKS = SSC_PERMUTATION
MIND_TIE_RANKS = tuple(range(len(MIND_PAIRS)))  # MIND subtracts no minimum: unused
TIE_RANKS = {SSC_PAIRS: SSC_TIE_RANKS, MIND_PAIRS: MIND_TIE_RANKS}


def flat_pairs(pairs, tie_ranks=None):
    """The table as the compiled cores take it: a flat tuple of ints, 6 per channel (a_z, a_y, a_x, b_z, b_y,
    b_x), then one tie rank per channel (a permutation of 0..K-1; by default ``TIE_RANKS[pairs]``, or the
    table order for a table not listed there)."""
    pairs = tuple(pairs)
    if tie_ranks is None:
        tie_ranks = TIE_RANKS.get(pairs, tuple(range(len(pairs))))
    if sorted(tie_ranks) != list(range(len(pairs))):
        raise ValueError(f"`tie_ranks` must be a permutation of 0..{len(pairs) - 1}, got {tuple(tie_ranks)}")
    return tuple(v for a, b in pairs for v in (*a, *b)) + tuple(int(r) for r in tie_ranks)
