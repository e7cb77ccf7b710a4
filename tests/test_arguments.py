"""Flag and number arguments of the public ops: Python or numpy bools and real numbers are taken as they are;
anything else (a string, None, a bool where a number is meant) is refused with an error that names the argument,
never converted (``bool("false")`` is True)."""

import numpy as np
import pytest
import torch
from conftest import make_volume

import gradreg_fast


@pytest.fixture()
def volume(gen):
    return make_volume((1, 1, 5, 6, 4), generator=gen)


def _flag_calls(volume, flag):
    flow = torch.zeros(1, 3, *volume.shape[2:], dtype=volume.dtype)
    cost = make_volume((1, 27, *volume.shape[2:]), generator=torch.Generator().manual_seed(3))
    return {
        "per_item (mind_ssc)": lambda: gradreg_fast.mind_ssc(volume, per_item=flag),
        "per_item (mind)": lambda: gradreg_fast.mind(volume, per_item=flag),
        "per_item (mind_loss)": lambda: gradreg_fast.mind_loss(volume, volume.flip(2), per_item=flag),
        "deterministic (warp)": lambda: gradreg_fast.warp(volume, flow, deterministic=flag),
        "mirrored (coupled_argmin)": lambda: gradreg_fast.coupled_argmin(cost, flow, 0.5, mirrored=flag),
    }


NAMES = list(_flag_calls(torch.zeros(1, 1, 2, 2, 2), True))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("flag", ["false", "no", 0, 1, None, 1.0])
def test_a_flag_that_is_not_a_bool_is_refused(name, flag, volume):
    with pytest.raises(TypeError, match=f"`{name.split()[0]}` must be a bool"):
        _flag_calls(volume, flag)[name]()


@pytest.mark.parametrize("name", NAMES)
def test_numpy_bools_are_bools(name, volume):
    for flag in (False, True):
        torch.testing.assert_close(_flag_calls(volume, np.bool_(flag))[name](), _flag_calls(volume, flag)[name]())


@pytest.mark.parametrize("make", [float, np.float32, np.float64, np.int64])
def test_numpy_numbers_are_numbers(make, gen):
    volume = make_volume((1, 1, 5, 6, 4), generator=gen)
    other = make_volume((1, 1, 5, 6, 4), generator=gen)
    cost = make_volume((1, 27, 5, 6, 4), generator=gen)
    field = make_volume((1, 3, 5, 6, 4), generator=gen)
    pairs = [
        (lambda v: gradreg_fast.gradient_magnitude(volume, eps=v), 1),
        (lambda v: gradreg_fast.lncc_loss(volume, other, 3, eps=v), 1),
        (lambda v: gradreg_fast.lncc_loss(volume, other, 3, smooth_nr=v, convention="monai"), 1),
        (lambda v: gradreg_fast.coupled_argmin(cost, field, coupling=v), 2),
    ]
    for call, value in pairs:
        torch.testing.assert_close(call(make(value)), call(float(value)))


@pytest.mark.parametrize("value", [None, "1", True, float("inf"), -1.0])
def test_a_number_that_is_not_a_finite_real_is_refused(value, volume):
    cost = make_volume((1, 27, 5, 6, 4), generator=torch.Generator().manual_seed(4))
    field = torch.zeros(1, 3, 5, 6, 4, dtype=torch.float64)
    for name, call in (("eps", lambda: gradreg_fast.gradient_magnitude(volume, eps=value)),
                       ("eps", lambda: gradreg_fast.lncc_loss(volume, volume, 3, eps=value)),
                       ("smooth_nr", lambda: gradreg_fast.lncc_loss(volume, volume, 3, smooth_nr=value)),
                       ("coupling", lambda: gradreg_fast.coupled_argmin(cost, field, coupling=value))):
        with pytest.raises(ValueError, match=f"`{name}` must be a finite number"):
            call()
