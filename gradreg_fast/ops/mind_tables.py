"""Offset-pair tables of the MIND descriptors, shared by the reference, CPU, CUDA and Triton paths.

Offsets are (dz, dy, dx) in units of ``dilation``.
"""

# The six-neighbourhood as indices into a 3x3x3 kernel centred at (1, 1, 1), in ConvexAdam's order.
SSC_OFFSETS_3X3X3 = ((0, 1, 1), (1, 1, 0), (1, 0, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1))
SIX_NEIGHBOURHOOD = tuple(tuple(c - 1 for c in o) for o in SSC_OFFSETS_3X3X3)

# ConvexAdam's final channel order.
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


def flat_pairs(pairs):
    """The table as a flat tuple of ints (a_z, a_y, a_x, b_z, b_y, b_x per channel) for the compiled cores."""
    return tuple(v for a, b in pairs for v in (*a, *b))
