"""Multi-view video testing, shared by the video methods (SIGMA's fine-tuning test, SCE's
30-view protocol): the short-side resize and the uniform spatial crops of the test views, and
the two ways of merging V views of a clip, softmax scores averaged (classification) or
features averaged (retrieval), with every clip counted once under DDP.

A test loader yields `(views (B, V, C, T, H, W), labels (B,), indices (B,))`, or None for a
batch whose clips were all unreadable (`data.SafeDataset(replace=False)` +
`data.collate_readable`); build it with `data.make_loader(ds, b, train=False)` (no padding,
so each clip lands in exactly one rank's share).
"""
import math
from contextlib import nullcontext
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from common import dist, evaluate


def short_side_resize(frames: Tensor, size: int) -> Tensor:
    """(T, C, H, W) float -> (T, C, h, w) with the short side `size` and the long side
    int(long x size / short) (floor), bilinear, align_corners False, no antialiasing: the
    test resize of pytorchvideo's `short_side_scale` and of VideoMAE's test loader."""
    h, w = frames.shape[-2:]
    out = (size, int(w * size / h)) if h <= w else (int(h * size / w), size)
    return F.interpolate(frames, size=out, mode="bilinear", align_corners=False)


def uniform_crop_offsets(length: int, size: int, n: int, ceil: bool = False) -> list:
    """Offsets of `n` crops of `size` spread evenly along a side of `length`: k x step with
    step = (length - size) / (n - 1), rounded down (VideoMAE's `int(k * step)`) or up with
    `ceil` (pytorchvideo's `uniform_crop`: left, ceil-centre, right for n = 3); n = 1 gives
    the centre crop, (length - size) // 2 (ceil: rounded up)."""
    if size > length:
        raise ValueError(f"crop {size} larger than the side {length}")
    rnd = math.ceil if ceil else math.floor
    if n == 1:
        return [rnd((length - size) / 2)]
    step = (length - size) / (n - 1)
    return [min(rnd(k * step), length - size) for k in range(n)]


def uniform_crops(frames: Tensor, size: int, n: int, ceil: bool = False) -> list:
    """`n` square crops of `size` along the long side of (..., H, W) frames (the short side
    is taken whole, so resize it to `size` first): n tensors (..., size, size)."""
    h, w = frames.shape[-2:]
    offs = uniform_crop_offsets(max(h, w), size, n, ceil)
    if h > w:
        return [frames[..., o:o + size, (w - size) // 2:(w - size) // 2 + size] for o in offs]
    return [frames[..., (h - size) // 2:(h - size) // 2 + size, o:o + size] for o in offs]


@evaluate.full_fp32()
@torch.no_grad()
def multi_view_accuracy(model: Callable[[Tensor], Tensor], loader: Iterable, device,
                        amp=None) -> dict:
    """Top-1 / top-5 (percent) of the class scores `model(x) -> (B*V, K)` softmaxed per view
    and averaged over each clip's V views (the 'merge' of VideoMAE and pytorchvideo's
    30-view test). Each clip is counted once over all ranks (counts all-reduced); putting
    the model in eval mode is the caller's job."""
    counts = torch.zeros(3, device=device, dtype=torch.float64)
    for batch in loader:
        if batch is None:
            continue
        x, y = batch[0], torch.as_tensor(batch[1]).to(device)
        B, V = x.shape[:2]
        with amp.autocast() if amp is not None else nullcontext():
            logits = model(x.flatten(0, 1).to(device, non_blocking=True))
        prob = logits.float().softmax(1).view(B, V, -1).mean(1)  # (B, K)
        top = prob.topk(min(5, prob.shape[1]), 1).indices
        counts += torch.stack([(top[:, 0] == y).sum(), (top == y[:, None]).any(1).sum(),
                               torch.tensor(B, device=device)]).double()
    counts = dist.all_reduce(counts, "sum")
    n = max(counts[2].item(), 1)
    return {"top1": 100 * counts[0].item() / n, "top5": 100 * counts[1].item() / n,
            "count": int(counts[2].item())}


def multi_view_features(fn: Callable[[Tensor], Tensor], loader: Iterable, device,
                        amp=None) -> tuple:
    """Features `fn(x) -> (B*V, D)` averaged over each clip's V views (no softmax), via
    `evaluate.extract_features`: every rank gets all (N, D) features and (N,) labels in
    dataset order, each clip once."""
    def averaged(x: Tensor) -> Tensor:  # (B, V, ...) -> (B, D)
        B, V = x.shape[:2]
        return fn(x.flatten(0, 1)).float().view(B, V, -1).mean(1)
    return evaluate.extract_features(averaged, loader, device, amp)
