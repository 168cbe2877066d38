"""Schedule, presets and the guidance index order (spec §5)."""
import math

import numpy as np
import pytest
import torch

from ideogram4_engine.runtime.schedule import (PRESETS, TAU_MAX, TAU_MIN, get_preset, linspace_f32, plan,
                                               resolution_mu, tau_table)

SPEC_1024_DEFAULT = [0.000123395, 0.0273411, 0.050409, 0.0753755, 0.102847, 0.133137, 0.166471, 0.203031,
                     0.242963, 0.286375, 0.333333, 0.38385, 0.437875, 0.495291, 0.555904, 0.619449, 0.685613,
                     0.754102, 0.824851, 0.898926]


def test_tau_values_match_spec_table():
    p = PRESETS["V4_DEFAULT_20"]
    steps = plan(p.steps, resolution_mu(p.mu, 1024, 1024), p.std, p.guidance)
    np.testing.assert_allclose([float(s.tau) for s in steps], SPEC_1024_DEFAULT, rtol=1e-5)
    assert float(steps[-1].tau + steps[-1].dt) == pytest.approx(0.999447, rel=1e-6)
    assert all(s.dt > 0 for s in steps)                       # τ rises: noise (0) → data (1), trap 1


def test_bounds_and_resolution_shift():
    assert TAU_MIN == pytest.approx(1.2339458e-4, rel=1e-7) and TAU_MAX == pytest.approx(0.99944722, rel=1e-8)
    assert resolution_mu(0.0, 1024, 1024) == pytest.approx(math.log(2))
    assert resolution_mu(0.0, 2048, 2048) == pytest.approx(1.386294, rel=1e-6)
    assert resolution_mu(0.5, 512, 512) == 0.5
    t = tau_table(12, 0.0, 1.75)
    assert t.dtype == np.float32 and t[0] == np.float32(TAU_MAX) and t[-1] == np.float32(TAU_MIN)
    assert (np.diff(t) < 0).all()


def test_guidance_index_zero_is_the_last_step():
    p = get_preset("V4_DEFAULT_20")
    assert p.guidance[:2] == (3.0, 3.0) and set(p.guidance[2:]) == {7.0}
    steps = plan(p.steps, 0.0, p.std, p.guidance)
    assert [s.index for s in steps] == list(range(19, -1, -1))
    assert [s.guidance for s in steps] == [7.0] * 18 + [3.0, 3.0]   # the polish steps come at the end
    asym = tuple(float(i) for i in range(20))
    assert [s.guidance for s in plan(20, 0.0, 1.75, asym)] == [float(i) for i in range(19, -1, -1)]


@pytest.mark.parametrize("name,steps,polish,mu,std", [("V4_QUALITY_48", 48, 3, 0.0, 1.5),
                                                      ("V4_DEFAULT_20", 20, 2, 0.0, 1.75),
                                                      ("V4_TURBO_12", 12, 1, 0.5, 1.75)])
def test_presets(name, steps, polish, mu, std):
    p = get_preset(name)
    assert (p.steps, p.mu, p.std) == (steps, mu, std)
    assert p.guidance == (3.0,) * polish + (7.0,) * (steps - polish)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="unknown sampler preset 'V4_FAST'.*V4_QUALITY_48"):
        get_preset("V4_FAST")
    with pytest.raises(ValueError, match="guidance schedule has 3 entries, expected one per step \\(4\\)"):
        plan(4, 0.0, 1.0, (7.0, 7.0, 3.0))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        plan(0, 0.0, 1.0, ())


def test_linspace_matches_torch_bit_for_bit():
    for n in list(range(1, 200)) + [257, 513, 1001]:
        np.testing.assert_array_equal(linspace_f32(n), torch.linspace(0, 1, n).numpy(), err_msg=f"n={n}")
