"""T-CoRe: temporal correspondence for self-supervised video representation learning.

Y. Liu, Q. Xu, P. Wen, S. Ye, Y. Cong, Q. Huang, "When the Future Becomes the Past: Taming
Temporal Correspondence for Self-supervised Video Representation Learning", CVPR 2025
(arXiv:2503.15096); details from the official code (spec: ../shared/specs/tcore.md, "spec §n").

Method in five lines: from a video, sandwich sampling draws a current frame and a past and a
future frame a fraction of the clip length away (Eq. 1). DINOv2-style self-distillation runs on
the current frame: an EMA teacher sees 2 unmasked global crops, the student the 2 block-masked
global crops and 8 local crops (DINO CLS loss + KoLeo, Eqs. 10-11). The student itself, without
gradient, encodes the past and future frames; a Patch Matching Module (cross-attention from the
current tokens to the auxiliary tokens, self-attention, FFN; Eqs. 2-5) rebuilds the masked tokens
from each, and the head's output is matched to the teacher's (Eq. 8), with an MSE squeezing the
past and future predictions together (Eq. 9). Evaluated by label propagation (DAVIS, JHMDB, VIP).

Launch (Tab. 1 ViT-S: 400 "epochs" of 936 steps at a global batch of 256, spec §3):
    python tcore.py                                            # CPU demo, synthetic videos
    python tcore.py --data ~/data/Kinetics-400/frames --batch-size 64   # 1 GPU: the same
                                        # 374,400 steps at a quarter of the batch, lr x sqrt(1/4)
    torchrun --nproc_per_node=4 tcore.py --data ~/data/Kinetics-400/frames \
        --davis ~/data/DAVIS --jhmdb ~/data/jhmdb/jhmdb_vallist.txt \
        --vip ~/data/VIP/vip_vallist.txt                       # 4 GPUs x 64 (the paper's)
    torchrun --nproc_per_node=8 tcore.py --data ~/data/Kinetics-400/frames --batch-size 32
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        tcore.py --preset k400-vitb --data ~/data/Kinetics-400/frames --batch-size 8  # 16 x 8
    python tcore.py --eval-only --init-from vits16_400ep_K400.pth --davis ~/data/DAVIS \
        --jhmdb ~/data/jhmdb/jhmdb_vallist.txt --vip ~/data/VIP/vip_vallist.txt  # released
        # + --vos-davis ~/data/DAVIS --vos-ytvos ~/data/ytvos_train: SIGMA's Tab. 4 VOS
An "epoch" is the official fixed OFFICIAL_EPOCH_LENGTH = 936 steps whatever the batch (one pass
over K400 at the paper's 4 x 64; half a pass at k400-vitb's 4 x 32, whose 200 epochs are the
official 187,200 steps); `--epoch-length 0` makes it one pass over the data instead (374,600
steps at 4 x 32). Which of the two the paper's Tab. 2 ViT-B run used is unknown upstream: the
yaml sets 32 per GPU and the code keeps 936, but the run's command is not published.
Presets: k400-vits (= the defaults), k400-vitb (Tab. 2), demo. `--lr-groups fixed` is the
post-paper optimiser fix (spec §6.1); `--centering sinkhorn` the DINOv2 paper's teacher.

Deviations, with reasons:
- The PMM returns its output only (the official block returns a 3-tuple, which makes stacked
  blocks crash, spec §6.4); one block, as the paper and the code use.
- `--accum-iter` is not offered (the per-module clipping runs between unscale and step here);
  take the global batch from processes x --batch-size.
- Frame folders are ordered by the last number in a file name (`common.video`), the official
  code sorts names lexicographically: the same order for zero-padded names (spec §2). Videos
  are found by scanning `<root>/<class>/<video>` (frame folders or files) or a list file; the
  official `entries-TRAIN.npy` index and its 239,789-entry assertion are not used.
- Schedules follow DINOv2 (`np.linspace` warm-up with its endpoint, then the cosine), indexed
  by our global step. The data come in shuffled passes (`common.data`) where the official
  code uses an infinite sharded sampler: both visit every video once per pass.
- AMP is bf16 by default on CUDA (project convention); `--amp fp16` is the official fp16 with a
  GradScaler. Teacher targets, softmaxes, losses and centres are fp32 either way.
- Evaluation frames are decoded with PIL and resized bilinearly without antialiasing in torch
  (`common.propagation`), the official code uses cv2 INTER_LINEAR: equal up to rounding.
  Released teacher weights load strictly (registers included), not with strict=False.
- Drop path is DINOv2's nested-list form everywhere in the student (exactly int(0.9 b) samples
  keep each residual, scaled by b / kept), also on the auxiliary frames (spec §1).
- The demo preset (about 6 minutes on one CPU core): a 4-block ViT of width 192, patch 8, 64-px
  global and 32-px local crops, 4 local crops, a 256-256-64 head with 256 prototypes, bf16 on
  the CPU, on 96 synthetic "camouflage" videos (objects in the background's two colours, told
  apart only by texture; `synthetic.camouflage_videos`); label propagation on 8 other such
  videos in the DAVIS format at 96 x 160 (a 12 x 20 grid), GT at eval size; three random
  initialisations (the noise floor) and a raw-pixel baseline side by side; base lr 0.01 (peak
  0.00125 at batch 16, square-root scaling) and 256 prototypes, chosen on another draw of the
  evaluation set (`--synthetic-seed 1`: J&F 0.245 against 0.197 with base lr 0.06 and 1,024
  prototypes; the random inits 0.222-0.248). It runs the whole pipeline; it does not show
  T-CoRe helping.
"""
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate
from torchvision.transforms import v2

from common import (checkpoint, cli, data, dist, log, optim, propagation, synthetic, training,
                    video, vit, vos)
from common.evaluate import verdict  # DESIGN §3's rule (this file's `evaluate` propagates)


# ---- 2. Arguments ----
@dataclass
class Args:
    # run
    output_dir: str = ""
    """run folder (default runs/tcore-<time>): args.json, log.jsonl, last.pt, summary.json"""
    seed: int = 0
    """random seed (frames and crops derive from seed, epoch and index; masks from the step)"""
    epochs: int = 400
    """pretraining epochs (Sec. 4.1: 400 for ViT-S on K400)"""
    epoch_length: int = 936
    """steps per "epoch", whatever the batch: the run is --epochs x this many steps and every
    schedule (warm-ups, teacher temperature, last-layer freeze) counts in them (the official
    OFFICIAL_EPOCH_LENGTH 936, spec §3); 0: one pass over the data (the loader's length)"""
    max_steps: int = 0
    """stop after this many optimiser steps (0: all epochs; the schedules still span all)"""
    log_every: int = 50
    """steps between log lines"""
    ckpt_every: int = 1000
    """steps between checkpoints (last.pt, atomic); also written at the end"""
    resume: str = ""
    """checkpoint to resume from (default: <output_dir>/last.pt when it exists)"""
    init_from: str = ""
    """weights to start from / evaluate: our last.pt or a released {"teacher": ...} file"""
    eval_only: bool = False
    """skip pretraining: evaluate --init-from (or a random init)"""
    bench: bool = False
    """time the training step on random tensors and the data pipeline, print JSON, exit"""
    # data
    data: str = ""
    """a folder holding train.csv (lines `path label`, as sigma.py and sce_video.py) or such a
    list file, Kinetics frames (ROOT/frames/train/<class>/<video>/NNNNN.jpg), or a folder of
    class folders of videos or frame folders; empty: synthetic videos"""
    current_range: tuple[float, float] = (0.3, 0.7)
    """current frame, as fractions of the clip length T (spec §2)"""
    past_offset: tuple[float, float] = (0.15, 0.25)
    """past-frame offset range, fractions of T (Eq. 1, spec §2)"""
    future_offset: tuple[float, float] = (0.15, 0.25)
    """future-frame offset range, fractions of T (Eq. 1, spec §2)"""
    global_size: int = 224
    """global crop size (spec §1)"""
    local_size: int = 96
    """local crop size (spec §1)"""
    local_crops: int = 8
    """local crops of the current frame (spec §1)"""
    global_scale: tuple[float, float] = (0.32, 1.0)
    """area range of the global crops (spec §2)"""
    local_scale: tuple[float, float] = (0.05, 0.32)
    """area range of the local crops (spec §2)"""
    num_workers: int = 10
    """data loader workers per process (spec §3)"""
    max_fail_fraction: float = 0.05
    """stop when more than this fraction of the videos is unreadable (one is always skipped)"""
    # model
    model: Literal["tiny", "small", "base"] = "small"
    """ViT size: ViT-S/16 (Tab. 1), ViT-B/16 (Tab. 2); tiny for the demo"""
    depth: int = 0
    """backbone depth override (0: the size's default, 12)"""
    patch_size: int = 16
    """patch size (Sec. 4.1)"""
    registers: int = 4
    """register tokens (spec §1: in the code, not in the paper)"""
    layerscale: float = 1e-5
    """LayerScale initial value (spec §1)"""
    drop_path: float = 0.1
    """drop-path rate of every student block (spec §1)"""
    head_hidden: int = 2048
    """DINO head hidden width (spec §1)"""
    head_bottleneck: int = 256
    """DINO head bottleneck (spec §1)"""
    head_prototypes: int = 65536
    """DINO head output dimension K (spec §1)"""
    pmm_heads: int = 16
    """PMM attention heads at both sizes (spec §1)"""
    pmm_attn_mul: int = 4
    """PMM cross-attention output scale before the skip (spec §1)"""
    # method
    mask_prob: float = 0.5
    """fraction of the global crops that are masked, int(2B p) of them (Tab. 3d, spec §1)"""
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    """range of the stratified mask ratios (Tab. 3d, spec §1)"""
    student_temp: float = 0.1
    """student softmax temperature (spec §3)"""
    teacher_temp: float = 0.07
    """teacher temperature after warm-up (Eq. 7, spec §3)"""
    warmup_teacher_temp: float = 0.04
    """teacher temperature at step 0 (spec §3)"""
    warmup_teacher_temp_epochs: int = 30
    """epochs of linear teacher-temperature warm-up (spec §3)"""
    center_momentum: float = 0.9
    """centre EMA momentum (Eq. 7, spec §3)"""
    centering: Literal["centering", "sinkhorn"] = "centering"
    """teacher normalisation: the code's centering (one-step lag) or DINOv2's Sinkhorn-Knopp"""
    koleo_weight: float = 0.1
    """KoLeo weight (Eq. 12, spec §1)"""
    past_weight: float = 0.8
    """weight of the past reconstruction loss (Eq. 12, Sec. 4.1)"""
    future_weight: float = 0.8
    """weight of the future reconstruction loss (Eq. 12, Sec. 4.1)"""
    squeeze_weight: float = 20.0
    """weight of the past-future squeezing MSE (Eq. 12, Sec. 4.1)"""
    # optimisation
    batch_size: int = 64
    """batch size per process (spec §3: 4 GPUs x 64 = 256 for ViT-S)"""
    base_lr: float = 0.002
    """lr = base_lr x sqrt(global batch / 1024) (spec §3: 1e-3 at 256)"""
    min_lr: float = 1e-6
    """cosine floor (spec §3)"""
    pmm_lr_mul: float = 0.1
    """the PMM's peak lr as a fraction of lr (spec §3)"""
    warmup_epochs: int = 20
    """linear lr warm-up (spec §3: 20 for ViT-S, 10 for ViT-B)"""
    weight_decay: float = 0.04
    """weight decay at step 0, cosine to --weight-decay-end (spec §3)"""
    weight_decay_end: float = 0.4
    """final weight decay (spec §3)"""
    momentum_teacher: float = 0.992
    """teacher EMA momentum at step 0, cosine to 1 (Eq. 6, spec §3)"""
    layer_decay: float = 0.9
    """layer-wise lr decay (spec §3; inactive with --lr-groups first-release)"""
    patch_embed_lr_mult: float = 0.2
    """extra lr factor of the patch embedding (spec §3)"""
    clip_grad: float = 3.0
    """max grad norm, separately for backbone, head and PMM (spec §3)"""
    freeze_last_layer_epochs: int = 1
    """epochs with the head's last layer at lr 0 (spec §3)"""
    lr_groups: Literal["first-release", "fixed"] = "first-release"
    """first-release: every student parameter at the plain lr (the paper's runs); fixed: layer
    decay, patch-embed factor and last-layer freeze kept (commit dbd9306, spec §6.1)"""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas (spec §3)"""
    # system
    device: str = "auto"
    """cpu, cuda, cuda:N or auto"""
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    """autocast dtype (auto: bf16 on CUDA, none on CPU); losses always run in fp32"""
    compile: bool = False
    """torch.compile the student and teacher backbones and the PMM (not the head, whose input
    size changes every step)"""
    # evaluation (label propagation, spec §4)
    davis: str = ""
    """DAVIS-2017 root (JPEGImages/480p, Annotations/480p, ImageSets/2017/val.txt)"""
    jhmdb: str = ""
    """JHMDB file list (lines `<joint_positions.mat> <frames folder>`)"""
    vip: str = ""
    """VIP file list (lines `<Images/videosN> <Annotations/Category_ids/videosN>`)"""
    davis_size: tuple[int, int] = (480, 880)
    """DAVIS frame size (H, W) fed to the ViT (spec §4)"""
    davis_native_gt: bool = True
    """score DAVIS at the native GT size (spec §4: T-CoRe's eval.sh); off: GT at --davis-size"""
    jhmdb_size: tuple[int, int] = (320, 320)
    """JHMDB frame size (H, W) (spec §4)"""
    vip_long_side: int = 880
    """VIP long side; the short side is floored to a multiple of 64 (spec §4)"""
    topk: int = 7
    """top-k keys per query on DAVIS and JHMDB (spec §4)"""
    vip_topk: int = 10
    """top-k on VIP (spec §4)"""
    temperature: float = 0.7
    """softmax temperature of the affinities (spec §4)"""
    radius: float = 20.0
    """spatial radius (grid cells, strict <) on the short-term context (spec §4)"""
    context: int = 20
    """previous frames in the short-term context (spec §4)"""
    vos_davis: str = ""
    """DAVIS-2017 root for SIGMA's Tab. 4 unsupervised VOS (k-means of the patch tokens of
    16-frame clips at 224, common/vos.py)"""
    vos_ytvos: str = ""
    """YouTube-VOS root for Tab. 4 VOS (JPEGImages, Annotations, meta.json; ROOT/val.txt selects)"""
    eval_random_init: bool = False
    """also evaluate randomly initialised teachers and raw pixels, side by side (the demo does)"""
    random_init_seeds: int = 1
    """with --eval-random-init: how many random initialisations (seeds seed, seed + 1, ...);
    their J&F spread is the verdict's random-init noise"""
    synthetic_seed: int = 0
    """demo without --davis: seed of the embedded camouflage DAVIS set (0: the verdict's
    split; 1: the validation split the demo's hyper-parameters were chosen on)"""
    trained_spread: float = 0.0
    """std of DAVIS J&F over >= 3 training seeds, measured beforehand, for a one-run verdict;
    0: none (the verdict then cannot say "helps")"""
    preset: str = ""
    """the preset applied (set by --preset)"""


PRESETS = {
    "k400-vits": dict(),  # Tab. 1: DAVIS J&F 64.7, VIP mIoU 37.8, JHMDB PCK@0.1 47.0
    # Tab. 2: 200 epochs, global batch 128 (4 x 32), warm-up 10 (paper); base_lr lost (spec §3);
    # 200 x 936 = 187,200 steps as the official code runs it (half a pass over K400 per epoch)
    "k400-vitb": dict(model="base", epochs=200, warmup_epochs=10, batch_size=32),
    "demo": dict(model="tiny", depth=4, patch_size=8, global_size=64, local_size=32,
                 local_crops=4, head_hidden=256, head_bottleneck=64, head_prototypes=256,
                 batch_size=16, epochs=24, epoch_length=0, warmup_epochs=2,
                 warmup_teacher_temp_epochs=4,
                 freeze_last_layer_epochs=0, base_lr=0.01, amp="bf16", num_workers=1,
                 log_every=16, ckpt_every=1000, davis_size=(96, 160), davis_native_gt=False,
                 eval_random_init=True, random_init_seeds=3),
}


# ---- 3. Data ----
MEAN, STD = propagation.MEAN, propagation.STD


def sandwich_indices(T: int, rng: np.random.Generator, current=(0.3, 0.7), past=(0.15, 0.25),
                     future=(0.15, 0.25)) -> tuple:
    """(past, current, future) frame indices of a clip of T frames (Eq. 1, spec §2). Offsets
    are fractions of T and every range is inclusive:
        cur ~ U{int(c0 T), int(c1 T) - 1}; past ~ U{cur - int(p1 T), cur - int(p0 T)};
        fut ~ U{cur + int(f0 T), min(cur + int(f1 T), T - 1)}
    When the ranges are empty or overlap (short clips), all three are one random frame."""
    cs, ce = int(current[0] * T), int(current[1] * T)
    if cs < ce:
        cur = int(rng.integers(cs, ce))
        ps, pe = cur - int(past[1] * T), cur - int(past[0] * T)
        fs, fe = cur + int(future[0] * T), cur + int(future[1] * T)
        if ps < pe <= cur <= fs < fe:
            return int(rng.integers(ps, pe + 1)), cur, int(rng.integers(fs, min(fe, T - 1) + 1))
    i = int(rng.integers(0, T))
    return i, i, i


def centre_box(h: int, w: int, ratio=(3 / 4, 4 / 3)) -> tuple:
    """torchvision's RandomResizedCrop fallback box (top, left, height, width): the whole frame
    if its aspect ratio is in `ratio`, else the largest centred crop at the clipped ratio."""
    r = w / h
    if r < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif r > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def colour(blur_p: float, solarize_p: float = 0.0) -> v2.Compose:
    """DINOv2 colour pipeline with the *effective* blur probability (spec §2: global 1 never
    blurs, global 2 blurs with 0.9 and solarises with 0.2, locals blur with 0.5)."""
    ops = [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(0.2)]
    if blur_p:
        ops.append(v2.RandomApply([v2.GaussianBlur(9, sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p:
        ops.append(v2.RandomSolarize(128, p=solarize_p))
    return v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


class SandwichClips(Dataset):
    """Per video and epoch: a sandwich triplet (Eq. 1) and its views, all drawn from
    (seed, epoch, index). Returns
      globals (2, 3, G, G): current frame, RandomResizedCrop (scale 0.32-1, bicubic, no flip),
                            colour pipelines 1 and 2;
      locals (L, 3, l, l):  current frame, RandomResizedCrop (0.05-0.32) + flip, blur 0.5;
      aux (2, 2, 3, G, G):  past and future frames, both cut with the same full-frame centre
                            box stretched to G x G, views 1 and 2 with pipelines 1 and 2;
      key (epoch, index):   ints, from which `MaskingCollate` draws the batch's masks."""

    def __init__(self, videos: list, args: Args):
        self.samples = [(v, -1) for v in videos]  # SafeDataset names failing files from this
        self.args, a = args, args
        bicubic = v2.InterpolationMode.BICUBIC
        self.global_crop = v2.RandomResizedCrop(a.global_size, a.global_scale, (3 / 4, 4 / 3),
                                                bicubic, antialias=True)
        self.local_crop = v2.Compose([
            v2.RandomResizedCrop(a.local_size, a.local_scale, (3 / 4, 4 / 3), bicubic,
                                 antialias=True), v2.RandomHorizontalFlip(0.5)])
        self.colour1, self.colour2, self.colour_local = colour(0.0), colour(0.9, 0.2), colour(0.5)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> tuple:
        epoch, index = data.split_key(key)
        path, a = self.samples[index][0], self.args
        rng = data.sample_np_rng(a.seed, epoch, index)
        T = video.video_length(path)
        p, c, f = sandwich_indices(T, rng, a.current_range, a.past_offset, a.future_offset)
        frames = video.read_clip(path, [p, c, f]).permute(0, 3, 1, 2)  # uint8 (3, 3, H, W)
        top, left, h, w = centre_box(*frames.shape[-2:])
        with torch.random.fork_rng(devices=[]):  # v2 transforms draw from torch's global RNG
            torch.default_generator.manual_seed(int(rng.integers(2 ** 62)))
            cur = frames[1]
            g = torch.stack([self.colour1(self.global_crop(cur)),
                             self.colour2(self.global_crop(cur))])
            loc = torch.stack([self.colour_local(self.local_crop(cur))
                               for _ in range(a.local_crops)])
            boxed = v2.functional.resized_crop(frames[[0, 2]], top, left, h, w,
                                               [a.global_size] * 2, v2.InterpolationMode.BICUBIC,
                                               antialias=True)  # same box for past and future
            aux = torch.stack([torch.stack([self.colour1(x), self.colour2(x)]) for x in boxed])
        return g, loc, aux, (epoch, index)


MASK_SEED_WORD = 3  # purpose word of the mask RNG (common.data uses 0, 1, 2 for its own)


class MaskingCollate:
    """The official collate in the loader's workers (spec §1, Masking): stacks the samples'
    views and draws the batch's block masks (`sample_masks` over its 2B global crops) from
    (seed, epoch, the batch's sample indices), so a batch's masks are the same whatever the
    number of workers and after a resume. Also computes, on the CPU, what the official
    collate hands to the step (`mask_indices`). Returns (globals (B, 2, 3, G, G), locals
    (B, L, 3, l, l), aux (B, 2, 2, 3, G, G), masks dict of `mask_indices`)."""

    def __init__(self, args: Args):
        self.seed, self.prob, self.ratio = args.seed, args.mask_prob, tuple(args.mask_ratio)
        self.grid = (args.global_size // args.patch_size,) * 2

    def __call__(self, samples: list) -> tuple:
        g, loc, aux = default_collate([s[:3] for s in samples])
        words = [MASK_SEED_WORD, self.seed, int(samples[0][3][0]), len(samples)]
        rng = np.random.default_rng(words + [int(s[3][1]) for s in samples])
        return g, loc, aux, mask_indices(sample_masks(2 * len(samples), self.grid, self.prob,
                                                      self.ratio, rng))


def mask_indices(masks: torch.Tensor) -> dict:
    """(2B, N) bool crop-major masks -> {"masks": masks, "idx": (M,) int64 positions of the
    masked patches in the flattened (2B N) tokens, "weight": (M,) float32 1/|masked patches
    of the position's crop|}, as the official collate (spec §1). Run it on the CPU (the
    loader's workers): M depends on the masks, so on a GPU it would wait for the device."""
    idx = masks.flatten().nonzero().squeeze(1)
    weight = (1 / masks.sum(1).clamp(min=1)).unsqueeze(1).expand_as(masks)[masks]
    return {"masks": masks, "idx": idx, "weight": weight}


def list_videos(root: str) -> list:
    """Videos (files or frame folders) of `root`, as the other video scripts read --data:
    `root/train.csv` or a list file (Kinetics lists, lines `path label [num_frames]` relative
    to the list's folder, `common.data.read_video_csv`, which names file:line on a malformed
    line); else Kinetics frames (`root/frames/train/<class>/<video>/` or
    `root/train/<class>/<video>`) or class folders `root/<class>/<video>`.
    Raises FileNotFoundError (nothing there) or cli.InputError (a malformed list)."""
    if os.path.isfile(root):
        records = data.read_video_csv(root)
        if not records:
            raise cli.InputError(f"{root}: empty video list")
        return [r.path for r in records]
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root}: no such file or folder")
    if (Path(root) / "train.csv").is_file():
        return list_videos(str(Path(root) / "train.csv"))
    folder = root
    for sub in ("frames/train", "train"):
        if (Path(root) / sub).is_dir():
            folder = str(Path(root) / sub)
            break
    try:
        return [r.path for r in data.read_class_folders(folder)[0]]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"--data {root}: no videos; expected {root}/train.csv (lines 'path label'), "
            f"Kinetics frames {root}/frames/train/<class>/<video>/00001.jpg, or class folders "
            f"{root}/<class>/<video>") from None


def pretrain_dataset(args: Args) -> SandwichClips:
    root = args.data or str(synthetic.camouflage_videos() / "train.csv")
    return SandwichClips(list_videos(root), args)


# ---- 4. Model ----
class SubsetDropPath(nn.Module):
    """DINOv2's nested-list stochastic depth (spec §1): in training, exactly
    max(int(b (1 - p)), 1) random samples of the batch keep the residual, scaled by b / kept."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        b = x.shape[0]
        keep = max(int(b * (1 - self.p)), 1)
        scale = x.new_zeros(b).index_fill_(0, torch.randperm(b, device=x.device)[:keep],
                                           b / keep)
        return x * scale.view(-1, *[1] * (x.ndim - 1))


class Backbone(vit.VisionTransformer):
    """DINOv2 ViT with registers and a mask token, official key names (spec §7): `cls_token`,
    `pos_embed` (CLS + grid), `register_tokens`, `mask_token` (1, D), `blocks.i.ls1.gamma`, ...
    Token order [CLS, registers, patches]; the registers carry no position (spec §1)."""

    def __init__(self, a: Args, drop_path: float):
        dim, depth, heads = vit.vit_sizes[a.model]
        super().__init__(a.global_size, a.patch_size, 3, dim, a.depth or depth, heads,
                         init_values=a.layerscale, pos_embed="learned")
        self.embed_dim = dim
        self.register_tokens = nn.Parameter(torch.zeros(1, a.registers, dim)) \
            if a.registers else None
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        for blk in self.blocks:
            blk.drop_path = SubsetDropPath(drop_path)
        for m in self.modules():  # spec §1 init: Linear trunc-normal .02, zero bias
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.patch_embed.proj.reset_parameters()  # PyTorch default
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

    def forward(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> tuple:
        """(B, 3, H, W), masks (B, N) bool -> final-norm CLS (B, D) and patches (B, N, D).
        Always called through `__call__` (`bb(x, masks)`), so that `Module.compile()` applies."""
        p = self.patch_embed.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        t = self.patch_embed(x)  # (B, N, D)
        if masks is not None:  # masked patches become the mask token (before the position)
            t = torch.where(masks.unsqueeze(-1), self.mask_token.to(t.dtype), t)
        pos = vit.interpolate_pos_embed(self.pos_embed, grid, 1, antialias=True)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], 1) + pos
        R = 0
        if self.register_tokens is not None:
            R = self.register_tokens.shape[1]
            t = torch.cat([t[:, :1], self.register_tokens.expand(len(t), -1, -1), t[:, 1:]], 1)
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        return t[:, 0], t[:, 1 + R:]


class DINOHead(nn.Module):
    """Linear-GELU-Linear-GELU-Linear, L2-norm, weight-normed prototypes (spec §1; keys
    `mlp.{0,2,4}`, `last_layer.weight_g` (starts at 1), `last_layer.weight_v`)."""

    def __init__(self, dim: int, hidden: int, bottleneck: int, prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        with warnings.catch_warnings():  # the deprecated form keeps the official keys
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, prototypes, bias=False))
        self.last_layer.weight_g.data.fill_(1.0)
        # the hook recomputes `weight` before every forward; a detached one lets a fresh model
        # be deep-copied (a non-leaf tensor attribute cannot be)
        self.last_layer.weight = self.last_layer.weight.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (n, D) -> (n, K)
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return self.last_layer(F.normalize(x, dim=-1, eps=eps))


class PatchMatchingBlock(nn.Module):
    """One PMM block (Eqs. 2-5, spec §1), post-norm; official attribute names."""

    def __init__(self, dim: int, num_heads: int = 16, attn_mul: int = 4):
        super().__init__()
        self.attn_mul = attn_mul
        self.auxiliary_cross_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.auxiliary_layer_norm1 = nn.LayerNorm(dim)
        self.auxiliary_self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.auxiliary_layer_norm2 = nn.LayerNorm(dim)
        self.auxiliary_linear = nn.Linear(dim, dim)
        self.auxiliary_layer_norm3 = nn.LayerNorm(dim)

    def forward(self, aux: torch.Tensor, stu: torch.Tensor, need_weights: bool = False):
        """aux (B, N', D) keys/values, stu (B, N, D) queries -> ((B, N, D), cross weights
        (B, N, N') averaged over heads, or None)."""
        c, w = self.auxiliary_cross_attn(stu, aux, aux, need_weights=need_weights)  # Eqs. 2-3
        h1 = self.auxiliary_layer_norm1(self.attn_mul * c + stu)
        s, _ = self.auxiliary_self_attn(h1, h1, h1, need_weights=False)  # Eq. 4
        h2 = self.auxiliary_layer_norm2(s + h1)
        return self.auxiliary_layer_norm3(self.auxiliary_linear(h2) + h2), w  # Eq. 5


class PatchMatching(nn.Module):
    """The Patch Matching Module: `decoder.0.*` keys as the official AuxiliaryDecoder.
    forward(aux_tokens (B, N', D), student_tokens (B, N, D)) -> (B, N, D); every student token
    is a query, the masked rows are selected afterwards (spec §1)."""

    def __init__(self, dim: int, num_heads: int = 16, attn_mul: int = 4):
        super().__init__()
        self.decoder = nn.ModuleList([PatchMatchingBlock(dim, num_heads, attn_mul)])

    def forward(self, aux_tokens: torch.Tensor, student_tokens: torch.Tensor,
                need_weights: bool = False):
        out, weights = student_tokens, []
        for blk in self.decoder:
            out, w = blk(aux_tokens, out, need_weights)
            weights.append(w)
        return (out, weights) if need_weights else out


class TCoRe(nn.Module):
    """Student {backbone, dino_head}, EMA teacher (the same, no drop path, no gradient), the
    PMM `auxiliary_decoder` and the loss state `loss` (centres). `forward(crops, masks,
    teacher_temp) -> dict` of the loss terms ("loss" the total, Eq. 12)."""

    def __init__(self, a: Args):
        super().__init__()
        self.args = a

        def branch(dp: float) -> nn.ModuleDict:
            bb = Backbone(a, dp)
            return nn.ModuleDict({"backbone": bb, "dino_head": DINOHead(
                bb.embed_dim, a.head_hidden, a.head_bottleneck, a.head_prototypes)})
        self.student = branch(a.drop_path)
        self.teacher = branch(0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.auxiliary_decoder = PatchMatching(self.student.backbone.embed_dim, a.pmm_heads,
                                               a.pmm_attn_mul)
        self.loss = TeacherTargets(a.head_prototypes, a.center_momentum, a.centering)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # spec §1: the teacher runs in eval mode
        return self

    def forward(self, crops: list, masks, teacher_temp: float) -> dict:
        """crops: xg (2B, 3, G, G) crop-major, xl (LB, 3, l, l), xp, xf (2B, 3, G, G); masks:
        the `mask_indices` dict of the (2B, N) bool masks (the loader's; a bool tensor is
        accepted too, at the cost of a host sync on a GPU). One step of spec §1, "One step";
        tokens are selected with the fixed-size index `idx`, no data-dependent shape."""
        if isinstance(masks, torch.Tensor):
            masks = mask_indices(masks)
        a, (xg, xl, xp, xf) = self.args, crops
        m, idx, weight = masks["masks"], masks["idx"], masks["weight"]  # (2B, N), (M,), (M,)
        n_glob, n_loc = len(xg), len(xl) // (len(xg) // 2)
        S, T = self.student, self.teacher
        with torch.no_grad():
            t_cls, t_pat = T.backbone(xg)
            t_cls = torch.cat(t_cls.chunk(2)[::-1])  # swapped: student crop g meets teacher 3-g
            zt = T.dino_head(torch.cat([t_cls, t_pat.flatten(0, 1).index_select(0, idx)]))
            zt = zt.float()
            p_cls, p_pat = self.loss(zt[:n_glob], zt[n_glob:], teacher_temp)  # Eq. 7
            aux_p = S.backbone(xp)[1]  # the student itself, train mode (spec §8.1)
            aux_f = S.backbone(xf)[1]
        s_cls, s_pat = S.backbone(xg, m)
        l_cls, _ = S.backbone(xl)
        r_p = self.auxiliary_decoder(aux_p, s_pat).flatten(0, 1).index_select(0, idx)  # Eqs. 2-5
        r_f = self.auxiliary_decoder(aux_f, s_pat).flatten(0, 1).index_select(0, idx)  # (M, D)
        z = S.dino_head(torch.cat([l_cls, s_cls, r_p, r_f])).float()
        z_loc, z_glob, y_p, y_f = z.split([len(l_cls), n_glob, len(idx), len(idx)])
        out = {"dino": dino_loss(z_glob, z_loc.chunk(n_loc), p_cls, a.student_temp),
               "koleo": sum(koleo_loss(c.float()) for c in s_cls.chunk(2)),
               "past": patch_loss(y_p, p_pat, weight, n_glob, a.student_temp),
               "future": patch_loss(y_f, p_pat, weight, n_glob, a.student_temp),
               "squeeze": squeeze_loss(y_p, y_f)}
        out["loss"] = (out["dino"] + a.koleo_weight * out["koleo"] + a.past_weight * out["past"]
                       + a.future_weight * out["future"] + a.squeeze_weight * out["squeeze"])
        return out  # Eq. 12


def build_model(args: Args) -> TCoRe:
    return TCoRe(args)


def compile_model(tc: TCoRe, **kwargs) -> None:
    """--compile: `torch.compile` (in place, `kwargs` to it; the state-dict keys stay as they
    are) the student and teacher backbones, which the step calls through `__call__` (all
    four student passes and the teacher's), and the PMM. Static shapes (`dynamic=False`):
    the step's few shapes are fixed, and the resize of the position embedding (bicubic,
    antialias) has no backward for symbolic shapes, which a recompile for the local crops'
    size would otherwise bring. The head is left eager: its input holds the M masked rows,
    a count that changes every step. Evaluation calls `Backbone.forward` itself (eager: the
    frame sizes vary per video)."""
    kwargs.setdefault("dynamic", False)
    for module in (tc.student.backbone, tc.teacher.backbone, tc.auxiliary_decoder):
        module.compile(**kwargs)


def block_mask(h: int, w: int, count: int, rng: np.random.Generator,
               max_block: float | None = None, min_block: int = 4,
               aspect=(0.3, 1 / 0.3)) -> np.ndarray:
    """BEiT block masking of exactly `count` patches of an h x w grid, the official T-CoRe
    `MaskingGenerator` (spec §1). Each round places one block: up to 10 tries of a target
    area U(4, budget), budget = min(remaining count, max_block), a log-uniform aspect ratio
    in [0.3, 3.33], h' = round(sqrt(area ar)), w' = round(sqrt(area / ar)) (both below the
    grid's sides) and a uniform position; a block is kept when its new patches number from 1
    to the budget (it may overlap earlier blocks, so it can add fewer than 4), and the round
    ends at the first kept block. Rounds repeat until the count is reached: a round that
    places nothing is simply followed by another (the official loop's `break` needs
    `mask_count == num_masking_patches` inside `while mask_count < num_masking_patches`,
    which never holds; DINOv2's generator stops there instead and can end short). It never
    overshoots. max_block defaults to h w (T-CoRe's `max_num_patches`; DINOv2 uses half).
    rng: numpy Generator (area as python's uniform, `a + (b - a) random()`). Returns (h, w)
    bool. Raises ValueError when `count` is not in [0, h w], or on a grid side below 3, where
    the rounds could go on forever (the official generator would hang)."""
    if not 0 <= count <= h * w:
        raise ValueError(f"block_mask: count {count} outside [0, {h * w}]")
    if count and min(h, w) < 3:
        raise ValueError(f"block_mask: a {h} x {w} grid is too small for block masks (sides "
                         f"of at least 3 patches)")
    mask, done = np.zeros((h, w), bool), 0
    max_block = max_block if max_block is not None else h * w
    log_ar = (math.log(aspect[0]), math.log(aspect[1]))
    while done < count:  # until the count is reached (spec §1)
        budget, added = min(count - done, max_block), 0
        for _ in range(10):
            area = min_block + (budget - min_block) * rng.random()  # python's uniform(4, b)
            ar = math.exp(rng.uniform(*log_ar))
            bh, bw = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
            if bw < w and bh < h:
                top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                new = bh * bw - int(mask[top:top + bh, left:left + bw].sum())
                if 0 < new <= budget:
                    mask[top:top + bh, left:left + bw] = True
                    added = new
            if added:
                break
        done += added
    return mask


def sample_masks(n_crops: int, grid: tuple, prob: float, ratio: tuple,
                 rng: np.random.Generator) -> torch.Tensor:
    """(n_crops, h*w) bool: int(n_crops prob) crops masked with stratified ratios, crop i with
    int(N U(r_i, r_{i+1})) patches, r = linspace(ratio, n + 1); the rest unmasked; shuffled
    (the official collate, spec §1)."""
    h, w = grid
    n = int(n_crops * prob)
    r = np.linspace(ratio[0], ratio[1], n + 1)
    masks = [block_mask(h, w, int(h * w * rng.uniform(r[i], r[i + 1])), rng) for i in range(n)]
    masks += [np.zeros((h, w), bool) for _ in range(n_crops - n)]
    rng.shuffle(masks)
    return torch.from_numpy(np.stack(masks).reshape(n_crops, h * w))


# ---- 5. Loss ----
def dino_loss(z_glob: torch.Tensor, z_locs: tuple, p_cls: torch.Tensor,
              student_temp: float = 0.1) -> torch.Tensor:
    """L_DINO (Eq. 10) as DINOv2: z_glob (2B, K) student logits of the global crops, z_locs
    the L local chunks (B, K), p_cls (2B, K) teacher targets already swapped (row b of crop g is
    the teacher of crop 3 - g). Every local meets both teacher crops, every global its swap:
    (1/(2L + 2)) [sum_l sum_g mean_b CE(P_g, z_l) + sum_g mean_b CE(P_{3-g}, z_g)] (/18 at L=8)."""
    ce = lambda p, z: -(p * F.log_softmax(z / student_temp, -1)).sum(-1).mean()  # noqa: E731
    P = p_cls.chunk(2)
    local = sum(ce(pg, zl) for zl in z_locs for pg in P)
    glob = 2 * ce(p_cls, z_glob)  # mean over 2B, x loss_scales 2 = sum over the two crops
    return (local + glob) / (2 * len(z_locs) + 2)


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo (Eq. 11) on one crop's pre-head CLS (B, D): -mean_b log(||x_b - x_nn(b)|| + eps)
    on L2-normalised rows, nn(b) the largest inner product with the diagonal excluded; the
    distance is torch's pairwise_distance (eps added to the difference), as DINOv2."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    dots = x @ x.T
    dots.fill_diagonal_(-1)
    nn_idx = dots.argmax(1)
    return -torch.log(F.pairwise_distance(x, x[nn_idx], eps=eps) + eps).mean()


def patch_loss(y: torch.Tensor, p_pat: torch.Tensor, weight: torch.Tensor, n_crops: int,
               student_temp: float = 0.1) -> torch.Tensor:
    """L_pt or L_ft (Eq. 8): -(1/2B) sum_j w_j sum_k P[j,k] log softmax(y[j]/0.1)_k over the M
    masked rows, w_j = 1/|masked patches of j's crop|, 2B = n_crops counting unmasked crops."""
    ce = (p_pat * F.log_softmax(y.float() / student_temp, -1)).sum(-1)  # (M,)
    return -(ce * weight).sum() / n_crops


def squeeze_loss(y_p: torch.Tensor, y_f: torch.Tensor) -> torch.Tensor:
    """Temporal squeezing L_pf (Eq. 9): MSE over the M x K raw head logits, gradient on both
    sides (spec §8.3)."""
    return F.mse_loss(y_p.float(), y_f.float())


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """DINOv2's distributed Sinkhorn-Knopp teacher (n, K) -> (n, K), rows summing to 1."""
    Q = torch.exp(logits.float() / temp).T  # (K, n)
    n = dist.all_reduce(torch.full((), float(Q.shape[1]), device=Q.device), "sum")
    K = Q.shape[0]
    Q /= dist.all_reduce(Q.sum(), "sum")
    for _ in range(iters):
        Q /= dist.all_reduce(Q.sum(1, keepdim=True), "sum")
        Q /= K
        Q /= Q.sum(0, keepdim=True)
        Q /= n
    return (Q * n).T


class TeacherTargets(nn.Module):
    """Teacher targets of Eq. 7 with the code's centering: P = softmax((z - c) / tau_t); the
    centres (buffers, in the checkpoint) follow c <- m c + (1 - m) mean, where the mean of a
    step is applied at the next call (DINOv2's one-step lag). CLS: the mean over all ranks'
    2B rows; patches: the average over ranks of each rank's mean over its M masked rows.
    A call's means are held aside until `commit()` (the training step calls it once the loss
    is known to be finite), so a non-finite step leaves the buffers as they were."""

    def __init__(self, K: int, momentum: float = 0.9, mode: str = "centering"):
        super().__init__()
        self.momentum, self.mode = momentum, mode
        for name in ("cls", "patch"):
            self.register_buffer(f"{name}_center", torch.zeros(1, K))
            self.register_buffer(f"{name}_pending", torch.zeros(1, K))

    @torch.no_grad()
    def forward(self, z_cls: torch.Tensor, z_pat: torch.Tensor, temp: float) -> tuple:
        """z_cls (2B, K), z_pat (M, K) fp32 teacher logits -> targets (2B, K), (M, K)."""
        if self.mode == "sinkhorn":
            return sinkhorn_knopp(z_cls, temp), sinkhorn_knopp(z_pat, temp)
        m = self.momentum
        # the previous step's means, applied now (no host sync: before the first commit the
        # centres and pending means are both zero, and the update leaves them zero)
        self.cls_center.mul_(m).add_(self.cls_pending, alpha=1 - m)
        self.patch_center.mul_(m).add_(self.patch_pending, alpha=1 - m)
        targets = (F.softmax((z_cls - self.cls_center) / temp, -1),
                   F.softmax((z_pat - self.patch_center) / temp, -1))
        n = self._rows(len(z_cls), z_cls.device)  # all ranks' 2B rows, built once
        patch_mean = z_pat.mean(0, keepdim=True) if len(z_pat) else torch.zeros_like(z_cls[:1])
        self._means = (dist.all_reduce(z_cls.sum(0, keepdim=True), "sum") / n,
                       dist.all_reduce(patch_mean, "mean"))
        return targets

    def _rows(self, rows: int, device: torch.device) -> torch.Tensor:
        """All ranks' row count as a 0-dim fp32 tensor on `device`, all-reduced once per
        (rows, device) and kept: a per-step `torch.tensor(...)` would be a host copy."""
        key = (rows, device)
        if getattr(self, "_count", (None,))[0] != key:
            n = torch.full((), float(rows), device=device)
            self._count = (key, dist.all_reduce(n, "sum"))
        return self._count[1]

    @torch.no_grad()
    def commit(self) -> None:
        """Keep the last call's means for the next call's centre update."""
        means, self._means = getattr(self, "_means", None), None
        if means is not None:
            self.cls_pending.copy_(means[0])
            self.patch_pending.copy_(means[1])


# ---- 6. Training step ----
def train_step(model, crops: list, masks: dict, optimizer, amp: optim.Amp,
               teacher_temp: float, momentum: float, clip: float) -> dict:
    """Forward under autocast (losses fp32), NaN check before backward, per-module clipping at
    `clip` after unscaling (backbone, head, PMM, spec §3), step, EMA of backbone + head (Eq. 6).
    crops and masks as `TCoRe.forward` (the masks dict from the loader, `to_device`): the
    non-finite check is the step's only host sync."""
    tc = checkpoint.unwrap(model)
    with amp.autocast():
        out = model(crops, masks, teacher_temp)
    amp.check_finite(out["loss"])
    tc.loss.commit()  # this step's teacher means: only from a finite step
    amp.scaler.scale(out["loss"]).backward()
    amp.scaler.unscale_(optimizer)
    norms = [nn.utils.clip_grad_norm_(m.parameters(), clip) for m in
             (tc.student.backbone, tc.student.dino_head, tc.auxiliary_decoder)]
    amp.scaler.step(optimizer)
    amp.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    optim.ema_update(tc.teacher, tc.student, momentum)
    return {**{k: v.detach() for k, v in out.items()}, "grad_norm_backbone": norms[0]}


def build_optimizer(tc: TCoRe, args: Args, device) -> tuple:
    """(AdamW over `param_groups`, peak lr): lr = base_lr x sqrt(global batch / 1024)
    (spec §3), betas --betas, fused on CUDA."""
    lr = args.base_lr * math.sqrt(args.batch_size * dist.world() / 1024)  # spec §3
    opt = torch.optim.AdamW(param_groups(tc, args), lr=lr, betas=args.betas,
                            fused=torch.device(device).type == "cuda")
    return opt, lr


def run_length(args: Args, loader_len: int) -> tuple:
    """(steps per "epoch", total steps): --epoch-length (the official fixed 936 steps,
    whatever the batch) or, with 0, `loader_len` (one pass over this rank's share of the
    data); total = --epochs x steps per epoch (official `epochs * OFFICIAL_EPOCH_LENGTH`)."""
    ep = args.epoch_length or loader_len
    return ep, args.epochs * ep


def schedules(args: Args, step: int, total: int, ep: int, lr: float) -> dict:
    """Every schedule at global `step`, as the official `build_schedulers` (spec §3), epochs
    counted in `ep` steps: lr (peak `lr`, linear warm-up over --warmup-epochs), pmm_lr (peak
    --pmm-lr-mul x lr), last_lr (lr, 0 for --freeze-last-layer-epochs), wd, momentum (EMA,
    cosine to 1) and teacher_temp (linear warm-up over --warmup-teacher-temp-epochs)."""
    warm = args.warmup_epochs * ep
    lr_s = dinov2_schedule(step, total, lr, args.min_lr, warm)
    tw = args.warmup_teacher_temp_epochs * ep
    return {"lr": lr_s,
            "pmm_lr": dinov2_schedule(step, total, args.pmm_lr_mul * lr, args.min_lr, warm),
            "last_lr": 0.0 if step < args.freeze_last_layer_epochs * ep else lr_s,  # DINOv2
            "wd": dinov2_schedule(step, total, args.weight_decay, args.weight_decay_end),
            "momentum": dinov2_schedule(step, total, args.momentum_teacher, 1.0),
            "teacher_temp": dinov2_schedule(step, tw, args.teacher_temp, args.teacher_temp, tw,
                                            args.warmup_teacher_temp) if tw
            else args.teacher_temp}


def dinov2_schedule(step: int, total: int, base: float, final: float, warmup: int = 0,
                    start: float = 0.0) -> float:
    """DINOv2's CosineScheduler at `step`: np.linspace(start, base, warmup) (endpoint
    included), then base -> final by a half cosine over the other steps; final from `total`."""
    if step < warmup:
        return start + (base - start) * step / max(warmup - 1, 1)
    if step >= total:
        return final
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (step - warmup)
                                                        / (total - warmup)))


def param_groups(model: TCoRe, a: Args) -> list:
    """AdamW groups of the student and the PMM, keyed as DINOv2 (spec §3): lr factor (layer
    decay 0.9^(depth - i) for block i, 0.9^(depth + 1) for embeddings and tokens, x0.2 more for
    patch_embed, 1 for the final norm, head and PMM), wd factor (0 for `.bias`, `norm`,
    `gamma`), last layer, PMM."""
    depth, groups = len(model.student.backbone.blocks), {}
    named = [(f"student.{n}", p) for n, p in model.student.named_parameters()]
    named += [(f"auxiliary_decoder.{n}", p) for n, p in model.auxiliary_decoder.named_parameters()]
    for name, p in named:
        lid = depth + 1
        if ".backbone." in name:
            if any(t in name for t in ("pos_embed", "patch_embed", "mask_token", "cls_token",
                                       "register_tokens")):
                lid = 0
            elif ".blocks." in name:
                lid = int(name.split(".blocks.")[1].split(".")[0]) + 1
        lr_mult = a.layer_decay ** (depth + 1 - lid) * (
            a.patch_embed_lr_mult if "patch_embed" in name else 1.0)
        wd_mult = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
        key = (lr_mult, wd_mult, "last_layer" in name, name.startswith("auxiliary_decoder"))
        g = groups.setdefault(key, {"params": [], "lr_mult": key[0], "wd_mult": key[1],
                                    "last_layer": key[2], "pmm": key[3]})
        g["params"].append(p)
    return list(groups.values())


def set_schedules(opt, a: Args, lr: float, pmm_lr: float, last_lr: float, wd: float) -> None:
    """Write each group's lr and wd (spec §3 and §6.1: `first-release` gives every student
    group the plain lr, `fixed` keeps the lr factor and the last-layer freeze)."""
    for g in opt.param_groups:
        g["weight_decay"] = wd * g["wd_mult"]
        if g["pmm"]:
            g["lr"] = pmm_lr
        elif a.lr_groups == "first-release":
            g["lr"] = lr
        else:
            g["lr"] = (last_lr if g["last_layer"] else lr) * g["lr_mult"]


# ---- 7. Evaluation ----
@torch.no_grad()
def patch_features(backbone: Backbone, frames: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> last-layer final-norm patch tokens (B, D, H/p, W/p), CLS and registers
    dropped (spec §4: `x_norm_no_reg`), fp32; the drivers L2-normalise them. Runs
    `Backbone.forward` directly: eager even under --compile (sizes vary per video)."""
    p = backbone.patch_embed.patch_size
    _, tokens = backbone.forward(frames.float())
    return tokens.transpose(1, 2).reshape(len(frames), -1, frames.shape[-2] // p,
                                          frames.shape[-1] // p)


def evaluate(feat_fn, args: Args, device, out_dir: str | None = None) -> tuple:
    """Label propagation on the benchmarks given (spec §4), and SIGMA's unsupervised VOS.
    Returns (metrics, DAVIS preds)."""
    kw = dict(temperature=args.temperature, radius=args.radius, context=args.context,
              device=device)
    metrics, davis_preds = {}, []
    if args.davis:
        scores, davis_preds = propagation.eval_davis(
            feat_fn, args.davis, tuple(args.davis_size), args.topk,
            gt_at_eval_size=not args.davis_native_gt, out_dir=out_dir, **kw)
        metrics.update({"davis_jf": scores["J&F-Mean"], "davis_j": scores["J-Mean"],
                        "davis_f": scores["F-Mean"]})
    if args.jhmdb:
        pck = propagation.eval_jhmdb(feat_fn, args.jhmdb, tuple(args.jhmdb_size), args.topk,
                                     **kw)
        metrics.update({"jhmdb_pck@0.1": pck["PCK@0.1"], "jhmdb_pck@0.2": pck["PCK@0.2"]})
    if args.vip:
        metrics["vip_miou"] = propagation.eval_vip(feat_fn, args.vip, args.vip_long_side,
                                                   args.vip_topk, **kw)["mIoU"]
    if args.vos_davis or args.vos_ytvos:  # per-frame tokens (spec §3 of vos); trained: picture
        metrics.update(vos.vos_metrics(lambda x: feat_fn(x).permute(0, 2, 3, 1), args.vos_davis,
                                       args.vos_ytvos, out_dir and args.output_dir,
                                       device=device))
    return metrics, davis_preds


def load_weights(model: TCoRe, path: str) -> None:
    """Our last.pt ({"model": ...}) or a released checkpoint ({"teacher": {"backbone.*",
    "dino_head.*"}}): the backbone keys must all be there, registers included (spec §8.11);
    released teacher weights go into the student and the teacher."""
    ckpt = checkpoint.load(path)
    if "model" in ckpt:
        checkpoint.load_model(model, ckpt["model"], strict=True, what=path)
        return
    sd = checkpoint.clean_state_dict(ckpt.get("teacher", ckpt))
    for part in ("backbone", "dino_head"):
        sub = {k[len(part) + 1:]: v for k, v in sd.items() if k.startswith(part + ".")}
        target = model.teacher[part]
        missing = [k for k in target.state_dict() if k not in sub]
        if part == "backbone" and missing:
            raise checkpoint.CheckpointError(f"{path}: teacher backbone weights missing: "
                                             f"{missing[:5]}")
        if not missing:
            checkpoint.load_model(target, sub, strict=True, what=path)
            model.student[part].load_state_dict(target.state_dict())


def to_image(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised (3, H, W) -> [0, 1]."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (x.float().cpu() * std + mean).clamp(0, 1)


def save_propagation(davis_root: str, davis_preds: dict, path: str, n: int = 5) -> None:
    """First DAVIS sequence at n frames: ground truth, then one row per model."""
    _, frames, masks = propagation.read_davis(davis_root)[0]
    ts = np.linspace(0, len(frames) - 1, n).round().astype(int)
    gt = torch.from_numpy(np.stack([propagation.read_label_png(masks[t]) for t in ts]))
    rows = []
    for pred in [gt, *(preds[0][2][ts] for preds in davis_preds.values())]:
        row = []
        for t, lab in zip(ts, pred):
            img = propagation.load_frames([frames[t]], gt.shape[-2:])[0]
            img = (to_image(img) * 255).round().to(torch.uint8)
            row.append(propagation.overlay(img, propagation.resize_nearest(
                lab, img.shape[-2:])).float() / 255)
        rows.append(torch.stack(row))
    log.save_grid(rows, path, "DAVIS label propagation from the first frame (first sequence)",
                  ["ground truth", *(name.replace("_", " ") for name in davis_preds)],
                  [f"frame {t}" for t in ts], scale=2)


@torch.no_grad()
def save_cross_attention(model: TCoRe, args: Args, path: str, n: int = 4) -> None:
    """For n clips (without --data: camouflage videos never trained on; with it: its first
    n): the current frame's centre view with a central block masked and one masked query
    patch (red), and the PMM's cross-attention (mean over heads) from that query to the past
    and to the future frame (Eqs. 2-3), as heat maps."""
    root = synthetic.camouflage_videos(seed=1, videos=4) / "train.csv" if not args.data else None
    files = list_videos(str(root)) if root else pretrain_dataset(args).samples
    files = [f[0] if isinstance(f, tuple) else f for f in files][:n]
    bb, pmm, G, p = model.student.backbone, model.auxiliary_decoder, args.global_size, \
        args.patch_size
    dev = next(model.parameters()).device  # every input of the model goes there
    g = G // p
    was = model.training
    model.eval()
    rows = []
    red, yellow = torch.tensor([1., 0, 0]).view(3, 1, 1), torch.tensor([1., 1, 0]).view(3, 1, 1)
    mask = torch.zeros(g, g, dtype=torch.bool)
    mask[g // 4:g - g // 4, g // 4:g - g // 4] = True
    q = (g // 2) * g + g // 2
    for i, f in enumerate(files):
        rng = data.sample_np_rng(args.seed + 1, 0, i)
        T = video.video_length(f)
        idx = sandwich_indices(T, rng, args.current_range, args.past_offset, args.future_offset)
        fr = video.read_clip(f, list(idx)).permute(0, 3, 1, 2)
        top, left, h, w = centre_box(*fr.shape[-2:])
        x = v2.functional.resized_crop(fr, top, left, h, w, [G, G], antialias=True)
        x = v2.functional.normalize(x.float() / 255, MEAN, STD)  # (3, 3, G, G): past, cur, fut
        xd = x.to(dev)
        _, s_pat = bb(xd[1:2], mask.view(1, -1).to(dev))
        atts = []
        for a_i in (0, 2):
            _, aux = bb(xd[a_i:a_i + 1])
            _, (att,) = pmm(aux, s_pat, need_weights=True)  # (1, N, N)
            atts.append(att[0, q])
        heats = torch.stack(atts).float().cpu().view(2, 1, 1, g, g)  # one copy to the host
        imgs = [to_image(x[1]) * (~mask).repeat_interleave(p, 0).repeat_interleave(p, 1)]
        qy, qx = divmod(q, g)
        imgs[0][:, qy * p:(qy + 1) * p, qx * p:(qx + 1) * p] = red
        for a_i, heat in zip((0, 2), heats):
            heat = F.interpolate(heat / heat.max(), size=(G, G), mode="nearest")[0]
            imgs.append(0.4 * to_image(x[a_i]) + 0.6 * heat * yellow)
        rows.append(torch.stack(imgs))
    model.train(was)
    log.save_grid(rows, path, "PMM cross-attention from a masked patch (red) to the auxiliary "
                  "frames", [f"clip {i}" for i in range(len(rows))],
                  ["current (masked)", "past: attention", "future: attention"], scale=2)


# ---- 8. Main ----
def main(args: Args) -> dict:
    device = dist.init(args.device)
    amp = optim.Amp(args.amp, device)
    args.output_dir = args.output_dir or time.strftime("runs/tcore-%Y%m%d-%H%M%S")
    if not args.data:  # the embedded sets
        if args.preset == "demo":
            dist.print0("no --data: running the demo preset on the embedded camouflage videos, "
                        "DAVIS-format camouflage videos for evaluation")
        args.davis = args.davis or str(synthetic.davis(seed=args.synthetic_seed, sequences=8,
                                                       style="camouflage"))
    if args.mask_prob * 2 * args.batch_size < 1 and not args.eval_only:
        raise cli.InputError(f"--mask-prob {args.mask_prob} x 2 --batch-size {args.batch_size} "
                             f"masks no crop: the patch losses need at least one")
    if args.global_size // args.patch_size < 3 and not args.eval_only:
        raise cli.InputError(f"--global-size {args.global_size} / --patch-size "
                             f"{args.patch_size}: block masks need a grid of at least 3 x 3")
    dist.seed_all(args.seed)
    if dist.is_main():
        cli.save_args(args, args.output_dir)
    logger = log.Logger(args.output_dir)

    torch.manual_seed(args.seed)
    tc = build_model(args).to(device)
    if args.init_from:
        load_weights(tc, args.init_from)
    if args.compile:
        compile_model(tc)
    model = nn.parallel.DistributedDataParallel(tc, broadcast_buffers=False) \
        if dist.is_dist() else tc
    if args.bench:
        result = bench(model, tc, args, device, amp)
        dist.cleanup()
        return result

    summary = {"method": "tcore", "data": args.data or "synthetic-videos",
               "preset": args.preset, "metrics": {}}
    t0, step = time.time(), 0
    if not args.eval_only:
        step = pretrain(model, tc, args, device, amp, logger)
    summary.update(steps=step, seconds=round(time.time() - t0, 1))

    if args.davis or args.jhmdb or args.vip or args.vos_davis or args.vos_ytvos:
        # on every rank: common.propagation shares the videos among the ranks of a process
        # group and gives every rank the full result (its DAVIS predictions: this rank's
        # videos, the first sequence on rank 0); printing and pictures stay on rank 0
        feats = {"trained": tc.teacher.backbone}
        if args.eval_random_init:
            for i in range(args.random_init_seeds):
                torch.manual_seed(args.seed + i)
                name = "random_init" + (f"_{i + 1}" if i else "")
                feats[name] = build_model(args).teacher.backbone.to(device)
        results, davis_preds = {}, {}
        for name, bb in feats.items():
            bb.eval()
            results[name], davis_preds[name] = evaluate(
                lambda x, bb=bb: patch_features(bb, x), args, device,
                os.path.join(args.output_dir, "davis_pred") if name == "trained" else None)
        if args.eval_random_init:
            p = args.patch_size
            results["pixels"], _ = evaluate(lambda x: propagation.pixel_features(x, p), args,
                                            device)
        for name in results["trained"]:
            summary["metrics"][name] = {k: round(v[name], 4) for k, v in results.items()}
        width = max(len(n) for n in ["metric", *summary["metrics"]]) + 2
        dist.print0(f"{'metric':<{width}}" + "".join(f"{k:>14}" for k in results))
        for name, vals in summary["metrics"].items():
            dist.print0(f"{name:<{width}}" + "".join(f"{vals[k]:>14.4f}" for k in results))
        randoms = [v["davis_jf"] for k, v in results.items()
                   if k.startswith("random_init") and "davis_jf" in v]
        if randoms and "davis_jf" in results["trained"]:  # DESIGN §3: > 2 x larger spread
            summary["verdict"] = verdict("DAVIS J&F", randoms, [results["trained"]["davis_jf"]],
                                         trained_spread=args.trained_spread or None, decimals=3)
            dist.print0(summary["verdict"]["line"])
        if dist.is_main() and davis_preds.get("trained"):
            save_propagation(args.davis, {k: davis_preds[k] for k in ("random_init", "trained")
                                          if davis_preds.get(k)},
                             os.path.join(args.output_dir, "propagation.png"))
    if dist.is_main():
        if not args.eval_only:
            save_cross_attention(tc, args, os.path.join(args.output_dir, "cross_attention.png"))
        with open(os.path.join(args.output_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
    dist.barrier()
    dist.cleanup()
    return summary


def make_loader(args: Args, ds: Dataset):
    """The pretraining loader: shuffled (epoch, index) keys, and `MaskingCollate` drawing the
    block masks in the workers."""
    return data.make_loader(ds, args.batch_size, True, args.seed, args.num_workers,
                            collate_fn=MaskingCollate(args))


def to_device(batch: tuple, device) -> tuple:
    """A loader batch (globals, locals, aux, masks dict) -> the step's inputs on `device`,
    copied without blocking: crops [xg (2B, 3, G, G), xl (LB, 3, l, l), xp, xf (2B, 3, G, G)]
    crop-major (row c B + b is crop c of sample b, spec §1) and the masks dict."""
    g, loc, aux, masks = batch
    crops = [g.transpose(0, 1).flatten(0, 1), loc.transpose(0, 1).flatten(0, 1),
             aux[:, 0].transpose(0, 1).flatten(0, 1), aux[:, 1].transpose(0, 1).flatten(0, 1)]
    return ([c.to(device, non_blocking=True) for c in crops],
            {k: v.to(device, non_blocking=True) for k, v in masks.items()})


def pretrain(model, tc: TCoRe, args: Args, device, amp: optim.Amp, logger: log.Logger) -> int:
    """The training loop keyed by the global step; returns the number of steps done."""
    ds = data.SafeDataset(pretrain_dataset(args), args.max_fail_fraction, "pretrain videos")
    loader = make_loader(args, ds)
    opt, lr = build_optimizer(tc, args, device)
    ep, total = run_length(args, len(loader))
    loop_epochs = math.ceil(total / len(loader))
    loop = training.Loop(loader, loop_epochs, {"model": tc, "optimizer": opt}, args, logger,
                         amp, max_steps=min(args.max_steps or total, total))
    dist.print0(f"{len(ds)} videos, {ep} steps/epoch ({len(loader)} per pass over the data), "
                f"{total} steps, global batch {args.batch_size * dist.world()}, peak lr "
                f"{lr:.4g} (PMM {args.pmm_lr_mul * lr:.4g}), lr groups {args.lr_groups}, amp "
                f"{amp.mode}, output {args.output_dir}")
    loop.resume(args.resume)
    model.train()
    for batch in loop:
        sch = schedules(args, loop.step, total, ep, lr)
        set_schedules(opt, args, sch["lr"], sch["pmm_lr"], sch["last_lr"], sch["wd"])
        crops, masks = to_device(batch, device)
        out = train_step(model, crops, masks, opt, amp, sch["teacher_temp"], sch["momentum"],
                         args.clip_grad)
        loop.end_step(out, {"train/lr": sch["lr"], "train/wd": sch["wd"],
                            "train/teacher_temp": sch["teacher_temp"],
                            "train/momentum": sch["momentum"]})
    loop.check_replicas(tc, buffers=tuple(tc.loss.buffers()))
    return loop.step


def bench(model, tc: TCoRe, args: Args, device, amp: optim.Amp) -> dict:
    """--bench: the training step exactly as `pretrain` runs it (its optimiser and groups at
    the first step's schedules, a batch and masks from the training loader, copied as in
    training), timed on that batch; then the loader alone."""
    loader = make_loader(args, data.SafeDataset(pretrain_dataset(args), args.max_fail_fraction,
                                                "pretrain videos"))
    opt, lr = build_optimizer(tc, args, device)
    ep, total = run_length(args, len(loader))
    sch = schedules(args, 0, total, ep, lr)
    set_schedules(opt, args, sch["lr"], sch["pmm_lr"], sch["last_lr"], sch["wd"])
    crops, masks = to_device(next(iter(loader)), device)
    model.train()
    return log.bench(lambda: train_step(model, crops, masks, opt, amp, sch["teacher_temp"],
                                        sch["momentum"], args.clip_grad),
                     args.batch_size, device, loader=loader, amp_dtype=amp.dtype,
                     model=args.model, global_size=args.global_size, amp=amp.mode,
                     masked_patches=len(masks["idx"]))


if __name__ == "__main__":
    cli.run(main, Args, PRESETS)
