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
