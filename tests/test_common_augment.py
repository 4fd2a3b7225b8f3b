"""common/augment.py: timm's RandAugment op table and draws on fixed seeds, cube random
erasing, and VideoMAE's random-resized crop with its fallback box."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common import augment, cli


def test_random_resized_crop_fallback_is_the_centre_at_the_clamped_ratio():
    """Scale (1, 1) never fits a 1:4 frame at ratio <= 1.3333: the fallback is the centre
    crop at ratio 1.3333 (VideoMAE / torchvision), 100 x 133 at left 133 (tall: top 133)."""
    wide = torch.rand(2, 3, 100, 400)
    got = augment.random_resized_crop(wide, 32, (1.0, 1.0), np.random.default_rng(0))
    want = F.interpolate(wide[..., :, 133:266], size=(32, 32), mode="bilinear",
                         align_corners=False)
    assert torch.equal(got, want)
    tall = torch.rand(2, 3, 400, 100)
    got = augment.random_resized_crop(tall, 32, (1.0, 1.0), np.random.default_rng(0))
    want = F.interpolate(tall[..., 133:266, :], size=(32, 32), mode="bilinear",
                         align_corners=False)
    assert torch.equal(got, want)



def test_rand_augment_op_table_at_magnitude_7():
    """timm's levels at m = 7 (no magnitude noise), each op forced by a fixed draw."""
    ra = augment.RandAugment("rand-m7-n4-mstd0-inc1")
    assert (ra.m, ra.n, ra.std) == (7.0, 4, 0.0)
    levels = {name: fn(7.0, np.random.default_rng(0))
              for name, (_, fn) in augment.RAND_OPS.items()}
    assert len(augment.RAND_OPS) == 15 and levels["AutoContrast"] == ()
    assert abs(levels["Rotate"][0]) == pytest.approx(21.0)
    assert abs(levels["ShearX"][0]) == pytest.approx(0.21)
    assert abs(levels["TranslateXRel"][0]) == pytest.approx(0.315)
    assert levels["PosterizeIncreasing"] == (2,) and levels["SolarizeIncreasing"] == (77,)
    assert levels["SolarizeAdd"] == (77,)
    assert levels["ContrastIncreasing"][0] in (pytest.approx(1.63), pytest.approx(0.37))
    with pytest.raises(cli.InputError, match="rand-m"):
        augment.RandAugment("rand-m7-n4")  # only the increasing op set is written



def test_rand_augment_draws_on_fixed_seeds():
    """Each of the N drawn ops fires with p = 0.5; ops are uniform over the 15; the magnitude
    is N(7, 0.5^2); one draw per clip, the same on every frame."""
    ra, rng = augment.RandAugment(), np.random.default_rng(0)
    draws = [ra.draw(rng) for _ in range(2000)]
    fired = sum(len(d) for d in draws) / (4 * 2000)
    assert abs(fired - 0.5) < 3 * (0.25 / 8000) ** 0.5
    names = [n for d in draws for n, _ in d]
    assert set(names) == set(augment.RAND_OPS)
    assert max(map(names.count, augment.RAND_OPS)) < 2 * len(names) / 15  # about uniform
    mags = np.array([abs(args[0]) / 3 for d in draws for n, args in d if n == "Rotate"])
    assert abs(mags.mean() - 7) < 0.1 and abs(mags.std() - 0.5) < 0.1
    frame = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    clip = torch.from_numpy(np.stack([frame, frame]))
    out = ra(clip, np.random.default_rng(5))
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], clip[0])
    ops = ra.draw(np.random.default_rng(5))  # the same draws by hand, with PIL
    im = Image.fromarray(frame)
    for name, op_args in ops:
        im = augment.RAND_OPS[name][0](im, *op_args)
    assert np.array_equal(out[0].numpy(), np.asarray(im))
    rot = augment.RAND_OPS["Rotate"][0](Image.fromarray(frame), 21.0)  # bicubic, grey 128 corners
    assert np.asarray(rot)[0, 0].tolist() == [128, 128, 128]



def test_random_erasing_fresh_noise_in_every_frame():
    x = torch.zeros(3, 4, 32, 32)
    out = augment.random_erase(x.clone(), 1.0, np.random.default_rng(3))
    box = out.abs().sum((0, 1)) > 0  # (H, W): the erased box, the same in every frame
    assert all(torch.equal((out[:, t].abs().sum(0) > 0), box) for t in range(4))
    area = box.sum().item() / (32 * 32)
    assert 0.02 * 0.8 <= area <= 1 / 3 * 1.2
    assert not torch.equal(out[:, 0][:, box], out[:, 1][:, box])  # fresh noise per frame
    assert torch.equal(augment.random_erase(x.clone(), 0.0, np.random.default_rng(3)), x)


def test_reflect_band_is_a_reflect_padded_correlation():
    """B @ v equals F.pad(v, mode="reflect") correlated with the kernel, at the widest kernel
    reflect padding allows (k // 2 = n - 1); one row worked by hand."""
    torch.manual_seed(0)
    for n, k in ((7, 3), (7, 13), (5, 9), (40, 23)):
        kernel, v = torch.rand(k, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
        padded = F.pad(v[None, None], (k // 2, k // 2), mode="reflect")
        want = F.conv1d(padded, kernel[None, None])[0, 0]
        assert torch.allclose(augment.reflect_band(n, kernel) @ v, want, atol=1e-12)
    # n = 4, taps (a, b, c): row 0 sees v[1], v[0], v[1] -> (a + c) at column 1, b at column 0
    band = augment.reflect_band(4, torch.tensor([1.0, 10.0, 100.0]))
    assert band[0].tolist() == [10.0, 101.0, 0.0, 0.0]
    assert band[3].tolist() == [0.0, 0.0, 101.0, 10.0]
    with pytest.raises(ValueError, match="9 taps on 4"):
        augment.reflect_band(4, torch.ones(9))


def test_gaussian_blur_equals_torchvisions():
    """augment.GaussianBlur draws sigma as torchvision's v2.GaussianBlur does (the same global
    generator state after the call) and gives its output within float rounding (uint8: its
    rounding, ties aside, 1 level at most), for clips, images, non-square frames and
    rectangular kernels; PIL images and too-wide kernels go to torchvision's own code."""
    from torchvision.transforms import v2
    cases = [((4, 3, 40, 56), 13), ((3, 32, 32), 3), ((2, 3, 30, 24), (5, 9)), ((3, 9, 9), 17)]
    for shape, k in cases:
        for dtype in (torch.float32, torch.uint8):
            x = torch.randint(0, 256, shape, dtype=torch.uint8).to(dtype)
            x = x / 255 if dtype == torch.float32 else x
            torch.manual_seed(3)
            want, after = v2.GaussianBlur(k, (0.1, 2.0))(x), torch.rand(1)
            torch.manual_seed(3)
            got = augment.GaussianBlur(k, (0.1, 2.0))(x)
            assert torch.equal(torch.rand(1), after) and got.dtype == want.dtype
            tol = 1e-6 if dtype == torch.float32 else 1.0
            assert (got.float() - want.float()).abs().max() <= tol, (shape, k, dtype)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), np.uint8))
    torch.manual_seed(1)
    got = augment.GaussianBlur(5, (0.5, 1.5))(image)
    torch.manual_seed(1)
    assert np.array_equal(np.asarray(got), np.asarray(v2.GaussianBlur(5, (0.5, 1.5))(image)))
