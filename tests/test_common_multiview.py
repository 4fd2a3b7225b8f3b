"""common/multiview.py: the test resize and crop placement against hand values, and the two
merges of a clip's views (softmax scores, features) on hand-made batches."""
import pytest
import torch
import torch.nn.functional as F

from common import multiview


def test_short_side_resize_floors_the_long_side_without_antialiasing():
    x = torch.rand(2, 3, 240, 320)  # (T, C, H, W), landscape
    out = multiview.short_side_resize(x, 256)
    assert out.shape == (2, 3, 256, 341)  # int(320 * 256 / 240) = int(341.33)
    ref = F.interpolate(x, size=(256, 341), mode="bilinear", align_corners=False)
    assert torch.equal(out, ref)
    assert multiview.short_side_resize(torch.rand(1, 3, 300, 200), 128).shape == (1, 3, 192, 128)
    assert multiview.short_side_resize(torch.rand(1, 3, 64, 64), 32).shape == (1, 3, 32, 32)


def test_uniform_crop_offsets_by_hand():
    # 3 crops of 256 along 341 px: step 42.5; VideoMAE floors it, pytorchvideo ceils the centre
    assert multiview.uniform_crop_offsets(341, 256, 3) == [0, 42, 85]
    assert multiview.uniform_crop_offsets(341, 256, 3, ceil=True) == [0, 43, 85]
    assert multiview.uniform_crop_offsets(320, 256, 3) == [0, 32, 64]
    assert multiview.uniform_crop_offsets(341, 256, 1) == [42]  # the centre
    assert multiview.uniform_crop_offsets(341, 256, 1, ceil=True) == [43]
    assert multiview.uniform_crop_offsets(256, 256, 3) == [0, 0, 0]
    assert multiview.uniform_crop_offsets(10, 4, 4) == [0, 2, 4, 6]
    with pytest.raises(ValueError):
        multiview.uniform_crop_offsets(100, 128, 3)


def test_uniform_crops_cut_along_the_long_side():
    wide = torch.arange(6 * 10.0).view(1, 1, 6, 10)  # H 6, W 10
    crops = multiview.uniform_crops(wide, 6, 3)
    assert [c.shape[-2:] for c in crops] == [(6, 6)] * 3
    for c, left in zip(crops, (0, 2, 4)):
        assert torch.equal(c, wide[..., :, left:left + 6])
    tall = wide.transpose(-1, -2)  # H 10, W 6: crops go down
    for c, top in zip(multiview.uniform_crops(tall, 6, 3), (0, 2, 4)):
        assert torch.equal(c, tall[..., top:top + 6, :])
    # a short side longer than the crop is centred
    (c,) = multiview.uniform_crops(torch.arange(64.0).view(1, 8, 8), 4, 1)
    assert torch.equal(c, torch.arange(64.0).view(1, 8, 8)[..., 2:6, 2:6])


class ViewLogits(torch.nn.Module):
    """Returns the logits carried in the input itself: x (N, K) -> x."""

    def forward(self, x):
        return x


def test_multi_view_accuracy_averages_softmax_not_logits():
    # One clip, 3 views, 2 classes: softmax p(class 0) = 0.953, 0.269, 0.269 -> mean 0.497:
    # class 1. Averaged logits (1, 0.667) would say class 0, a majority vote class 1 too.
    clip_a = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    clip_b = torch.tensor([[5.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # mean p0 = 0.51: class 0
    batches = [(torch.stack([clip_a, clip_b]), torch.tensor([1, 1]), torch.tensor([0, 1])),
               None,  # a batch whose clips were all unreadable
               (clip_a[None], torch.tensor([0]), torch.tensor([2]))]
    out = multiview.multi_view_accuracy(ViewLogits(), batches, "cpu")
    assert out["count"] == 3
    assert out["top1"] == pytest.approx(100 / 3)  # only clip_a labelled 1 is right
    assert out["top5"] == 100.0  # 2 classes: always within the top 5


def test_multi_view_features_average_each_clips_views_in_order():
    x = torch.arange(2 * 3 * 4.0).view(2, 3, 4)  # (B, V, D): the views are the features
    batches = [(x, torch.tensor([7, 8]), torch.tensor([0, 1])),
               (x[:1] + 100, torch.tensor([9]), torch.tensor([2]))]
    f, y = multiview.multi_view_features(lambda v: v * 2, batches, "cpu")
    assert torch.equal(y, torch.tensor([7, 8, 9]))
    assert torch.allclose(f, torch.cat([x.mean(1), x[:1].mean(1) + 100]) * 2)
