"""timm-style video augmentations of the VideoMAE fine-tuning recipe, written without timm:
RandAugment `rand-m{M}-n{N}-mstd{S}-inc1` (one draw per clip, applied to every frame),
random erasing in "cube" mode (one box in every frame, fresh noise per frame), and the
random-resized crop of VideoMAE's `random_resized_crop` (one box for the clip, bilinear
without antialiasing), and the BYOL-style Gaussian blur as two banded matrix products
(`GaussianBlur`, torchvision's transform computed faster on the CPU). Every draw comes from the caller's `numpy.random.Generator` (the
sample's, from `data.sample_np_rng`), never from a global generator. Used by SIGMA's
fine-tuning and linear probe (spec sigma.md §2.2), and by the video methods to come.
"""
import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torchvision.transforms import v2

from common import cli


def _negate(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() > 0.5 else v  # timm's _randomly_negate


FILL = (128, 128, 128)  # timm's _FILL: the official video RandAugment sets no img_mean
# timm's "increasing" RandAugment ops (inc1): name -> (PIL op, level in [0, 10] -> its arguments)
RAND_OPS = {
    "AutoContrast": (lambda im: ImageOps.autocontrast(im), lambda m, r: ()),
    "Equalize": (lambda im: ImageOps.equalize(im), lambda m, r: ()),
    "Invert": (lambda im: ImageOps.invert(im), lambda m, r: ()),
    "Rotate": (lambda im, deg: im.rotate(deg, resample=Image.BICUBIC, fillcolor=FILL),
               lambda m, r: (_negate(m / 10 * 30, r),)),
    "PosterizeIncreasing": (lambda im, bits: ImageOps.posterize(im, bits) if bits < 8 else im,
                            lambda m, r: (4 - int(m / 10 * 4),)),
    "SolarizeIncreasing": (lambda im, thr: ImageOps.solarize(im, thr),
                           lambda m, r: (256 - int(m / 10 * 256),)),
    "SolarizeAdd": (lambda im, add: im.point([min(255, i + add) if i < 128 else i
                                              for i in range(256)] * 3),
                    lambda m, r: (int(m / 10 * 110),)),
    "ColorIncreasing": (lambda im, f: ImageEnhance.Color(im).enhance(f),
                        lambda m, r: (max(0.1, 1 + _negate(m / 10 * 0.9, r)),)),
    "ContrastIncreasing": (lambda im, f: ImageEnhance.Contrast(im).enhance(f),
                           lambda m, r: (max(0.1, 1 + _negate(m / 10 * 0.9, r)),)),
    "BrightnessIncreasing": (lambda im, f: ImageEnhance.Brightness(im).enhance(f),
                             lambda m, r: (max(0.1, 1 + _negate(m / 10 * 0.9, r)),)),
    "SharpnessIncreasing": (lambda im, f: ImageEnhance.Sharpness(im).enhance(f),
                            lambda m, r: (max(0.1, 1 + _negate(m / 10 * 0.9, r)),)),
    "ShearX": (lambda im, f: im.transform(im.size, Image.AFFINE, (1, f, 0, 0, 1, 0),
                                          resample=Image.BICUBIC, fillcolor=FILL),
               lambda m, r: (_negate(m / 10 * 0.3, r),)),
    "ShearY": (lambda im, f: im.transform(im.size, Image.AFFINE, (1, 0, 0, f, 1, 0),
                                          resample=Image.BICUBIC, fillcolor=FILL),
               lambda m, r: (_negate(m / 10 * 0.3, r),)),
    "TranslateXRel": (lambda im, f: im.transform(im.size, Image.AFFINE,
                                                 (1, 0, f * im.size[0], 0, 1, 0),
                                                 resample=Image.BICUBIC, fillcolor=FILL),
                      lambda m, r: (_negate(m / 10 * 0.45, r),)),
    "TranslateYRel": (lambda im, f: im.transform(im.size, Image.AFFINE,
                                                 (1, 0, 0, 0, 1, f * im.size[1]),
                                                 resample=Image.BICUBIC, fillcolor=FILL),
                      lambda m, r: (_negate(m / 10 * 0.45, r),)),
}
class RandAugment:
    """timm's RandAugment `rand-m{M}-n{N}-mstd{S}-inc1` (official --aa rand-m7-n4-mstd0.5-inc1,
    spec §2.2), for a clip: N ops drawn with replacement from the 15 "increasing" ops; each
    is applied with p = 0.5, at magnitude M + N(0, S^2) clipped to [0, 10] (level 10 = the
    op's full range: rotate 30 deg, shear 0.3, translate 0.45 of the side, enhance factor
    1 +- 0.9, posterize 4 -> 0 bits removed, solarize threshold 256 -> 0, solarize-add 110),
    signs drawn per op; every draw is made once per clip and applied to every frame (PIL,
    bicubic, fill grey 128). Draws come from the sample's numpy generator."""

    def __init__(self, spec: str = "rand-m7-n4-mstd0.5-inc1"):
        parts, vals = spec.split("-"), {}
        for part in parts[1:]:
            key = re.match(r"[a-z]*", part).group()
            vals[key] = part[len(key):]
        if parts[0] != "rand" or vals.get("inc") != "1":
            raise cli.InputError(f"--rand-augment {spec!r}: expected rand-m<M>-n<N>-mstd<S>-inc1 "
                                 f"(timm's format; only the 'increasing' op set is written here)")
        self.m, self.n = float(vals.get("m", 10)), int(vals.get("n", 2))
        self.std = float(vals.get("mstd", 0))

    def draw(self, rng: np.random.Generator) -> list:
        """[(op name, args)] of the ops that fire for one clip."""
        out = []
        for name in rng.choice(list(RAND_OPS), self.n, replace=True):
            if rng.random() > 0.5:  # prob 0.5 per op
                continue
            m = min(max(rng.normal(self.m, self.std) if self.std > 0 else self.m, 0.0), 10.0)
            out.append((str(name), RAND_OPS[name][1](m, rng)))
        return out

    def __call__(self, frames: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> uint8 (T, H, W, 3), the same ops on every frame."""
        ops = self.draw(rng)
        if not ops:
            return frames
        out = []
        for f in frames.numpy():
            im = Image.fromarray(f)
            for name, op_args in ops:
                im = RAND_OPS[name][0](im, *op_args)
            out.append(np.asarray(im))
        return torch.from_numpy(np.stack(out))


def random_erase(x: torch.Tensor, p: float, rng: np.random.Generator) -> torch.Tensor:
    """timm's RandomErasing(p, mode "pixel", count 1, area 0.02-1/3, aspect 0.3-1/0.3) in the
    official "cube" mode (VideoMAE's random_erasing.py `_erase_cube`): one box at the same place
    in every frame, filled with fresh N(0, 1) noise in each frame (spec §2.2). x: normalised
    (3, T, H, W), changed in place."""
    if rng.random() > p:
        return x
    _, T, H, W = x.shape
    for _ in range(100):  # the cube mode's 100 tries (the per-image mode makes 10)
        area = rng.uniform(0.02, 1 / 3) * H * W
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if w < W and h < H:
            top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            g = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
            x[:, :, top:top + h, left:left + w] = torch.randn(3, T, h, w, generator=g)
            break
    return x


def random_resized_crop(frames: torch.Tensor, size: int, scale: tuple,
                        rng: np.random.Generator) -> torch.Tensor:
    """VideoMAE's random_resized_crop (`_get_param_spatial_crop`, the torchvision rule): 10
    tries of an area in `scale` and a log-uniform ratio in [0.75, 1.3333]; if none fits, the
    centre crop at the ratio clamped to that range. The same box in every frame, resized with
    bilinear interpolation, no antialiasing (official F.interpolate).
    (T, 3, H, W) float -> (T, 3, size, size)."""
    H, W = frames.shape[-2:]
    lo, hi = 0.75, 1.3333  # the official ratio range (not exactly 4/3)
    for _ in range(10):
        area = rng.uniform(*scale) * H * W
        ratio = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        w, h = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if 0 < w <= W and 0 < h <= H:
            top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            break
    else:  # centre crop at the clamped ratio
        if W / H < lo:
            w, h = W, int(round(W / lo))
        elif W / H > hi:
            w, h = int(round(H * hi)), H
        else:
            w, h = W, H
        top, left = (H - h) // 2, (W - w) // 2
    crop = frames[..., top:top + h, left:left + w]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)


def blur_kernel(size: int, sigma_max: float = 2.0) -> int:
    """Odd Gaussian-blur kernel for `size`-px images (the BYOL-style blur of SCE and COMEDIAN):
    the odd number nearest 10 % of the size (23 at 224 px, the eztorch configs'), or
    2 ceil(3 sigma_max) + 1 (13) where that is longer, so that +-3 sigma fits; never more than
    the image (the largest odd number <= size)."""
    k = max(2 * round(0.05 * size) + 1, 2 * math.ceil(3 * sigma_max) + 1)
    return min(k, size - 1 + size % 2)


def reflect_band(n: int, kernel: torch.Tensor) -> torch.Tensor:
    """(n, n) matrix B such that B @ v is the 1-D correlation of v (n,) with the odd `kernel`
    (k,) under reflect padding (torch.nn.functional.pad mode "reflect": -1 -> 1, n -> n - 2).
    Raises ValueError where k // 2 >= n (reflect padding cannot be that wide)."""
    r = kernel.numel() // 2
    if r >= n:
        raise ValueError(f"reflect_band: kernel of {kernel.numel()} taps on {n} samples")
    idx = (torch.arange(n)[:, None] + torch.arange(-r, r + 1)[None]).abs()  # (n, k)
    idx = torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)
    band = torch.zeros(n, n, dtype=kernel.dtype)
    return band.scatter_add_(1, idx, kernel.expand(n, -1).contiguous())


class GaussianBlur(v2.GaussianBlur):
    """torchvision's `v2.GaussianBlur` (the same sigma draw from torch's global generator, the
    same normalised kernel exp(-x^2 / 2 sigma^2) over k taps, reflect padding, uint8 rounded
    back) computed as B_h @ x @ B_w^T with banded (H, H) and (W, W) matrices, where
    torchvision runs a full k x k depthwise convolution: about 5x faster on the CPU for the
    23-tap kernel at 224 px, outputs within float rounding (~1e-6) of torchvision's. Tensors of
    shape (..., H, W); anything else (PIL images, a kernel wider than the image) is passed to
    torchvision's own code."""

    def transform(self, inpt, params: dict):
        kh, kw = self.kernel_size[1], self.kernel_size[0]  # torchvision: (x, y) = (w, h)
        if (type(inpt) is not torch.Tensor or inpt.ndim < 2 or kh // 2 >= inpt.shape[-2]
                or kw // 2 >= inpt.shape[-1]):
            return super().transform(inpt, params)
        fp = torch.is_floating_point(inpt)
        dtype = inpt.dtype if fp else torch.float32

        def band(n: int, k: int, sigma: float) -> torch.Tensor:
            x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=torch.float64)
            g = torch.exp(-0.5 * (x / sigma) ** 2)
            return reflect_band(n, g / g.sum()).to(dtype)
        sx, sy = params["sigma"]
        out = band(inpt.shape[-2], kh, sy) @ inpt.to(dtype) @ band(inpt.shape[-1], kw, sx).T
        return out if fp else out.round_().to(inpt.dtype)
