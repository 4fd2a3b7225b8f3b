"""CropMAE: Siamese cropped masked autoencoders, with the SiamMAE baseline.

A. Eymaël, R. Vandeghen, A. Cioppa, S. Giancola, B. Ghanem, M. Van Droogenbroeck, "Efficient
Image Pre-Training with Siamese Cropped Masked Autoencoders", ECCV 2024 (arXiv:2403.17823);
details from the official code (spec: ../shared/specs/cropmae.md, "spec §n" below).

Method in five lines: from one still image, cut a global crop V1 and, from the resized V1, a
local crop V2 (Global-to-Local, Sec. 3.2), each flipped independently. A ViT encoder sees all
of V1 and only 2 of V2's 196 patches (98.5 % masking, Sec. 3.3). A decoder whose queries are
V2's tokens (mask tokens for the hidden ones) cross-attends to all V1 tokens and reconstructs
V2's normalised pixels (MSE on masked patches): to fill V2 in, it must find where V2 lies in V1,
which teaches the encoder correspondences. Evaluated by label propagation (DAVIS, JHMDB, VIP).
SiamMAE (`--views frames`) is the same model on two frames of a video, 95 % masking.

Launch (Tab. 1 trains 400 epochs at a global batch of 2048 = processes x --batch-size, spec §3;
the --davis/--jhmdb/--vip flags evaluate Tab. 1's columns at the end):
    python cropmae.py                                          # CPU demo, synthetic data
    torchrun --nproc_per_node=8 cropmae.py --preset in1k-vits --data ~/data/imagenet \
        --batch-size 256 --davis ~/data/DAVIS --jhmdb ~/data/jhmdb/jhmdb_vallist.txt \
        --vip ~/data/VIP/vip_vallist.txt                       # 8 GPUs x 256
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        cropmae.py --preset in1k-vitb --data ~/data/imagenet --davis ~/data/DAVIS \
        --jhmdb ~/data/jhmdb/jhmdb_vallist.txt --vip ~/data/VIP/vip_vallist.txt  # 16 x 128
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        cropmae.py --preset k400-vits --data ~/data/k400/train.csv --davis ~/data/DAVIS \
        --jhmdb ~/data/jhmdb/jhmdb_vallist.txt --vip ~/data/VIP/vip_vallist.txt  # 16 x 128
    python cropmae.py --eval-only --init-from CropMAE_in.pth --davis ~/data/DAVIS \
        --jhmdb ~/data/jhmdb/jhmdb_vallist.txt --vip ~/data/VIP/vip_vallist.txt  # 1 GPU
        # + --vos-davis ~/data/DAVIS --vos-ytvos ~/data/ytvos_train: SIGMA's Tab. 4 VOS
    python cropmae.py --preset in1k-vits --data ~/data/imagenet --batch-size 256 \
        --accum-iter 8 --davis ~/data/DAVIS --jhmdb ~/data/jhmdb/jhmdb_vallist.txt \
        --vip ~/data/VIP/vip_vallist.txt                       # 1 GPU: 256 x 8 accumulated
(--preset siammae-k400 runs like k400-vits; 8 GPUs x 256 and 16 x 128 are interchangeable.)
Under torchrun the DAVIS / JHMDB / VIP evaluations are shared: every process propagates its
share of the videos (video i on process i % processes) and all get the full scores; rank 0
prints them and writes summary.json and the pictures.
One GPU rarely holds batch 2048 (about 100 MB of saved activations per ViT-S sample, measured
on CPU in bf16; CUDA's fused attention saves less): --accum-iter 8 accumulates 8 micro-batches
of 256 per step, the same global batch and lr (the masks and views are drawn per sample, so
nothing else changes).
Presets: in1k-vits, in1k-vitb (Tab. 1 IN-Sub rows: the defaults, ViT-S or ViT-B, on a fixed
random 239,787-image ImageNet subset), k400-vits, siammae-k400, demo. Ablations (Tab. 3) are
flags: --mask-ratio, --views, --decoder-depth, --decoder-dim, --color-jitter, --gaussian-blur,
--no-hflip. Evaluation follows the official order: each first-frame annotation is resized to
the evaluation size with nearest neighbour, then its one-hot is reduced bilinearly to the
feature grid (spec §4).

Deviations, with reasons:
- lr schedule: the lr of step s is set before step s (the official loop sets it after the
  step, so its first step runs at the peak lr and every later one a step late, spec §3).
- AMP defaults to bf16 on CUDA (project convention; no loss scaling needed); `--amp fp16`
  is the official fp16 + GradScaler. The loss runs in fp32 either way.
- `--color-jitter` / `--gaussian-blur` act on the global view before normalisation, with an
  odd blur kernel (23 px at 224); the official flags act after normalisation (jitter then
  clamps to [0, 1]) and kernel 12 raises in torchvision (spec §2, §6.5).
- Single-process runs shuffle (the official one does not, spec §6.8). The in1k presets draw
  the paper's IN Subset, 239,787 random images, from the seed (`--subset`); the official code
  has no such sampling: it keeps the first `max_files` files of a glob, and its script sets
  that above ImageNet's size, so it trains on all of ImageNet (spec §2, §6.2).
- Eval frames are decoded with PIL and resized with bilinear interpolation without
  antialiasing (torch), the official code uses cv2 INTER_LINEAR: equal up to rounding.
  DAVIS annotations are PIL-NEAREST-resized to --davis-size, as the official DAVIS_480_880
  copy is believed to be; its build script is not in the repo, and scripts for that layout
  elsewhere resize the frames with NEAREST too, which we do not (spec §4, unverified).
- Video frames (K400, SiamMAE) are decoded with PyAV (official: decord), same frames.
- The `demo` preset (about 6 minutes on one CPU core) is a small ViT (width 192, depth 4, patch
  8) on 64-px crops of the 1,200 frames of 120 synthetic "camouflage" videos (objects in the
  background's two colours, told apart only by texture; `synthetic.camouflage_images`): an
  8 x 8 grid, so 96 % masking keeps 2 patches as the paper's 98.5 % does on 14 x 14; decoder
  width 128, FFN 512, batch 32, lr 5e-4 (blr 4e-3: the paper's blr x 32 / 256 would barely
  move in 370 steps), 10 epochs, bf16 autocast on the CPU. It evaluates on 8 other camouflage
  videos in the DAVIS format at their own 96 x 160 (grid 12 x 20), where colour matching
  fails, against 3 random initialisations and raw pixels, and on the training loss of 100
  held-out frames (`pretext_eval`: same pairs and masks for every model, standard error,
  mean-predictor baseline). Its settings were chosen on another draw of the evaluation set
  (`--synthetic-seed 1`), never on the one of the verdict.
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from common import (checkpoint, cli, data, dist, log, optim, propagation, synthetic, training,
                    video, vit, vos)
from common.evaluate import verdict  # DESIGN §3's rule (this file's `evaluate` propagates)


# ---- 2. Arguments ----
@dataclass
class Args:
    # run
    output_dir: str = ""
    """run folder (default runs/cropmae-<time>): args.json, log.jsonl, last.pt, summary.json"""
    seed: int = 0
    """random seed (each sample's crops derive from seed, epoch and index)"""
    epochs: int = 400
    """pretraining epochs (Sec. 4.1)"""
    max_steps: int = 0
    """stop after this many optimiser steps (0: all epochs; the schedule still spans all)"""
    log_every: int = 50
    """steps between log lines"""
    ckpt_every: int = 1000
    """steps between checkpoints (last.pt, atomic); also written at the end"""
    resume: str = ""
    """checkpoint to resume from (default: <output_dir>/last.pt when it exists)"""
    init_from: str = ""
    """weights to start from / evaluate: our last.pt or an official checkpoint {"model": ...}"""
    eval_only: bool = False
    """skip pretraining: evaluate --init-from (or a random encoder)"""
    bench: bool = False
    """time the training step on random tensors and the data pipeline, print JSON, exit"""
    # data
    data: str = ""
    """image folder (searched recursively; root/train if it exists), or a video list file
    (lines `path [label ...]`, K400); empty: the embedded synthetic images (demo preset)"""
    subset: int = 0
    """use a fixed random subset of this many images (IN-Sub: 239787, Sec. 4.1); 0: all"""
    views: Literal["global-to-local", "local-to-global", "random", "same", "frames"] = \
        "global-to-local"
    """view strategy (Sec. 3.2, Tab. 3a); `frames`: SiamMAE, two frames of a video"""
    img_size: int = 224
    """view size (Sec. 4.1)"""
    global_scale: tuple[float, float] = (0.1, 1.0)
    """RandomResizedCrop area range of the global crop (spec §3: IN 0.1-1, K400 0.5-1)"""
    local_scale: tuple[float, float] = (0.3, 0.6)
    """area range of the local crop, relative to the resized global crop (spec §1)"""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """aspect-ratio range of every crop (spec §1)"""
    hflip: bool = True
    """independent horizontal flips of each view, p = 0.5 (Tab. 3d)"""
    frame_gap: tuple[int, int] = (4, 48)
    """SiamMAE: frame distance drawn in [lo, hi) (spec §1, SiamMAE variant)"""
    frames_scale: tuple[float, float] = (0.5, 1.0)
    """SiamMAE: area range of the crop shared by both frames (hard-coded officially)"""
    color_jitter: bool = False
    """ColorJitter(0.4, 0.4, 0.4, 0.1) on the global view (Tab. 3d ablation)"""
    gaussian_blur: bool = False
    """Gaussian blur, sigma 0.1-2, on the global view (Tab. 3d ablation)"""
    num_workers: int = 8
    """data loader workers per process"""
    max_fail_fraction: float = 0.05
    """stop when more than this fraction of the files is unreadable (one is always skipped)"""
    # model
    model: Literal["tiny", "small", "base", "large"] = "small"
    """ViT size: ViT-S/16 (Sec. 4.1), ViT-B/16 (Tab. 1), ViT-L; tiny for the demo"""
    depth: int = 0
    """encoder depth override (0: the size's default)"""
    patch_size: int = 16
    """patch size (Sec. 4.1)"""
    mask_ratio: float = 0.985
    """fraction of V2's patches masked; int(L(1 - r)) stay visible: 2 of 196 (Sec. 3.3)"""
    decoder_dim: int = 256
    """decoder width (Tab. 3c)"""
    decoder_depth: int = 4
    """decoder blocks (Tab. 3c)"""
    decoder_heads: int = 8
    """decoder attention heads (spec §1)"""
    decoder_ffn: int = 2048
    """decoder feed-forward width (spec §1: fixed, not 4x the width)"""
    decoder_dropout: float = 0.1
    """decoder dropout: attention weights, residual branches, FFN hidden (spec §1)"""
    norm_pix_loss: bool = True
    """targets are per-patch normalised pixels (spec §3 scripts)"""
    # optimisation
    batch_size: int = 128
    """batch size per process (spec §3: 16 GPUs x 128 = 2048)"""
    blr: float = 1e-4
    """base lr; lr = blr x global batch / 256 (official scripts; the paper states 1.5e-4)"""
    weight_decay: float = 0.05
    """AdamW weight decay; not on 1-D parameters, but on cls/mask tokens (spec §3)"""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (spec §3)"""
    warmup_epochs: int = -1
    """epochs of linear warmup from 0, per step; -1: int(0.05 x epochs), as the official
    scripts (spec §3: 20 of 400)"""
    min_lr: float = 0.0
    """cosine floor (spec §3)"""
    accum_iter: int = 1
    """gradient accumulation: micro-batches per optimiser step (official --accum_iter); the lr
    follows the effective batch batch x GPUs x accum_iter"""
    # system
    device: str = "auto"
    """cpu, cuda, cuda:N or auto"""
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    """autocast dtype (auto: bf16 on CUDA, none on CPU); the loss always runs in fp32"""
    compile: bool = False
    """torch.compile the model"""
    # evaluation (label propagation, spec §4)
    davis: str = ""
    """DAVIS-2017 root (JPEGImages/480p, Annotations/480p, ImageSets/2017/val.txt)"""
    jhmdb: str = ""
    """JHMDB file list (lines `<joint_positions.mat> <frames folder>`)"""
    vip: str = ""
    """VIP file list (lines `<Images/videosN> <Annotations/Category_ids/videosN>`)"""
    davis_size: tuple[int, int] = (480, 880)
    """DAVIS frame size (H, W) fed to the ViT (spec §4)"""
    davis_native_gt: bool = False
    """score DAVIS against native-size GT (default: GT resized to --davis-size, as official)"""
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
    """also evaluate a randomly initialised encoder, side by side (the demo does)"""
    random_init_seeds: int = 1
    """with --eval-random-init: how many random initialisations (seeds seed, seed + 1, ...;
    the first is the trained model's start); their J&F spread is the verdict's noise"""
    synthetic_seed: int = 0
    """demo without --davis: seed of the embedded camouflage DAVIS set (0: the verdict's
    split; 1: the validation split the demo's hyper-parameters were chosen on)"""
    trained_spread: float = 0.0
    """std of DAVIS J&F over >= 3 training seeds, measured beforehand, for a one-run verdict;
    0: none (the verdict then cannot say "helps")"""
    heldout_images: int = 10000
    """held-out pretext evaluation (`pretext_eval`, on ROOT/val of an image folder): at most
    this many images, a fixed random subset; 0: skip it"""
    preset: str = ""
    """the preset applied (set by --preset)"""


PRESETS = {
    # Tab. 1 IN-Sub rows: 239,787 random ImageNet train images (Sec. 4.1), 400 epochs
    "in1k-vits": dict(subset=239787),  # DAVIS J&F 60.4, VIP mIoU 33.3, JHMDB PCK@0.1 43.6
    "in1k-vitb": dict(subset=239787, model="base"),  # 60.9 / 32.8 / 44.3; decoder 256/4/8
    "k400-vits": dict(global_scale=(0.5, 1.0)),  # Tab. 1: 58.6 / 33.7 / 42.9
    "siammae-k400": dict(views="frames", mask_ratio=0.95),  # Tab. 1 SiamMAE‡: 57.9 / 33.2 / 46.1
    # CPU demo: see the docstring's last deviation
    "demo": dict(model="tiny", depth=4, patch_size=8, img_size=64, mask_ratio=0.96, subset=1200,
                 decoder_dim=128, decoder_heads=4, decoder_ffn=512, batch_size=32, epochs=10,
                 warmup_epochs=1, blr=4e-3, amp="bf16", num_workers=1, log_every=20,
                 ckpt_every=500, davis_size=(96, 160), eval_random_init=True,
                 random_init_seeds=3, trained_spread=0.012),
}


# ---- 3. Data ----
MEAN, STD = propagation.MEAN, propagation.STD
IMG_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(root: str, subset: int = 0, seed: int = 0) -> list:
    """Image files under `root/train` (or `root`), recursively, sorted; a fixed random subset
    of `subset` of them when asked (the paper's IN-Sub, Sec. 4.1)."""
    base = Path(root) / "train" if (Path(root) / "train").is_dir() else Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"{base}: no such image folder")
    files = sorted(str(p) for p in base.rglob("*") if p.suffix.lower() in IMG_EXTS)
    if not files:
        raise FileNotFoundError(f"{base}: no images ({', '.join(IMG_EXTS)}) found")
    if 0 < subset < len(files):
        keep = np.random.default_rng(seed).choice(len(files), subset, replace=False)
        files = [files[i] for i in sorted(keep)]
    return files


def read_video_list(path: str) -> list:
    """Video paths of a list file, lines `path [label [num_frames]]` (the official K400 list has
    the path only); relative paths are resolved against the list's folder."""
    root, out = Path(path).parent, []
    with open(path) as fh:
        for line in fh:
            if fields := line.split():
                out.append(str(Path(fields[0]) if os.path.isabs(fields[0]) else root / fields[0]))
    if not out:
        raise cli.InputError(f"{path}: empty video list")
    return out


def make_views(args: Args):
    """The view strategy of `args.views` as a function: list of 1 image (2 frames for
    `frames`), PIL or uint8 (3, H, W) -> (2, 3, S, S), index 0 unmasked, 1 masked (spec §1)."""
    s, ratio = args.img_size, args.ratio
    rrc = lambda scale: v2.RandomResizedCrop(s, scale=scale, ratio=ratio, antialias=True)  # noqa: E731
    global_crop, local_crop = rrc(args.global_scale), rrc(args.local_scale)
    flip = v2.RandomHorizontalFlip(0.5 if args.hflip else 0.0)
    extra = []  # Tab. 3d ablations, on the global view only
    if args.color_jitter:
        extra.append(v2.ColorJitter(0.4, 0.4, 0.4, 0.1))
    if args.gaussian_blur:
        extra.append(v2.GaussianBlur(2 * round(0.05 * s) + 1, sigma=(0.1, 2.0)))
    extra = v2.Compose(extra) if extra else v2.Identity()
    norm = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    shared = v2.Compose([rrc(args.frames_scale), flip])

    def views(imgs: list) -> torch.Tensor:
        if args.views == "frames":  # SiamMAE: one crop and one flip for both frames
            a, b = shared(imgs[0], imgs[1])
        elif args.views in ("global-to-local", "local-to-global"):
            g = global_crop(imgs[0])
            loc = local_crop(g)  # cut from the resized global crop, so V2 lies inside V1
            g, loc = extra(flip(g)), flip(loc)  # two independent flips
            a, b = (g, loc) if args.views == "global-to-local" else (loc, g)
        elif args.views == "random":  # two independent global crops
            a, b = extra(flip(global_crop(imgs[0]))), flip(global_crop(imgs[0]))
        else:  # same: one crop and flip for both views
            a = b = extra(flip(global_crop(imgs[0])))
        return torch.stack([norm(a), norm(b)])
    return views


def read_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise ValueError(f"{path}: unreadable image ({e})") from None


class PretrainPairs(Dataset):
    """View pairs (2, 3, S, S) of an image (or of a video frame: one random frame per video and
    epoch, CropMAE-K400), or of two frames `frame_gap` apart (SiamMAE). All draws come from
    (seed, epoch, index)."""

    def __init__(self, files: list, is_video: bool, args: Args):
        self.samples = [(f, -1) for f in files]  # SafeDataset names failing files from this
        self.is_video, self.args, self.views = is_video, args, make_views(args)
        if args.views == "frames" and not is_video:
            raise cli.InputError("--views frames (SiamMAE) needs videos: give --data a video list")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> torch.Tensor:
        epoch, index = data.split_key(key)
        path, a = self.samples[index][0], self.args
        rng = data.sample_np_rng(a.seed, epoch, index)
        if not self.is_video:
            imgs = [read_image(path)]
        else:
            n = video.video_length(path)
            if a.views == "frames":  # spec §1: gap in [min(4, n-1), min(48, n)), earlier = V1
                gap = int(rng.integers(min(a.frame_gap[0], n - 1), max(min(a.frame_gap[1], n), 1)))
                first = int(rng.integers(0, n - gap))
                idx = [first, first + gap]
            else:
                idx = [int(rng.integers(0, n))]
            clip = video.read_clip(path, idx).permute(0, 3, 1, 2)  # uint8 (T, 3, H, W)
            imgs = [tv_tensors.Image(f) for f in clip]  # so that v2 transforms every frame
        with torch.random.fork_rng(devices=[]):  # v2 transforms draw from torch's global RNG
            torch.default_generator.manual_seed(int(rng.integers(2 ** 62)))
            return self.views(imgs)


class HeldoutPairs(PretrainPairs):
    """`pretext_eval`'s samples: (view pair (2, 3, S, S) drawn as in pretraining from
    (args.seed, epoch 0, index), mask noise (L,) from its own `data.sample_rng` of the same
    key). Give it `args` with the evaluation's seed."""

    def __init__(self, files: list, args: Args, num_patches: int):
        super().__init__(files, False, args)
        self.num_patches = num_patches

    def __getitem__(self, index: int) -> tuple:
        noise = torch.rand(self.num_patches, generator=data.sample_rng(self.args.seed, 0, index))
        return super().__getitem__(index), noise


def pretrain_dataset(args: Args) -> Dataset:
    root = args.data or str(synthetic.camouflage_images())
    if os.path.isfile(root):
        return PretrainPairs(read_video_list(root), True, args)
    return PretrainPairs(list_images(root, args.subset, args.seed), False, args)


def make_loader(ds: Dataset, args: Args) -> DataLoader:
    """Shuffled full batches keyed (epoch, index), with the loader's own generator: starting
    an iterator never draws from the global RNG that the masks use (`data.make_loader`)."""
    return data.make_loader(ds, args.batch_size, True, args.seed, args.num_workers)


# ---- 4. Model ----
class DecoderBlock(nn.Module):
    """Post-norm block in the official order: cross-attention to V1, FFN, self-attention
    (spec §1 decoder; the paper's "cross-attention, feed-forward, self-attention")."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1, self.linear2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        d = self.dropout
        x = self.norm2(x + d(self.multihead_attn(x, memory, memory, need_weights=False)[0]))
        x = self.norm3(x + d(self.linear2(d(F.gelu(self.linear1(x))))))
        return self.norm1(x + d(self.self_attn(x, x, x, need_weights=False)[0]))


def random_masking(B: int, L: int, ratio: float, device,
                   noise: torch.Tensor | None = None) -> tuple:
    """MAE masking (spec §1): noise U(0,1)^L per sample, keep the int(L(1-r)) smallest.
    Returns keep indices (B, K) (in noise order), ids_restore (B, L), mask (B, L) 1 = removed.
    `noise` (B, L): given instead of drawn from the global RNG (fixed masks, `pretext_eval`).
    K is fixed by the ratio, so the visible tokens are a `gather` of the keep indices (never a
    boolean-mask index, whose size the host would have to read back), and the mask is built on
    the device from ids_restore, without a constant from the host."""
    keep = int(L * (1 - ratio))
    if not 0 < keep <= L:
        raise cli.InputError(f"--mask-ratio {ratio} keeps {keep} of {L} patches; it must keep "
                             f">= 1")
    if noise is None:
        noise = torch.rand(B, L, device=device)
    ids_shuffle = noise.argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    # MAE: ones with the first `keep` zeroed, unshuffled by ids_restore = [ids_restore >= keep]
    mask = (ids_restore >= keep).float()
    return ids_shuffle[:, :keep], ids_restore, mask


class CropMAE(vit.VisionTransformer):
    """The Siamese MAE of spec §1: the encoder is this ViT (official key names, fixed 2-D
    sin-cos embeddings, CLS token), the decoder parts are `decoder_*` and `mask_token`."""

    def __init__(self, args: Args):
        dim, depth, heads = vit.vit_sizes[args.model]
        super().__init__(args.img_size, args.patch_size, 3, dim, args.depth or depth, heads)
        dd, self.norm_pix_loss = args.decoder_dim, args.norm_pix_loss
        L = self.patch_embed.grid_size[0] * self.patch_embed.grid_size[1]
        self.decoder_embed = nn.Linear(dim, dd)  # shared by both views
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed = nn.Parameter(
            vit.sincos_2d(*self.patch_embed.grid_size, dd, cls_token=True)[None],
            requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            DecoderBlock(dd, args.decoder_heads, args.decoder_ffn, args.decoder_dropout)
            for _ in range(args.decoder_depth))
        self.decoder_norm = nn.LayerNorm(dd, eps=1e-6)
        self.decoder_pred = nn.Linear(dd, args.patch_size ** 2 * 3)
        self.num_patches = L
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):  # MHA out_proj included; in_proj keeps torch's init
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_decoder(self, z1: torch.Tensor, z2: torch.Tensor, ids_restore: torch.Tensor):
        """z1 (B, 1+L, D) all V1 tokens, z2 (B, 1+K, D) visible V2 tokens -> (B, L, p*p*3)."""
        memory = self.decoder_embed(z1)  # (B, 1+L, Dd), CLS kept, no position embedding
        q = self.decoder_embed(z2)  # (B, 1+K, Dd)
        B, L = q.shape[0], ids_restore.shape[1]
        q_ = torch.cat([q[:, 1:], self.mask_token.expand(B, L + 1 - q.shape[1], -1)], 1)
        q_ = vit.gather_tokens(q_, ids_restore)  # unshuffle: (B, L, Dd)
        q = torch.cat([q[:, :1], q_], 1) + self.decoder_pos_embed  # (B, 1+L, Dd)
        for blk in self.decoder_blocks:
            q = blk(q, memory)
        return self.decoder_pred(self.decoder_norm(q))[:, 1:]

    def forward(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """imgs (B, 2, 3, H, W), index 0 unmasked (V1), 1 masked (V2) -> (loss, pred, mask);
        `noise` (B, L) fixes the masks (`random_masking`)."""
        v1, v2_ = imgs[:, 0], imgs[:, 1]
        keep, ids_restore, mask = random_masking(imgs.shape[0], self.num_patches, mask_ratio,
                                                 imgs.device, noise)
        z1 = self.forward_features(v1)  # (B, 1+L, D)
        z2 = self.forward_features(v2_, keep_idx=keep)  # (B, 1+K, D): visible patches only
        pred = self.forward_decoder(z1, z2, ids_restore)
        loss = mae_loss(v2_, pred, mask, self.patch_embed.patch_size, self.norm_pix_loss)
        return loss, pred, mask


def build_model(args: Args) -> CropMAE:
    return CropMAE(args)


# ---- 5. Loss ----
def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix: bool = True) -> torch.Tensor:
    """MSE between `pred` (B, L, p*p*3) and the patches of `imgs` (B, 3, H, W), averaged over
    a patch's values and then over the masked patches only (spec §1, Sec. 3.3). With
    `norm_pix`, each target patch is standardised by its mean and unbiased variance (eps 1e-6
    inside the square root). Computed in fp32."""
    target = vit.patchify(imgs.float(), patch_size)  # (B, L, p*p*3), (p, q, c) order
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred.float() - target) ** 2).mean(-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()


# ---- 6. Training step ----
def train_step(model, imgs: torch.Tensor, optimizer, amp: optim.Amp, mask_ratio: float,
               noise: torch.Tensor | None = None) -> dict:
    """One (micro-)batch: forward of `imgs` (B, 2, 3, H, W) under autocast, then `amp.step`
    (non-finite check, backward, the optimiser step). `noise` (B, L) fixes the masks (default:
    drawn on the device, as the official code). Host syncs: the non-finite check only.
    Returns {"loss": the detached loss tensor}."""
    with amp.autocast():
        loss, _, _ = model(imgs, mask_ratio, noise)
    amp.step(loss, optimizer)
    return {"loss": loss.detach()}


# ---- 7. Evaluation ----
@torch.no_grad()
def patch_features(model: CropMAE, frames: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> final-norm patch tokens (B, D, H/p, W/p), CLS dropped (spec §4). The
    14 x 14 position table is resized bicubically with the official `scale_factor` call."""
    p = model.patch_embed.patch_size
    h, w = frames.shape[-2] // p, frames.shape[-1] // p
    gh, gw = model.patch_embed.grid_size
    pos = model.pos_embed[:, 1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    if (h, w) != (gh, gw):
        pos = F.interpolate(pos, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic",
                            align_corners=False)
    x = model.patch_embed(frames) + pos.flatten(2).transpose(1, 2)
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(len(x), -1, -1), x], 1)
    for blk in model.blocks:
        x = blk(x)
    x = model.norm(x)[:, 1:]
    return x.transpose(1, 2).reshape(len(x), -1, h, w)


def heldout_files(args: Args) -> list:
    """The images of pretext_eval: ROOT/val of the --data image folder (of the synthetic set
    without --data), at most --heldout-images of them; [] when there is none (video lists)."""
    root = args.data or str(synthetic.camouflage_images())
    val = Path(root) / "val"
    if args.heldout_images <= 0 or args.views == "frames" or not val.is_dir():
        return []
    try:
        return list_images(str(val), args.heldout_images, args.seed)
    except FileNotFoundError:  # ROOT/val holds no images
        return []


@torch.no_grad()
def pretext_eval(model: CropMAE, args: Args, device) -> dict:
    """The pretext on held-out images (level 1): the training objective, `mae_loss`
    (norm-pix as configured, so in units of a patch's own standard deviation squared), on view
    pairs of images pretraining never sees, ROOT/val of the --data image folder (--heldout-
    images of them at most). Skipped ({}) for a video list (K400, SiamMAE) or without ROOT/val.

    Each image gives one pair (2, 3, S, S) from the pretraining pipeline (`make_views`) and
    one mask of V2's L patches, both drawn from (seed + 1, epoch 0, index) alone, the mask with
    its own torch.Generator: every model sees the same pairs and masks, and the global RNG is
    not touched. The model runs in eval mode (no decoder dropout) under --amp.
    Returns `heldout_loss`: the mean over images of each image's loss (the mean over its masked
    patches of the squared error, averaged over a patch's p*p*3 values), lower is better;
    `heldout_loss_se`: its standard error, std of the per-image losses / sqrt(n);
    `heldout_loss_mean_predictor`: the same loss when each masked patch is predicted by its own
    mean value (0 in norm-pix units; about 1 for a textured patch, 0 for a flat one), a
    model-independent baseline that a model must beat to show it predicts structure;
    `heldout_images`: n."""
    files = heldout_files(args)
    if not files:
        return {}
    ds = data.SafeDataset(HeldoutPairs(files, dataclasses.replace(args, seed=args.seed + 1),
                                       model.num_patches),
                          args.max_fail_fraction, "held-out pretext data", replace=False)
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=data.collate_readable,
                        generator=torch.Generator())  # an iterator's seed: not the global RNG
    amp, p = optim.Amp(args.amp, device), args.patch_size
    was = model.training
    model.eval()
    losses, baseline = [], []
    for batch in loader:
        if batch is None:
            continue
        imgs, noise = (t.to(device, non_blocking=True) for t in batch)
        with amp.autocast():
            _, pred, mask = model(imgs, args.mask_ratio, noise)
        v2_ = imgs[:, 1].float()
        mean = vit.patchify(v2_, p).mean(-1, keepdim=True).expand(pred.shape)
        mean_pred = torch.zeros_like(mean) if args.norm_pix_loss else mean
        for i in range(len(imgs)):  # per image, for the standard error
            losses.append(mae_loss(v2_[i:i + 1], pred[i:i + 1], mask[i:i + 1], p,
                                   args.norm_pix_loss))
            baseline.append(mae_loss(v2_[i:i + 1], mean_pred[i:i + 1], mask[i:i + 1], p,
                                     args.norm_pix_loss))
    model.train(was)
    if not losses:
        return {}
    loss, base = torch.stack(losses).double().cpu(), torch.stack(baseline).double().cpu()
    n = len(loss)
    se = loss.std().item() / n ** 0.5 if n > 1 else float("nan")
    return {"heldout_loss": loss.mean().item(), "heldout_loss_se": se,
            "heldout_loss_mean_predictor": base.mean().item(), "heldout_images": n}


def evaluate(model: CropMAE | Callable, args: Args, device, out_dir: str | None = None) -> tuple:
    """Label propagation on the benchmarks given (spec §4) and SIGMA's unsupervised VOS (Tab.
    4, common/vos.py; its picture for the trained model) of `model`'s patch tokens, or of a
    feature function (B, 3, H, W) -> (B, C, H/p, W/p) such as the raw-pixel baseline.
    Returns (metrics, DAVIS preds).
    Under torchrun, call it on every rank: the ranks share the videos (`propagation.eval_*`),
    every rank gets the same metrics, and the DAVIS preds are this rank's sequences (rank 0
    holds the first one; each rank writes its own sequences' PNGs to `out_dir`)."""
    module = isinstance(model, nn.Module)
    was = module and model.training
    if module:
        model.eval()
    feat = (lambda x: patch_features(model, x)) if module else model
    kw = dict(temperature=args.temperature, radius=args.radius, context=args.context,
              device=device)
    metrics, davis_preds = {}, []
    if args.davis:
        scores, davis_preds = propagation.eval_davis(
            feat, args.davis, tuple(args.davis_size), args.topk,
            gt_at_eval_size=not args.davis_native_gt, out_dir=out_dir, **kw)
        metrics.update({"davis_jf": scores["J&F-Mean"], "davis_j": scores["J-Mean"],
                        "davis_f": scores["F-Mean"]})
    if args.jhmdb:
        pck = propagation.eval_jhmdb(feat, args.jhmdb, tuple(args.jhmdb_size), args.topk, **kw)
        metrics.update({"jhmdb_pck@0.1": pck["PCK@0.1"], "jhmdb_pck@0.2": pck["PCK@0.2"]})
    if args.vip:
        metrics["vip_miou"] = propagation.eval_vip(feat, args.vip, args.vip_long_side,
                                                   args.vip_topk, **kw)["mIoU"]
    if args.vos_davis or args.vos_ytvos:  # per-frame tokens (spec §3 of vos); trained: picture
        metrics.update(vos.vos_metrics(lambda x: feat(x).permute(0, 2, 3, 1), args.vos_davis,
                                       args.vos_ytvos, out_dir and args.output_dir,
                                       device=device))
    if module:
        model.train(was)
    return metrics, davis_preds


def load_weights(model: CropMAE, path: str) -> None:
    """Our last.pt or an official checkpoint ({"model": state_dict}, same key names); the
    encoder's keys must all be there, the decoder's may be missing (encoder-only files)."""
    ckpt = checkpoint.load(path)
    sd = checkpoint.clean_state_dict(ckpt.get("model", ckpt))
    missing = [k for k in model.state_dict() if k not in sd and not k.startswith(
        ("decoder_", "mask_token"))]
    if missing:
        raise checkpoint.CheckpointError(f"{path}: encoder weights missing: {missing[:5]}")
    checkpoint.load_model(model, sd, strict=False, what=path)


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (x.float().cpu() * std + mean).clamp(0, 1)


@torch.no_grad()
def save_reconstructions(model: CropMAE, imgs: torch.Tensor, args: Args, path: str) -> None:
    """Rows: V1, V2 with only its visible patches, reconstruction (pasted visible patches,
    norm-pix predictions de-normalised with the true patch statistics, as MAE's figures), V2."""
    model.eval()
    devices = [imgs.device] if imgs.is_cuda else []  # the masks are drawn on imgs' device
    with torch.random.fork_rng(devices=devices):  # a fixed mask, without touching the run's RNG
        torch.manual_seed(args.seed)
        _, pred, mask = model(imgs, args.mask_ratio)
    p, g = args.patch_size, model.patch_embed.grid_size
    target = vit.patchify(imgs[:, 1].float(), p)
    if args.norm_pix_loss:
        std = (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        pred = pred.float() * std + target.mean(-1, keepdim=True)
    m = mask[..., None]
    masked = vit.unpatchify(target * (1 - m), p, *g)  # hidden patches at the mean colour
    recon = vit.unpatchify(target * (1 - m) + pred.float() * m, p, *g)
    rows = [unnormalise(r) for r in (imgs[:, 0], masked, recon, imgs[:, 1])]
    log.save_grid(rows, path, f"CropMAE reconstructions ({args.mask_ratio:.0%} of V2 masked)",
                  ["V1 (seen)", "V2 visible", "reconstruction", "V2 (target)"],
                  [f"sample {i}" for i in range(len(imgs))], scale=2)
    model.train()


def save_propagation(davis_root: str, davis_preds: dict, path: str, n: int = 5) -> None:
    """First DAVIS sequence at n frames: a row of GT masks, then one row per model."""
    _, frames, masks = propagation.read_davis(davis_root)[0]
    ts = np.linspace(0, len(frames) - 1, n).round().astype(int)
    gt = torch.from_numpy(np.stack([propagation.read_label_png(masks[t]) for t in ts]))
    rows = []
    for pred in [gt, *(preds[0][2][ts] for preds in davis_preds.values())]:
        row = []
        for t, lab in zip(ts, pred):
            img = torch.from_numpy(np.array(Image.open(frames[t]).convert("RGB"))).permute(2, 0, 1)
            lab = propagation.resize_nearest(lab, img.shape[-2:])
            row.append(propagation.overlay(img, lab).float() / 255)
        rows.append(torch.stack(row))
    log.save_grid(rows, path, "DAVIS label propagation from the first frame (first sequence)",
                  ["ground truth", *(f"{name.replace('_', '-')} encoder" for name in davis_preds)],
                  [f"frame {t}" for t in ts])


# ---- 8. Main ----
def main(args: Args) -> dict:
    device = dist.init(args.device)
    amp = optim.Amp(args.amp, device)
    args.output_dir = args.output_dir or time.strftime("runs/cropmae-%Y%m%d-%H%M%S")
    if not args.data:  # the embedded sets
        if args.preset == "demo":
            dist.print0("no --data: running the demo preset on the embedded camouflage images, "
                        "DAVIS-format camouflage videos for evaluation")
        args.davis = args.davis or str(synthetic.davis(seed=args.synthetic_seed, sequences=8,
                                                       style="camouflage"))
    dist.seed_all(args.seed)
    if dist.is_main():
        cli.save_args(args, args.output_dir)
    logger = log.Logger(args.output_dir)

    torch.manual_seed(args.seed)
    mae = build_model(args).to(device)
    random_state = {k: v.clone() for k, v in mae.state_dict().items()}
    if args.init_from:
        load_weights(mae, args.init_from)
    if args.compile:
        mae.compile()  # in place: the state-dict keys stay unprefixed
    model = nn.parallel.DistributedDataParallel(mae) if dist.is_dist() else mae
    if args.bench:
        result = bench(model, mae, args, device, amp)
        dist.cleanup()
        return result

    summary = {"method": "cropmae", "data": args.data or "synthetic-images",
               "preset": args.preset, "metrics": {}}
    t0, step = time.time(), 0
    if not args.eval_only:
        step = pretrain(model, mae, args, device, amp, logger)
    summary.update(steps=step, seconds=round(time.time() - t0, 1))

    results, davis_preds = {}, {}
    propagate = bool(args.davis or args.jhmdb or args.vip or args.vos_davis or args.vos_ytvos)
    heldout = dist.is_main() and bool(heldout_files(args))  # pretext_eval: rank 0 alone
    if propagate or heldout:  # propagation on every rank (the ranks share the videos)
        pred_dir = os.path.join(args.output_dir, "davis_pred")
        models = {"trained": mae}
        if args.eval_random_init:
            models["random_init"] = build_model(args).to(device)
            models["random_init"].load_state_dict(random_state)
            for i in range(1, args.random_init_seeds):
                torch.manual_seed(args.seed + i)
                models[f"random_init_{i + 1}"] = build_model(args).to(device)
        if args.eval_random_init and propagate:  # the same evaluation of raw pixels
            models["pixels"] = lambda x: propagation.pixel_features(x, args.patch_size)
        for name, m in models.items():
            results[name] = pretext_eval(m, args, device) if heldout and name != "pixels" else {}
            if propagate:
                scores, davis_preds[name] = evaluate(m, args, device,
                                                     pred_dir if name == "trained" else None)
                results[name].update(scores)
    if dist.is_main() and results:  # the summary, the table and the picture: rank 0
        for name in results["trained"]:
            summary["metrics"][name] = {k: round(v[name], 4) for k, v in results.items()
                                        if name in v}
        width = max(len(name) for name in ["metric", *summary["metrics"]]) + 2
        print(f"{'metric':<{width}}" + "".join(f"{k:>14}" for k in reversed(results)))
        for name, vals in summary["metrics"].items():
            print(f"{name:<{width}}" + "".join(
                f"{'-':>14}" if k not in vals else f"{vals[k]:>14}" if isinstance(vals[k], int)
                else f"{vals[k]:>14.4f}" for k in reversed(results)))
        randoms = [v["davis_jf"] for k, v in results.items()
                   if k.startswith("random_init") and "davis_jf" in v]
        if randoms and "davis_jf" in results["trained"]:  # DESIGN §3: > 2 x larger spread
            summary["verdict"] = verdict("DAVIS J&F", randoms, [results["trained"]["davis_jf"]],
                                         trained_spread=args.trained_spread or None, decimals=3)
            print(summary["verdict"]["line"])
        if davis_preds.get("trained"):  # rank 0's preds start with the first sequence
            save_propagation(args.davis, {k: davis_preds[k] for k in ("random_init", "trained")
                                          if k in davis_preds},
                             os.path.join(args.output_dir, "propagation.png"))
    if dist.is_main():
        with open(os.path.join(args.output_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
    dist.barrier()
    dist.cleanup()
    return summary


def warmup_epochs(args: Args) -> int:
    """--warmup-epochs, or int(0.05 x --epochs) when it is -1 (spec §3)."""
    return args.warmup_epochs if args.warmup_epochs >= 0 else int(0.05 * args.epochs)


def peak_lr(args: Args) -> float:
    """lr = blr x global batch / 256, the global batch being --batch-size x processes x
    --accum-iter (spec §3)."""
    return args.blr * (args.batch_size * dist.world() * args.accum_iter) / 256


def make_optimizer(mae: CropMAE, args: Args, fused: bool) -> torch.optim.AdamW:
    """The pretraining AdamW (spec §3): betas --betas, weight decay on every parameter but the
    1-D ones and biases (cls/mask tokens decayed, frozen position tables left out), lr
    `peak_lr`; `fused` on CUDA (one kernel per step, no host reads)."""
    groups = optim.param_groups(mae, args.weight_decay,  # spec §3: cls/mask tokens decayed
                                no_decay=lambda n, p: p.ndim <= 1 or n.endswith(".bias"))
    return torch.optim.AdamW(groups, lr=peak_lr(args), betas=args.betas, fused=fused)


def pretrain(model, mae: CropMAE, args: Args, device, amp: optim.Amp, logger: log.Logger) -> int:
    """The training loop, keyed by the global step; returns the number of steps done."""
    ds = data.SafeDataset(pretrain_dataset(args), args.max_fail_fraction, "pretrain data")
    global_batch = args.batch_size * dist.world() * args.accum_iter
    peak = peak_lr(args)  # spec §3: lr = blr x batch / 256
    opt = make_optimizer(mae, args, fused=device.type == "cuda")
    loop = training.Loop(make_loader(ds, args), args.epochs, {"model": mae, "optimizer": opt},
                         args, logger, amp, max_steps=args.max_steps, accum_iter=args.accum_iter)
    warmup = min(warmup_epochs(args) * loop.steps_per_epoch, loop.total_steps)
    dist.print0(f"{len(ds)} samples, {loop.steps_per_epoch} steps/epoch, global batch "
                f"{global_batch}, peak lr {peak:.4g}, warmup {warmup} steps, visible patches "
                f"{int(mae.num_patches * (1 - args.mask_ratio))}/{mae.num_patches}, "
                f"amp {amp.mode}, output {args.output_dir}")
    loop.resume(args.resume)
    model.train()
    imgs = None
    for imgs in loop:
        # per-step warmup + half-cosine (spec §3)
        lr = optim.cosine_schedule(loop.step, loop.total_steps, peak, warmup, final=args.min_lr)
        optim.set_lr_wd(opt, lr)
        imgs = imgs.to(device, non_blocking=True)
        out = train_step(model, imgs, opt, amp, args.mask_ratio)
        loop.end_step(out, {"train/lr": lr})
    loop.check_replicas(mae)
    if dist.is_main() and imgs is not None:
        save_reconstructions(mae, imgs[:8], args, os.path.join(args.output_dir,
                                                               "reconstructions.png"))
    return loop.step


def bench(model, mae: CropMAE, args: Args, device, amp: optim.Amp) -> dict:
    """--bench: the optimiser step exactly as `pretrain` runs it (its `make_optimizer`, the lr
    set per step, --accum-iter micro-batches of --batch-size through `train_step`, the masks
    drawn on the device, the model as main built it: DDP, --compile) on random tensors at the
    configured shapes, and the loader alone. Samples per step: batch x accum-iter."""
    b, s, n = args.batch_size, args.img_size, args.accum_iter
    imgs = torch.randn(b, 2, 3, s, s, device=device)
    opt, lr = make_optimizer(mae, args, fused=device.type == "cuda"), peak_lr(args)
    model.train()

    def step() -> None:
        optim.set_lr_wd(opt, lr)
        try:
            for i in range(n):  # as training.Loop: micro-batch i of n, the n-th steps
                amp.accum = (i, n)
                train_step(model, imgs, opt, amp, args.mask_ratio)
        finally:
            amp.accum = (0, 1)
    return log.bench(step, b * n, device, amp_dtype=amp.dtype,
                     loader=make_loader(pretrain_dataset(args), args), model=args.model,
                     img_size=s, mask_ratio=args.mask_ratio, amp=amp.mode, accum_iter=n)


if __name__ == "__main__":
    cli.run(main, Args, PRESETS)
