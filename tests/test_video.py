"""Decoding (seek-based and sequential give the same frames, on real H.264 clips and synthetic videos) and the
three-crop test views."""

from __future__ import annotations

import pytest
import torch

from t3d.data.transforms import ClipTransform, three_crop


# ------------------------------------------------------------------------------------------------- three crops
@pytest.mark.parametrize("h,w", [(4, 9), (9, 4), (5, 5)])
def test_three_crop_takes_start_center_end_along_the_long_side(h, w):
    clip = torch.arange(3 * 2 * h * w, dtype=torch.float32).view(3, 2, h, w)
    out = three_crop(clip, (4, 4))
    assert out.shape == (3, 3, 2, 4, 4)
    if w >= h:
        tops, lefts = [(h - 4) // 2] * 3, [0, (w - 4) // 2, w - 4]
    else:
        tops, lefts = [0, (h - 4) // 2, h - 4], [(w - 4) // 2] * 3
    for k, (top, left) in enumerate(zip(tops, lefts)):
        assert torch.equal(out[k], clip[:, :, top : top + 4, left : left + 4])


def test_three_crop_rejects_a_clip_smaller_than_the_crop():
    with pytest.raises(ValueError, match="at least the crop 8x8"):
        three_crop(torch.zeros(3, 2, 6, 10), (8, 8))


def test_clip_transform_three_crops_center_view_equals_the_single_crop():
    frames = torch.randint(0, 256, (4, 30, 50, 3), dtype=torch.uint8)
    one = ClipTransform((24, 24), train=False)(frames)
    three = ClipTransform((24, 24), train=False, crops=3)(frames)
    assert three.shape == (3, 3, 4, 24, 24)
    torch.testing.assert_close(three[1], one, rtol=0, atol=0)
    assert not torch.equal(three[0], three[2])
    with pytest.raises(ValueError, match="crops: expected 1"):
        ClipTransform((24, 24), train=False, crops=2)
    with pytest.raises(ValueError, match="train=False"):
        ClipTransform((24, 24), train=True, crops=3)
