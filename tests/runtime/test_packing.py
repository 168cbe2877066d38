"""Sequence packing (§4), MRoPE slot assignment (§2.6), latent de-normalisation and unpatchify (§6.5-6.6)."""
import numpy as np
import pytest
import torch

from ideogram4_engine.export.reference.dit import mrope_angles, mrope_cos_sin, rope_inv_freq
from ideogram4_engine.export.reference.pipeline import torch_unpatchify
from ideogram4_engine.runtime.latents import LATENT_SCALE, LATENT_SHIFT, tokens_to_latent
from ideogram4_engine.runtime.packing import check_size, pack


def test_worked_example():
    p = pack([3], 32, 32)
    assert (p.T, p.N) == (3, 4)
    assert p.indicators.tolist() == [[3, 3, 3, 2, 2, 2, 2]]
    assert p.segments.tolist() == [[1] * 7]
    assert p.positions[0].tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [65536, 65536, 65536],
                                       [65536, 65536, 65537], [65536, 65537, 65536], [65536, 65537, 65537]]
    assert not p.needs_mask


def test_left_padding_for_unequal_prompts():
    p = pack([2, 5], 32, 48)
    assert (p.T, p.N) == (5, 6)
    assert p.indicators[0, :3].tolist() == [0, 0, 0] and p.segments[0, :3].tolist() == [-1, -1, -1]
    assert p.positions[0, :5, 0].tolist() == [0, 0, 0, 0, 1]         # text positions restart at 0
    assert p.positions[1, :5, 0].tolist() == [0, 1, 2, 3, 4]
    assert p.positions[0, 5:].tolist() == p.positions[1, 5:].tolist()
    assert p.positions[0, -1].tolist() == [65536, 65537, 65538]      # last token: row 1, column 2
    assert p.needs_mask


@pytest.mark.parametrize("h,w,msg", [(1000, 1024, "height=1000 must be a multiple of 16"),
                                     (1024, 240, "width=240 outside the supported range 256…2048"),
                                     (2064, 1024, "height=2064 outside"),
                                     (256, 1600, "aspect ratio 1600x256 exceeds 6:1")])
def test_size_refusals(h, w, msg):
    with pytest.raises(ValueError, match=msg):
        check_size(h, w)


def test_size_accepted_edges():
    for h, w in [(256, 256), (2048, 2048), (256, 1536), (1088, 1920)]:
        check_size(h, w)


def test_mrope_slot_assignment_on_a_small_grid():
    gh, gw = 3, 5
    pos = torch.from_numpy(pack([4], gh * 16, gw * 16).positions[0])
    ang = mrope_angles(pos, 256, 5e6, (24, 20, 20))                   # (L, 128)
    inv = rope_inv_freq(256, 5e6)
    assert inv[0] == 1.0 and inv[127].item() == pytest.approx(5e6 ** (-127 / 128), rel=2 ** -8)  # bf16-rounded
    axis_of = np.zeros(128, int)
    axis_of[1:60:3], axis_of[2:60:3] = 1, 2
    assert (axis_of == 1).sum() == 20 and (axis_of == 2).sum() == 20 and (axis_of == 0).sum() == 88
    expected = torch.stack([pos[:, a].to(torch.float32) * inv[i] for i, a in enumerate(axis_of)], 1)
    torch.testing.assert_close(ang, expected, rtol=0, atol=0)
    # text tokens: all three axes equal -> plain 1-D RoPE; image tokens: t slots constant over the grid
    assert torch.equal(ang[:4], pos[:4, :1].to(torch.float32) * inv)
    img = ang[4:]
    assert torch.equal(img[:, axis_of == 0], img[:1, axis_of == 0].expand(gh * gw, -1))
    cos, sin = mrope_cos_sin(pos, 256, 5e6, (24, 20, 20))
    assert cos.shape == (len(pos), 256) and torch.equal(cos[:, :128], cos[:, 128:])   # rotate-half layout
    # the (h, w) slots tell image tokens apart: all 15 image rows distinct
    assert len({tuple(r) for r in cos[4:].to(torch.bfloat16).float().tolist()}) == gh * gw


def test_denormalise_and_unpatchify_index_formula():
    gh, gw, B = 3, 4, 2
    rng = np.random.default_rng(5)
    z = rng.standard_normal((B, gh * gw, 128)).astype(np.float32)
    lat = tokens_to_latent(z, gh, gw)
    assert lat.shape == (B, 32, 2 * gh, 2 * gw) and lat.dtype == np.float32
    for b, r, c, ph, pw, ch in [(0, 0, 0, 0, 0, 0), (1, 2, 3, 1, 1, 31), (0, 1, 2, 0, 1, 7), (1, 0, 3, 1, 0, 20)]:
        k = (ph * 2 + pw) * 32 + ch
        expected = np.float32(z[b, r * gw + c, k] * LATENT_SCALE[k] + LATENT_SHIFT[k])
        assert lat[b, ch, 2 * r + ph, 2 * c + pw] == expected
    # the torch reference path agrees bit for bit
    zt = torch.from_numpy(z)
    ref = torch_unpatchify(zt * torch.from_numpy(LATENT_SCALE) + torch.from_numpy(LATENT_SHIFT), gh, gw)
    np.testing.assert_array_equal(ref.numpy(), lat)
