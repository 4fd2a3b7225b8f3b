"""COMEDIAN: self-supervised spatio-temporal pretraining of a ViViT for action spotting.

J. Denize, M. Liashuha, J. Rabarisoa, A. Orcesi, R. Hérault, "COMEDIAN: Self-Supervised
Learning and Knowledge Distillation for Action Spotting using Transformers", WACV-W 2024
(arXiv:2309.01270), and J. Denize's thesis ch. 6 and app. C; details from the official eztorch
code and the SoccerNet evaluator (spec: ../shared/specs/comedian.md, "spec §n" below).

Method in five lines: a ViViT factorised encoder (a spatial ViT on 2-frame, 1-s tubelets whose
CLS tokens feed a temporal transformer) is pretrained in three stages on SoccerNet-v2 halves at
2 fps. Stage 1: MoCo (SCE with lambda = 1) on 1-s clips trains the spatial ViT. Stage 2: every
temporal token of a 64-s window learns, by the token-level SCE loss, the similarity relations of
a frozen teacher's per-second features (a queue of teacher features as negatives), with whole
tubelets masked. Stage 3: a per-token linear head is fine-tuned with BCE on the +-0.5 s label
encoding (head only, then everything); inference slides 64-s windows, merges by max and applies
per-class NMS before the official tight average-mAP.

Launch (batch sizes are per GPU; the official runs use 2 A100s, spec §4):
    python comedian.py                      # CPU demo: all stages small on the synthetic set
    torchrun --nproc_per_node=2 comedian.py --data ~/soccernet --output-dir runs/c1 \
        --stage spatial      # stage 1; then --stage distill (2, Baidu teacher bank) and
                             # finetune (3: phases A, B), each from the last's file in runs/c1
    python comedian.py --data ~/soccernet --stage spot --output-dir runs/c1   # valid a-mAP
    torchrun --nproc_per_node=8 comedian.py --data ~/soccernet --spatial-batch-size 128 \
        --distill-batch-size 4 --ft-batch-size 8   # 8 GPUs, official global batches, all stages
    python comedian.py --data ~/soccernet --amp fp16     # 1 GPU: the official per-GPU batches,
                                                          # half the global ones (lr x B / 256)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        comedian.py --data ~/soccernet --spatial-batch-size 64 --distill-batch-size 2 \
        --ft-batch-size 4                                       # 2 nodes x 8 GPUs
Presets: vivit-t (the default, the final model), vivit-t-32s (the ablation setting: 32-s
clips, depth 4, no masking), vivit-s (ViViT-S in that setting), demo.

Deviations, with reasons:
- Edge removal at inference keeps the official end-of-half quirk by default: the guard that
  should keep the last `r` seconds of a half compares against (2D - 1) x 1 s, so they always
  lose their predictions (spec §1 Inference step 3, §7.7); this keeps the released numbers.
  `--no-official-end` is the fix (compare with the half duration D, as the start guard does).
- A half shorter than one window gets one window starting at 0 (`soccernet.window_starts`;
  the official sampler would start it at floor(D) - W < 0); never the case for real halves.
- Augmentations run per window on the CPU with torchvision v2 (one draw for all frames of a
  clip), not batched on the GPU with torchaug; their draws, the temporal masks and the mixup
  weights come from (seed, epoch, index) in the loader (`sample_draws`: the GPU step draws
  nothing and waits for nothing); a batch's mixup permutation is the argsort of its windows'
  uniform keys, uniform as `torch.randperm`. The blur kernel is 10 % of the image (23 at 224,
  the configs'), at least 13 so that +-3 sigma fits (`augment.blur_kernel`, as SCE); the blur
  is torchvision's as two banded matrix products (`augment.GaussianBlur`, ~1e-6 apart).
- Frames at 2 fps are those on screen at t = i / 2 s (PyAV, seeking), in place of ffmpeg's
  `fps=2` JPEG extraction; 2-fps frame folders (the official layout) are read as they are.
- Window starts, stage 2: one per equal segment of [0, D - W], uniform inside it, floored to
  0.5 s; stage 3: uniform among non-overlapping sets. My reading of eztorch's samplers'
  documented behaviour (spec §1), not a transcription.
- The teacher bank's PCA is exact: float64 streamed sums (z-score, then the eigenvectors of
  the correlation matrix), equal to an exact `PCA(512)` of the z-scored data up to each
  component's sign (which the loss's dot products do not see). The official sklearn call
  leaves `svd_solver="auto"`, which at Baidu scale (8,576 dimensions, ~1.6M rows) picks the
  randomised solver, an approximation of the same subspace; the exact one costs no more here.
- Stage 1's CLS token starts from trunc-normal(0.02) where timm 0.6.13 (eztorch's stage-1 ViT)
  draws N(0, 1e-6); every other initial value follows timm. With timm's draw the tiny 12-step
  stage-1 test lowered its fixed-batch loss by 0.15 instead of more than 1.0 (one seed), so
  the change waits for a measurement at a real scale.
- Fine-tuning does not validate every 10 epochs; `--stage spot` scores the final weights.
  Raw buffers of several seeds (the thesis' ensembles) are not written.
- `--head-prior p` (off by default) starts the classifier's bias at log(p / (1 - p)); the
  demo uses 0.01: from bias 0 its few hundred steps cannot learn the bias of rare events, and
  the trunk collapses to a constant meanwhile (measured: a-mAP at chance).
- `demo` is a CPU smoke setting, not a thesis one: a 64-wide ViViT (4 + 2 blocks, 8-px
  patches at 32 px), 16-s windows, small queues and batches; stage 1 skipped (`--init-from
  random`, T's "none" row: on the synthetic 1-s clips MoCo learns nothing of the event class,
  a probe of its trunk 40 % against 42 % for random ones; README), 3,968 steps of stage 2,
  480 + 288 of stage 3 (stage-2 and phase-A lrs chosen on `--synthetic-seed 1`), alpha_2 = 0
  (with phase-B masking a random trunk stays at chance), the synthetic teacher bank (it knows
  the visible events as Baidu's features do; `--teacher-name stage1`: our stage-1 trunk).
  Its verdict is on the classifier-only protocol (phase A, "C" of T Tab. 6.5) against 3
  random trunks, uniform random scores beside; full fine-tuning is a second row (README).
"""
import collections
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from common import (augment, checkpoint, cli, data, dist, log, optim, soccernet, synthetic,
                    training, vit)
from common.evaluate import verdict  # DESIGN §3's rule

PathLike = Union[str, os.PathLike]

# SoccerNet-v2 (classes, 2-fps frames, labels, inference, metric): common/soccernet.py
FRAMES_PER_TOKEN = 2  # one Conv3d tubelet = one temporal token = 1 s


# ---- 2. Arguments ----
@dataclass
class Args:
    # run
    output_dir: str = ""
    """args.json, log.jsonl, *.pt, predictions, summary.json (default: runs/comedian-<time>)"""
    seed: int = 42
    """random seed (the code's seeds are 42, 203 and 666; T averages the three)"""
    stage: Literal["all", "spatial", "features", "distill", "finetune", "spot"] = "all"
    """spatial (stage 1), features (a stage-1 teacher bank), distill (stage 2), finetune (stage
    3: phase A head only, then B all), spot (inference, metric); all: each in turn"""
    max_steps: int = 0
    """stop every training loop after this many steps (0: its epochs)"""
    log_every: int = 50
    """steps between log lines"""
    ckpt_every: int = 1000
    """steps between checkpoints (and at the end of each loop)"""
    resume: str = ""
    """resume --stage from this file (spatial.pt, distill.pt, head.pt: phase A, finetune.pt);
    resuming from <output-dir> is automatic"""
    init_from: str = ""
    """weights the first stage run starts from, ours or eztorch's (`TRUNK_PREFIXES`): distill:
    a stage-1 file or "random" (T's "none" row); finetune: a stage-2 (or 1) file or "random";
    spot: finetune.pt or a released COMEDIAN file. Default: the previous stage's file"""
    bench: bool = False
    """time each loop's training step on random tensors at the configured shapes"""
    # data
    data: str = ""
    """SoccerNet-v2 root: <game>/{1,2}_224p.mkv (or 2-fps folders), Labels-v2.json, <split>.txt
    game lists; empty: the synthetic set (demo)"""
    train_splits: tuple[str, ...] = ("train",)
    """splits the stages train on (T: train for validation numbers, train valid for test)"""
    eval_split: str = "valid"
    """split that `spot` predicts and scores (the code's "val" is the evaluator's "valid")"""
    video_name: str = "224p"
    """a half is {half}_{video_name}.mkv or the 2-fps folder {half}_{video_name}/ (00000001.jpg:
    t = 0, the official extraction)"""
    teacher_dir: str = ""
    """root of the teacher bank <game>/{half}_<teacher_name>.npy (default: --data; "stage1":
    <output-dir>/teacher)"""
    teacher_name: str = "baidu_soccer_embeddings"
    """teacher files {half}_<name>.npy, a row per 1/teacher_fps s (spec §3); "stage1": written
    by stage `features` from our stage-1 trunk"""
    teacher_fps: float = 1.0
    """rows per second of the teacher features (Baidu: 1)"""
    num_workers: int = 8
    """DataLoader worker processes per GPU"""
    max_fail_fraction: float = 0.05
    """abort when more than this fraction of windows cannot be decoded"""
    cache_frames: bool = False
    """keep decoded halves in memory at 2 fps, per worker (small sets: 45 min at 224p is 1.4 GB)"""
    # model
    embed_dim: int = 192
    """ViViT width D (ViViT-T 192, ViViT-S 384; spec §2)"""
    depth: int = 12
    """spatial transformer blocks"""
    num_heads: int = 3
    """spatial heads (T 3, S 6)"""
    temporal_depth: int = 6
    """temporal transformer blocks (config default 4; documented commands and best: 6)"""
    temporal_heads: int = 3
    """temporal heads (T 3, S 6)"""
    patch_size: int = 16
    """spatial patch; the tubelet is 2 frames x patch x patch"""
    img_size: int = 224
    """frames are squashed to img_size^2 (stages 2, 3, inference) or cropped (stage 1)"""
    drop_path: float = 0.1
    """stochastic depth, linear 0 -> this over each transformer"""
    window: float = 64.0
    """seconds per clip in stages 2, 3 and inference (2 x window frames, window tokens)"""
    # stage 1: spatial MoCo (SCE with lambda = 1)
    spatial_epochs: int = 100
    """stage-1 epochs (T 100; the config says 200, the docs load epoch 99)"""
    spatial_base_lr: float = 5e-4
    """stage-1 AdamW lr per 256 clips (x B/256 = 2e-3 at 1024)"""
    spatial_batch_size: int = 512
    """1-s clips per GPU (2 GPUs x 512 = the official 1,024)"""
    spatial_warmup_epochs: int = 10
    """linear warmup from 0"""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """stage-1 RandomResizedCrop scale (configs/transform/crops/soccernet.yaml)"""
    crop_ratio: tuple[float, float] = (1.3275, 2.2125)
    """stage-1 RandomResizedCrop aspect ratio"""
    queue_size: int = 65536
    """stage-1 queue of keys (a multiple of 2 x global batch)"""
    proj_hidden: int = 1024
    """projector 192 -> 1024 -> 1024 -> out and predictor 256 -> 1024 -> 256 (GELU, no BN)"""
    proj_dim: int = 256
    """stage-1 projection size"""
    tau: float = 0.1
    """online temperature, stages 1 and 2 (Eqs. 6.2, 6.5)"""
    ema_m0: float = 0.99
    """stage-1 EMA momentum, cosine to 1"""
    # stage 2: distillation
    distill_epochs: int = 100
    """stage-2 epochs"""
    distill_base_lr: float = 4e-3
    """stage-2 lr per 256 windows (C 4e-3 = T 2e-3 x 128/64 frames; x 32/256 = 5e-4)"""
    distill_batch_size: int = 16
    """windows per GPU (2 GPUs x 16 = the official 32 for 64-s windows)"""
    distill_warmup_epochs: int = 10
    """linear warmup from 0.01 x peak; the cosine ends at 0.01 x peak"""
    distill_windows: int = 76
    """windows per game and epoch, half per half, one jittered window per segment (C 76)"""
    distill_queue_size: int = 65536
    """queue of teacher features (a multiple of global batch x window tokens)"""
    pca_dim: int = 512
    """teacher features: z-scored, PCA to this size on the training halves (spec §1)"""
    lam: float = 0.5
    """lambda: weight of the one-hot positive in the target (Eq. 6.3)"""
    tau_m: float = 0.05
    """teacher temperature (C 0.05, T 0.07; Eq. 6.4)"""
    mask_ratio: float = 0.25
    """alpha_1: fraction of frames dropped in stage 2 (whole tubelets)"""
    # stage 3: fine-tuning for spotting
    head_epochs: int = 30
    """phase A: classifier only, trunk frozen in eval mode"""
    head_base_lr: float = 1e-3
    """phase-A lr per 256 windows (C: that of phase B)"""
    ft_epochs: int = 20
    """phase B: everything (ViViT: 20)"""
    ft_base_lr: float = 1e-3
    """stage-3 lr per 256 windows (x 64/256 = 2.5e-4), both phases, no warmup"""
    ft_batch_size: int = 32
    """windows per GPU (2 GPUs x 32 = the official 64)"""
    ft_windows: int = 50
    """windows per game and epoch (25 per half: first and last forced, others non-overlapping)"""
    ft_mask_ratio: float = 0.25
    """alpha_2: frames dropped in phase B"""
    mixup_alpha: float = 0.1
    """mixup lambda ~ Beta(a, a) per window (0: no mixup)"""
    head_prior: float = 0.0
    """0: the classifier's bias starts at 0 (official); p > 0: at log(p / (1 - p)) (deviations)"""
    final_lr_ratio: float = 0.01
    """stages 2 and 3: the cosine ends at this x peak"""
    weight_decay: float = 0.05
    """AdamW weight decay; none on norms, biases, embeddings, tokens (spec §4)"""
    clip_grad: float = 1.0
    """gradient-norm clipping, every stage"""
    # system
    device: str = "auto"
    """cuda if available, else cpu"""
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    """autocast (auto: bf16 on CUDA, none on CPU; the code trains in fp16)"""
    compile: bool = False
    """torch.compile the trunks"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    # inference and metric
    remove_s: float = 12.0
    """edge removal: seconds dropped at each window edge (T best 12; T default 6)"""
    official_end: bool = True
    """replicate the official end-of-half quirk of edge removal (spec §7.7)"""
    merge: Literal["max", "average"] = "max"
    """how overlapping windows merge"""
    nms: Literal["soft", "hard"] = "soft"
    """per-class NMS (T best: soft)"""
    nms_window: int = 20
    """NMS window in 0.5-s indices (20 = 10 s)"""
    nms_threshold: float = 0.001
    """NMS score threshold"""
    metric: Literal["tight", "loose", "at1", "at2", "at3", "at4", "at5"] = "tight"
    """the spotting metric reported first (the summary holds tight and loose)"""
    eval_random_init: bool = False
    """also fine-tune and score random trunks, and score each trunk after phase A too (classifier
    only, the demo's verdict)"""
    random_init_seeds: int = 1
    """random trunks (seeds seed, seed + 1, ...): their classifier-only spread is the verdict's"""
    trained_spread: float = 0.0
    """std of classifier-only a-mAP over >= 3 training seeds (README); 0: unknown, no helps"""
    synthetic_seed: int = 0
    """without --data: seed of the synthetic set (0: the verdict's; demo values chosen on 1)"""
    preset: str = ""
    """the preset applied (set by --preset)"""


# T's ablation setting (Tab. 6.2-6.5 baseline, 64.7): 32-s clips, depth 4, no masking
_ABLATION = dict(window=32.0, distill_batch_size=32, ft_batch_size=64, distill_windows=150,
                 temporal_depth=4, mask_ratio=0.0, ft_mask_ratio=0.0, distill_base_lr=2e-3,
                 ft_base_lr=5e-4)
PRESETS = {
    "vivit-t": dict(),  # the final model: 64-s clips, depth 6, alpha 0.25 / 0.25 (66.6)
    "vivit-t-32s": dict(_ABLATION),  # Tab. 6.2: 64.7
    "vivit-s": dict(_ABLATION, embed_dim=384, num_heads=6, temporal_heads=6),  # Tab. 6.2: 65.9
    # CPU demo: every stage small on the synthetic set (see the deviations)
    "demo": dict(embed_dim=64, depth=4, num_heads=4, temporal_depth=2, temporal_heads=4,
                 patch_size=8, img_size=32, window=16.0, drop_path=0.0,
                 init_from="random", spatial_epochs=2, spatial_batch_size=32,
                 spatial_warmup_epochs=1,
                 spatial_base_lr=4e-3, queue_size=256, proj_hidden=256, proj_dim=64,
                 distill_epochs=124, distill_batch_size=8, distill_warmup_epochs=1,
                 distill_windows=8, distill_queue_size=1024, distill_base_lr=5e-3,
                 head_epochs=20, head_base_lr=2.0, ft_epochs=12, ft_batch_size=8, ft_windows=6,
                 ft_base_lr=5e-2, ft_mask_ratio=0.0, head_prior=0.01, remove_s=3.0,
                 nms_window=8, teacher_name="synthetic_teacher", num_workers=1,
                 log_every=50, ckpt_every=500, amp="none", eval_random_init=True,
                 random_init_seeds=3, trained_spread=0.15, cache_frames=True),
}


# ---- 3. Data ----

MEAN, STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)  # spec §1 (normalize)


def split_halves(root: Path, splits: Sequence[str], args: Args) -> list:
    """The `soccernet.Half`s of the games of `splits` (their `<split>.txt`), in order, each
    half `{half}_<--video-name>`."""
    games = [g for s in splits for g in soccernet.read_split(root, s)]
    return soccernet.read_halves(root, games, args.video_name)


def data_root(args: Args) -> Path:
    """--data, or the synthetic SoccerNet-format set (written once into the cache)."""
    if not args.data:
        return synthetic.soccernet(seed=args.synthetic_seed, games=(32, 16, 0),
                                   events_per_minute=15.0, gap=2.0)  # ~360 validation events
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data}: no such folder")
    return Path(args.data)


def _colour(brightness, contrast, saturation, hue, p=0.8):
    return v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=p)


def _blur(size: int, p: float):
    return v2.RandomApply([augment.GaussianBlur(augment.blur_kernel(size), (0.1, 2.0))], p=p)


def transform(kind: str, args: Args) -> v2.Compose:
    """Per-clip augmentation of uint8 (T, 3, H, W) -> normalised float (T, 3, S, S), one draw
    for all the frames (spec §1; torchvision v2 in place of eztorch's GPU torchaug):
    "spatial-a"/"spatial-b": stage 1, RandomResizedCrop + BYOL strong-alpha / strong-beta
    (blur p 1 / 0.1, solarize p 0 / 0.2); "distill": squash, jitter (.8, .8, .4, .2) p .8,
    grayscale .2, blur .5, solarize .2, flip; "finetune": squash, jitter (.4, .4, .4, 0)
    p .8, blur .5, flip; "eval": squash only."""
    s = args.img_size
    squash = v2.Resize((s, s), antialias=True)
    if kind in ("spatial-a", "spatial-b"):
        b = kind == "spatial-b"
        ops = [v2.RandomResizedCrop(s, scale=args.crop_scale, ratio=args.crop_ratio,
                                    antialias=True), v2.ToDtype(torch.float32, scale=True),
               _colour(0.4, 0.4, 0.2, 0.1), v2.RandomGrayscale(0.2), _blur(s, 0.1 if b else 1.0)]
        ops += [v2.RandomSolarize(0.5, p=0.2)] if b else []
    elif kind == "distill":
        ops = [squash, v2.ToDtype(torch.float32, scale=True), _colour(0.8, 0.8, 0.4, 0.2),
               v2.RandomGrayscale(0.2), _blur(s, 0.5), v2.RandomSolarize(0.5, p=0.2)]
    elif kind == "finetune":
        ops = [squash, v2.ToDtype(torch.float32, scale=True), _colour(0.4, 0.4, 0.4, 0.0),
               _blur(s, 0.5)]
    elif kind == "eval":
        return v2.Compose([squash, v2.ToDtype(torch.float32, scale=True),
                           v2.Normalize(MEAN, STD)])
    else:
        raise ValueError(f"transform: unknown kind {kind!r}")
    return v2.Compose(ops + [v2.RandomHorizontalFlip(0.5), v2.Normalize(MEAN, STD)])


class SpatialClips(Dataset):
    """Stage 1 (`SlidingWindowSoccerNetClipSampler(1, 0)`): every non-overlapping 1-s clip
    (2 frames) of the halves, decoded once, two views (3, 2, S, S) with their own crop and
    augmentation; every draw from (seed, epoch, index). `single=True`: one squashed view,
    for the teacher bank of stage `features`."""

    def __init__(self, halves: list, args: Args, seed: int, single: bool = False):
        self.halves, self.seed, self.cache = halves, seed, args.cache_frames
        self.items = [(i, s) for i, h in enumerate(halves) for s in range(int(h.duration))]
        self.views = [transform("eval", args)] if single else \
            [transform("spatial-a", args), transform("spatial-b", args)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        epoch, index = data.split_key(key)
        i, second = self.items[index]
        x = soccernet.read_frames_2fps(self.halves[i], float(second), FRAMES_PER_TOKEN, self.cache)
        with data.sample_seeded(self.seed, epoch, index):
            views = [t(x).transpose(0, 1) for t in self.views]  # each (3, 2, S, S)
        return (*views, index)


def distill_starts(duration: float, window: float, n: int, rng: np.random.Generator) -> list:
    """eztorch's `RandomWindowSoccerNetClipSampler` (COMEDIAN's stage 2): n window starts (s)
    in a half of `duration` s, one per equal segment of [0, D - W], jittered uniformly inside
    it and floored to the 0.5-s grid."""
    room = max(duration - window, 0.0)
    u = rng.random(n)
    return [math.floor((room * (k + u[k]) / n) / soccernet.STEP) * soccernet.STEP for k in range(n)]


def finetune_starts(duration: float, window: float, n: int, rng: np.random.Generator) -> list:
    """eztorch's `UniformWindowWithoutOverlapSoccerNetClipSampler` (COMEDIAN's stage 3): n
    window starts (s): [0, W] and [D - W, D] always, then n - 2 starts on the 0.5-s grid in
    [W/2, D - 3W/2), mutually non-overlapping (uniform over such sets), which may overlap the
    two forced windows (spec §1 Stage 3). Raises cli.InputError when they do not fit."""
    last = math.floor((duration - window) / soccernet.STEP) * soccernet.STEP
    starts = [0.0, max(last, 0.0)][:n]
    k = n - 2
    if k <= 0:
        return starts
    lo = math.ceil(window / 2 / soccernet.STEP)
    hi = math.floor((duration - 1.5 * window) / soccernet.STEP)
    w = round(window / soccernet.STEP)  # a window in grid steps
    free = (hi - lo) - (k - 1) * (w - 1)  # positions left once the gaps are reserved
    if free < k:
        raise cli.InputError(f"{n} windows of {window:g} s per half do not fit a {duration:.1f}"
                             f"-s half without overlap")
    v = np.sort(rng.choice(free, size=k, replace=False))
    return starts + [(lo + int(v[j]) + j * (w - 1)) * soccernet.STEP for j in range(k)]


class TeacherBank:
    """Stage 2's teacher: per-half feature files `{half}_<name>.npy` (T, F), z-scored and
    projected by a PCA fitted on the training halves (spec §1 Stage 2: `pca_features`), read
    lazily (memory-mapped) and projected per window. `pca` = {"mean", "std", "components"}."""

    def __init__(self, root: PathLike, name: str, fps: float, pca: dict):
        self.root, self.name, self.fps, self.pca = Path(root), name, fps, pca

    def window(self, h: soccernet.Half, start: float, tokens: int) -> torch.Tensor:
        """(tokens, P) projected features; token j takes row floor((start + j) x fps), its
        first frame's second (C: floor(frame_idx[2j] / 2); spec §7.11), clamped."""
        feats = np.load(self.root / h.game / f"{h.half}_{self.name}.npy", mmap_mode="r")
        rows = [min(math.floor((start + j) * self.fps + 1e-9), len(feats) - 1)
                for j in range(tokens)]
        x = torch.from_numpy(np.asarray(feats[rows], dtype=np.float64))
        z = (x - self.pca["mean"]) / self.pca["std"]
        return (z @ self.pca["components"]).float()


def pca_sums(paths: Sequence[PathLike], width: int, device="cpu") -> tuple:
    """Streamed float64 sums of the teacher features of `paths` (.npy, (T, width) each, shapes
    checked by the caller), one file at a time on `device`: the row count n (a 0-d tensor),
    the column sums s1 (F,) and the Gram matrix s2 = X^T X (F, F); zeros for no file. The sums
    of disjoint sets of files add up to those of their union, so ranks share the files."""
    n = torch.zeros((), dtype=torch.float64, device=device)
    s1 = torch.zeros(width, dtype=torch.float64, device=device)
    s2 = torch.zeros(width, width, dtype=torch.float64, device=device)
    for p in paths:
        x = torch.from_numpy(np.load(p).astype(np.float64)).to(device)
        n, s1, s2 = n + len(x), s1 + x.sum(0), s2 + x.T @ x
    return n, s1, s2


def pca_from_sums(n: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, dim: int) -> dict:
    """Z-score each dimension, then PCA without whitening (sklearn `PCA(dim)` of
    `pca_features`, solved exactly), from the sums of `pca_sums`: the eigenvectors of the
    correlation matrix. Returns mean (F,), std (F,) and components (F, min(dim, F)),
    ordered by decreasing variance, float64 on the CPU."""
    mean = s1 / n
    cov = s2 / n - torch.outer(mean, mean)
    std = cov.diagonal().clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))  # StandardScaler keeps constants
    values, vectors = torch.linalg.eigh(cov / torch.outer(std, std))  # of the z-scored data
    order = values.argsort(descending=True)[:min(dim, len(mean))]
    return {"mean": mean.cpu(), "std": std.cpu(),
            "components": vectors[:, order].cpu().contiguous()}


def fit_pca(paths: Sequence[PathLike], dim: int, device="cpu") -> dict:
    """The teacher bank's PCA (`pca_from_sums`) of all rows of the `paths` (.npy, (T, F)),
    streamed in float64 on `device`. Under torchrun a collective: rank r sums the files
    paths[r::world], the sums are all-reduced (`dist.all_reduce`, float64), and every rank
    solves the same summed system (on full SoccerNet ~2.4e14 FLOP and 55 GB of reads, shared
    instead of done by rank 0 alone). Every rank checks the files' shapes first, so a bad
    file stops all of them with the same cli.InputError; so does an empty list."""
    shapes = [np.load(p, mmap_mode="r").shape for p in paths]
    for p, shape in zip(paths, shapes):
        if len(shape) != 2 or shape[1] != shapes[0][-1]:
            raise cli.InputError(f"{p}: teacher features must be (T, F) with one F for all "
                                 f"files, got {tuple(shape)}")
    if not paths or not sum(shape[0] for shape in shapes):
        raise cli.InputError("fit_pca: no teacher features to fit")
    sums = pca_sums(paths[dist.rank()::dist.world()], shapes[0][1], device)
    return pca_from_sums(*(dist.all_reduce(t, "sum") for t in sums), dim)


def sample_draws(tokens: int, ratio: float, alpha: float = 0.0) -> tuple:
    """The random draws of a training step that belong to one window, from torch's global
    RNG (a data-loader worker's, seeded from (seed, epoch, index)), so that the step on the
    GPU draws nothing and makes no host-to-device copy of its own: the kept tokens of the
    temporal mask (`temporal_mask`, (K,) int64), the mixup weight lambda ~ Beta(alpha,
    alpha) (1 when alpha = 0) and a uniform key u; the batch's mixup permutation is the
    argsort of its keys (a uniform random permutation, as torch.randperm draws)."""
    keep = temporal_mask(1, tokens, ratio)[0]
    lam = torch.distributions.Beta(alpha, alpha).sample() if alpha > 0 else torch.ones(())
    return keep, lam, torch.rand(())


class Windows(Dataset):
    """Stages 2 and 3: `per_game` windows of `window` s per game and epoch (half from each
    half), re-drawn every epoch from (seed, epoch, half); item = (frames (3, 2W, S, S),
    target, *draws, index) with target the teacher features (W, P) (stage 2, `bank`) or the
    token labels (W, 17) (stage 3), and the window's draws of the step (`sample_draws`, after
    the augmentation's, from the same (seed, epoch, index)): stage 2 the kept tokens (K,) of
    alpha_1, stage 3 those of alpha_2, lambda () and the permutation key u ()."""

    def __init__(self, halves: list, args: Args, kind: str, per_game: int, seed: int,
                 bank: TeacherBank | None = None):
        if per_game % 2:
            raise cli.InputError(f"windows per game must be even (one half each), got {per_game}")
        self.halves, self.args, self.kind, self.seed, self.bank = halves, args, kind, seed, bank
        self.per_half, self.transform = per_game // 2, transform(kind, args)
        self.draw = distill_starts if kind == "distill" else finetune_starts
        self.frame_y = [soccernet.frame_labels(h.annotations, h.half,
                                               math.floor(h.duration * soccernet.FPS))
                        for h in halves] if kind == "finetune" else None
        for h in halves:  # a sampling that cannot work is the user's error, said now
            try:
                self.draw(h.duration, args.window, self.per_half, np.random.default_rng(0))
            except cli.InputError as e:
                raise cli.InputError(f"{h.path} ({h.duration:.1f} s; a truncated video reads "
                                     f"short): {e}: lower --ft-windows") from None

    def __len__(self) -> int:
        return len(self.halves) * self.per_half

    def start(self, epoch: int, index: int) -> float:
        i, k = divmod(index, self.per_half)
        h, rng = self.halves[i], data.sample_np_rng(self.seed, epoch, 10**6 + i)
        return self.draw(h.duration, self.args.window, self.per_half, rng)[k]

    def __getitem__(self, key):
        epoch, index = data.split_key(key)
        h, start = self.halves[index // self.per_half], self.start(epoch, index)
        tokens = int(self.args.window)
        x = soccernet.read_frames_2fps(h, start, tokens * FRAMES_PER_TOKEN, self.args.cache_frames)
        distill = self.kind == "distill"
        with data.sample_seeded(self.seed, epoch, index):
            x = self.transform(x).transpose(0, 1)  # (3, 2W, S, S)
            keep, lam, u = sample_draws(tokens, self.args.mask_ratio if distill else
                                        self.args.ft_mask_ratio,
                                        0.0 if distill else self.args.mixup_alpha)
        if distill:
            return x, self.bank.window(h, start, tokens), keep, index
        first, n = round(start * soccernet.FPS), tokens * FRAMES_PER_TOKEN
        fy = self.frame_y[index // self.per_half][first:first + n]  # (<= 2W, 17), 0 past the end
        fy = F.pad(fy, (0, 0, 0, n - len(fy)))
        return x, soccernet.token_labels(fy, FRAMES_PER_TOKEN), keep, lam, u, index


# ---- 4. Model ----

def _init_weights(module: nn.Module) -> None:
    """timm rules (spec §2): Linear trunc-normal .02 / bias 0, LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _init_patch_embed(patch_embed: vit.TubeletEmbed) -> None:
    """eztorch `PatchEmbed.init_weights` (which timm's ViT init calls): Kaiming-normal fan-in
    weight (ReLU gain), bias 0 (not PyTorch's default uniform bias)."""
    nn.init.kaiming_normal_(patch_embed.proj.weight, mode="fan_in")
    nn.init.zeros_(patch_embed.proj.bias)  # draws nothing: every other initial value is kept


class Transformer(nn.Module):
    """`blocks` (pre-LN timm blocks, qkv bias, MLP x4, drop-path linear 0 -> drop_path) and
    a final `norm` (eps 1e-6): (N, L, D) -> (N, L, D)."""

    def __init__(self, dim: int, depth: int, heads: int, drop_path: float):
        super().__init__()
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(vit.Block(dim, heads, drop_path=r) for r in rates)
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def _tubelets(patch_embed: vit.TubeletEmbed, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, 2K, H, W) -> (B K, N, D): each 2-frame tubelet's patch tokens."""
    t = patch_embed.proj(x)  # (B, D, K, H/p, W/p)
    B, D, K = t.shape[:3]
    return t.permute(0, 2, 3, 4, 1).reshape(B * K, -1, D)


class SpatialViT(nn.Module):
    """Stage 1's trunk: a ViT on one 2-frame tubelet (Conv3d (2, p, p) patch embed), CLS,
    learned pos_embed (1, 1 + N, D), blocks, norm; (B, 3, 2, S, S) -> CLS (B, D). Key names
    are timm's (`blocks.i`, `cls_token`, ...), as eztorch's stage-1 `trunk.*` (spec §8)."""

    def __init__(self, args: Args):
        super().__init__()
        D, n = args.embed_dim, (args.img_size // args.patch_size) ** 2
        self.patch_embed = vit.TubeletEmbed(FRAMES_PER_TOKEN, args.patch_size, 3, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n, D))
        tr = Transformer(D, args.depth, args.num_heads, args.drop_path)
        self.blocks, self.norm = tr.blocks, tr.norm
        _init_weights(self)
        _init_patch_embed(self.patch_embed)
        for p in (self.cls_token, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = _tubelets(self.patch_embed, x)  # (B, N, D) for 2-frame clips
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], 1) + self.pos_embed
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)[:, 0]


class ViViT(nn.Module):
    """ViViT "model 2", the factorised encoder (spec §2, eztorch `trunks/vivit.py`).

    (B, 3, 2T, S, S) frames -> (B, T, D) tokens: each 2-frame tubelet -> spatial ViT (CLS +
    pos_embed, `spatial_transformer`) -> its CLS; in train mode with `mask_ratio` > 0 (or
    given `keep`, (B, K) token indices) only the kept tubelets are encoded and
    `temporal_mask_token` fills the others; + `time_embed` (1, T, D) -> `temporal_transformer`.
    Official parameter names, so released weights load (spec §8)."""

    def __init__(self, args: Args, mask_ratio: float = 0.0):
        super().__init__()
        D, n, T = args.embed_dim, (args.img_size // args.patch_size) ** 2, int(args.window)
        self.num_tokens, self.mask_ratio = T, mask_ratio
        self.patch_embed = vit.TubeletEmbed(FRAMES_PER_TOKEN, args.patch_size, 3, D)
        self.spatial_cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n, D))
        self.time_embed = nn.Parameter(torch.zeros(1, T, D))
        self.temporal_mask_token = nn.Parameter(torch.zeros(1, 1, D))  # zero-init (spec §1)
        self.spatial_transformer = Transformer(D, args.depth, args.num_heads, args.drop_path)
        self.temporal_transformer = Transformer(D, args.temporal_depth, args.temporal_heads,
                                                args.drop_path)
        _init_weights(self)
        _init_patch_embed(self.patch_embed)
        for p in (self.spatial_cls_token, self.pos_embed, self.time_embed):
            nn.init.trunc_normal_(p, std=0.02)

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 2K, S, S) -> the tubelets' CLS tokens (B, K, D)."""
        B = x.shape[0]
        t = _tubelets(self.patch_embed, x)  # (B K, N, D)
        t = torch.cat([self.spatial_cls_token.expand(len(t), -1, -1), t], 1) + self.pos_embed
        return self.spatial_transformer(t)[:, 0].reshape(B, -1, t.shape[-1])

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        B, T = x.shape[0], self.num_tokens
        if x.shape[2] != T * FRAMES_PER_TOKEN:
            raise ValueError(f"ViViT: expected {T * FRAMES_PER_TOKEN} frames, got {x.shape[2]}")
        if keep is None and self.training and self.mask_ratio > 0:  # spec §7.3: train only
            keep = temporal_mask(B, T, self.mask_ratio, device=x.device)  # (training draws
            # it in the loader: `sample_draws`)
        if keep is None:
            h = self.spatial(x)  # (B, T, D)
        else:  # masked tubelets skip the spatial encoder (pitfall 3)
            S = x.shape[-1]
            tubes = x.reshape(B, 3, T, FRAMES_PER_TOKEN, S, S)
            idx = keep[:, None, :, None, None, None].expand(-1, 3, -1, FRAMES_PER_TOKEN, S, S)
            kept = self.spatial(tubes.gather(2, idx).flatten(2, 3))  # (B, K, D)
            D = kept.shape[-1]
            h = torch.scatter(self.temporal_mask_token.expand(B, T, D).to(kept.dtype), 1,
                              keep[..., None].expand(-1, -1, D), kept)
        return self.temporal_transformer(h + self.time_embed)  # (B, T, D)


def mlp(in_dim: int, hidden: int, layers: int, out_dim: int, last_bias: bool = True):
    """eztorch MLP head without BN: (Linear, GELU) x layers, Linear(out_dim)."""
    mods, d = [], in_dim
    for _ in range(layers):
        mods += [nn.Linear(d, hidden), nn.GELU()]
        d = hidden
    mods.append(nn.Linear(d, out_dim, bias=last_bias))
    out = nn.Sequential(*mods)
    _init_weights(out)
    return out


class Queue(nn.Module):
    """A FIFO of L2-normalised keys (M, P) in buffers, random unit vectors at start (the same
    on every rank), fed after the loss with the keys of all ranks."""

    def __init__(self, size: int, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("queue", F.normalize(torch.randn(size, dim, generator=g), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def enqueue(self, keys: torch.Tensor, flag: str) -> None:  # after the loss
        optim.enqueue(self.queue, self.queue_ptr, keys, flag)


class SpatialMoCo(nn.Module):
    """Stage 1 (spec §1): online trunk + projector (D -> h -> h -> 256) + predictor
    (256 -> h -> 256, no last bias); EMA `trunk_m` + `projector_m`; a queue of keys.
    `forward(v1, v2) -> (loss, keys (2B, 256))`: Eq. 6.2 symmetrised, both views in one
    pass ("mutual_pass"), against the queue as it was before the step."""

    def __init__(self, args: Args):
        super().__init__()
        self.args = args
        self.trunk = SpatialViT(args)
        self.projector = mlp(args.embed_dim, args.proj_hidden, 2, args.proj_dim)
        self.predictor = mlp(args.proj_dim, args.proj_hidden, 1, args.proj_dim, last_bias=False)
        self.trunk_m, self.projector_m = copy.deepcopy(self.trunk), copy.deepcopy(self.projector)
        for p in [*self.trunk_m.parameters(), *self.projector_m.parameters()]:
            p.requires_grad = False
        self.memory = Queue(args.queue_size, args.proj_dim, args.seed)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor):
        a, x = self.args, torch.cat([v1, v2])
        q1, q2 = F.normalize(self.predictor(self.projector(self.trunk(x))), dim=1).chunk(2)
        with torch.no_grad():
            k1, k2 = F.normalize(self.projector_m(self.trunk_m(x)), dim=1).chunk(2)
        queue = self.memory.queue.clone()
        loss = (sce_loss(q2, k1, queue, 1.0, a.tau) + sce_loss(q1, k2, queue, 1.0, a.tau)) / 2
        return loss, torch.cat([k1, k2])


class Distiller(nn.Module):
    """Stage 2 (spec §1): ViViT (temporal masking alpha_1 in train mode) + projector
    (D -> h -> h -> P, GELU, no BN) on every token; a queue of teacher features.
    `forward(x, p, keep=None) -> loss`: Eqs. 6.3-6.6 (`sce_token_loss`) on (B, T, P); `keep`
    (B, K): the kept tokens (else the ViViT draws them in train mode)."""

    def __init__(self, args: Args, teacher_dim: int):
        super().__init__()
        self.args = args
        self.trunk = ViViT(args, args.mask_ratio)
        self.projector = mlp(args.embed_dim, args.proj_hidden, 2, teacher_dim)
        self.memory = Queue(args.distill_queue_size, teacher_dim, args.seed)

    def forward(self, x: torch.Tensor, p: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        q = F.normalize(self.projector(self.trunk(x, keep)), dim=-1)  # (B, T, P)
        return sce_token_loss(q, p, self.memory.queue.clone(), self.args.lam, self.args.tau,
                              self.args.tau_m)


class LinearHead(nn.Module):
    """eztorch `LinearHead`: `layers.0` = Linear(D, 17), weight N(0, 0.01), bias 0."""

    def __init__(self, dim: int, num_classes: int = soccernet.NUM_CLASSES):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, num_classes))
        nn.init.normal_(self.layers[0].weight, std=0.01)
        nn.init.zeros_(self.layers[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Spotter(nn.Module):
    """Stage 3 (spec §1): ViViT (alpha_2 masking in train mode) + one linear classifier per
    token: (B, 3, 2T, S, S) (and optionally the kept tokens (B, K)) -> logits (B, T, 17)."""

    def __init__(self, args: Args):
        super().__init__()
        self.trunk = ViViT(args, args.ft_mask_ratio)
        self.head_class = LinearHead(args.embed_dim)
        if args.head_prior > 0:  # deviation, off by default (see --head-prior)
            nn.init.constant_(self.head_class.layers[0].bias,
                              math.log(args.head_prior / (1 - args.head_prior)))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return self.head_class(self.trunk(x, keep))


def build_model(args: Args, stage: str = "finetune", teacher_dim: int = 512) -> nn.Module:
    """The model of a stage: SpatialMoCo (spatial), Distiller (distill), Spotter (else)."""
    if stage == "spatial":
        return SpatialMoCo(args)
    if stage == "distill":
        return Distiller(args, teacher_dim)
    return Spotter(args)


def vivit_from_spatial(sd: dict, temporal_depth: int) -> dict:
    """Stage-1 trunk keys -> ViViT keys (`init_from_torch_vit`, copy_strategy "repeat"; spec
    §2): blocks.i -> spatial_transformer.blocks.i, and blocks i < temporal_depth also ->
    temporal_transformer.blocks.i; norm -> both final norms; cls_token -> spatial_cls_token;
    pos_embed and patch_embed as they are (a 2-D patch kernel is repeated over the 2 frames
    and halved). time_embed and the mask token are not set (fresh, and 0)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            out["spatial_transformer." + k] = v
            if i < temporal_depth:
                out["temporal_transformer." + k] = v.clone()
        elif k.startswith("norm."):
            out["spatial_transformer." + k] = v
            out["temporal_transformer." + k] = v.clone()
        elif k == "cls_token":
            out["spatial_cls_token"] = v
        elif k == "patch_embed.proj.weight" and v.dim() == 4:
            out[k] = v[:, :, None].repeat(1, 1, FRAMES_PER_TOKEN, 1, 1) / FRAMES_PER_TOKEN
        else:
            out[k] = v
    return out


# Where eztorch's files hold a trunk (spec §8), longer prefixes first: stages 2 and 3 wrap the
# ViViT in a `TransformerTokenHandlerModel` (`trunk.transformer.*`); a trunk inside a head
# model is `trunk.model.*`; stage 1's SCE model holds the bare ViT (`trunk.*`) next to its EMA
# copy (`momentum_trunk.*`, never a starting point); `run/extract_trunk_from_checkpoint.py`
# (pattern "trunk.") leaves `transformer.*` of a stage-2/3 file and bare keys of a stage-1 one.
# Our own files hold `trunk.*` (their EMA copy is `trunk_m.*`).
TRUNK_PREFIXES = ("trunk.transformer.", "trunk.model.", "trunk.", "transformer.")
IGNORED_PREFIXES = ("momentum_trunk.",)


def load_trunk(path: str, args: Args, what: str = "ViViT") -> dict:
    """The ViViT state dict a stage starts from, from a file in any layout of
    `TRUNK_PREFIXES` (`checkpoint.read_weights`: ours or a Lightning file): a stage-1 ViT (our
    spatial.pt, eztorch's SCE `trunk.*`) is mapped by `vivit_from_spatial`; a ViViT (stage 2
    or 3: ours `trunk.*`, eztorch `trunk.transformer.*`, `trunk.model.*`, an extracted
    `transformer.*`) is taken as it is. Raises CheckpointError (one line, naming the key
    prefixes of the file) when no layout holds a ViT or ViViT."""
    full = checkpoint.read_weights(path)
    sd, _ = checkpoint.strip_prefix(full, TRUNK_PREFIXES, IGNORED_PREFIXES)
    if "blocks.0.attn.qkv.weight" in sd:  # a stage-1 ViT
        return vivit_from_spatial(sd, args.temporal_depth)
    if not any(k.startswith(("spatial_transformer.", "temporal_transformer.")) for k in sd):
        raise checkpoint.layout_error(path, what, f"keys under {', '.join(TRUNK_PREFIXES)} or "
                                      f"bare ViViT / ViT keys; {IGNORED_PREFIXES[0]}* ignored",
                                      full)
    return sd


def load_spotter(model: nn.Module, path: str) -> str:
    """Load a fine-tuned spotter (trunk and `head_class.*`) into `model` (a `Spotter`) from
    ours (finetune.pt) or a released eztorch file (Lightning `state_dict`, trunk under
    `trunk.transformer.`, `trunk.model.` or `trunk.`), strictly. Returns its fingerprint.
    Raises CheckpointError (one line) when the file holds no such weights."""
    full = checkpoint.read_weights(path)
    trunk, prefix = checkpoint.strip_prefix(full, TRUNK_PREFIXES[:3], IGNORED_PREFIXES)
    head = {k: v for k, v in full.items() if k.startswith("head_class.")}
    if not prefix or not head:
        raise checkpoint.layout_error(path, "fine-tuned spotter", f"a trunk under "
                                      f"{', '.join(TRUNK_PREFIXES[:3])} and head_class.*", full)
    sd = {**{"trunk." + k: v for k, v in trunk.items()}, **head}
    checkpoint.load_model(model, sd, what=path)
    return checkpoint.fingerprint(sd)


# ---- 5. Losses and masking ----

def sce_token_loss(q: torch.Tensor, p: torch.Tensor, queue: torch.Tensor, lam: float = 0.5,
                   tau: float = 0.1, tau_m: float = 0.05) -> torch.Tensor:
    """Token-level SCE loss of stage 2 (thesis Eqs. 6.3-6.6; eztorch `compute_sce_token_loss`
    with use_keys, keep_aligned_positive, positive_radius 0; spec §1 Stage 2), in fp32.

    q: (B, T, D) L2-normalised online token projections; p: (B, T, D) L2-normalised teacher
    features of the same tokens; queue: (M, D) teacher features of earlier steps. For token i
    of clip b the candidates are the T teacher features of its own clip and the queue; the
    tokens of the batch's other clips are left out (they enter only through the queue).
    Online: s1 = softmax([q_bi . p_bj]_j ++ [q_bi . Q_k]_k / tau). Target: s2 = softmax over
    the same candidates of [p_bi . p_bj]_(j != i) ++ [p_bi . Q_k] / tau_m with the self entry
    masked; w = lam onehot(i) + (1 - lam) s2; loss = -mean over (b, i) of sum w log s1.
    Returns a scalar. Raises ValueError when q and p differ in shape."""
    if q.shape != p.shape or q.dim() != 3:
        raise ValueError(f"sce_token_loss: q {tuple(q.shape)} and p {tuple(p.shape)} must both "
                         f"be (B, T, D)")
    with torch.autocast(q.device.type, enabled=False):
        q, p, queue = q.float(), p.float(), queue.float()
        T = q.shape[1]
        own_q = q @ p.transpose(1, 2)  # (B, T, T): q_bi . p_bj, same clip only
        own_p = (p @ p.transpose(1, 2)).masked_fill(  # (B, T, T), self masked (Eq. 6.4)
            torch.eye(T, dtype=torch.bool, device=q.device), -torch.inf)
        logits_q = torch.cat([own_q, q @ queue.T], -1) / tau  # Eq. 6.5: s1
        logits_k = torch.cat([own_p, p @ queue.T], -1) / tau_m  # Eq. 6.4: s2
        w = (1 - lam) * logits_k.softmax(-1)  # Eq. 6.3: w = lam onehot(i) + (1 - lam) s2
        w[..., :T] += lam * torch.eye(T, device=q.device)
        return -(w * logits_q.log_softmax(-1)).sum(-1).mean()  # Eq. 6.6


def temporal_mask(batch: int, tokens: int, ratio: float,
                  generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Stage 2's temporal masking (spec §1 Stage 2): whole tubelets (2 frames = 1 token) are
    dropped before the spatial encoder, floor(ratio x 2 tokens) frames, i.e. the same number
    n = floor(ratio x 2 tokens) // 2 of tokens for every clip, chosen at random (not
    contiguous) per clip. Returns the sorted indices of the kept tokens, (batch, tokens - n)
    int64 on `device`, in temporal order (the mask token fills the others before the time
    embedding). Fixed sizes: no host sync on a GPU."""
    if not 0 <= ratio < 1:
        raise ValueError(f"temporal_mask: ratio must be in [0, 1), got {ratio}")
    n_drop = math.floor(ratio * tokens * FRAMES_PER_TOKEN) // FRAMES_PER_TOKEN
    order = torch.rand(batch, tokens, generator=generator, device=device).argsort(1)
    return order[:, n_drop:].sort(1).values


def sce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, lam: float = 1.0,
             tau: float = 0.1, tau_m: float = 0.05) -> torch.Tensor:
    """Stage 1's loss: SCE on clips (Eqs. 4.5-4.10) with the code's lambda = 1, i.e. MoCo's
    InfoNCE (thesis Eqs. 6.1-6.2): CE([q . k, q . Q] / tau, 0); negatives only from the
    queue (`use_keys=False`). q, k: (B, D) L2-normalised; queue (M, D). In fp32."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()
        pos = (q * k).sum(1, keepdim=True)  # (B, 1)
        logits_q = torch.cat([pos, q @ queue.T], 1) / tau  # Eq. 6.2
        w = (1 - lam) * torch.cat([torch.zeros_like(pos), k @ queue.T], 1).div(tau_m).softmax(1)
        w[:, 0] += lam  # lambda = 1: the one-hot target of InfoNCE
        return -(w * logits_q.log_softmax(1)).sum(1).mean()


def mixup(x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> tuple:
    """Stage 3's mixup (spec §1, pitfall 10) with its draws given: lambda_b ~ Beta(alpha,
    alpha) per window (B,) and one permutation of the batch (B,) int64 (`sample_draws`);
    x (B, ...) -> lambda x + (1 - lambda) x[perm]. Returns (mixed x, y[perm])."""
    shape = (len(x),) + (1,) * (x.dim() - 1)
    lam = lam.to(x.dtype).view(shape)
    return lam * x + (1 - lam) * x.index_select(0, perm), y.index_select(0, perm)


def mixup_bce(logits: torch.Tensor, y: torch.Tensor, y_perm: torch.Tensor,
              lam: torch.Tensor) -> torch.Tensor:
    """sum_b lam_b BCE(logits_b, y_b) / N + sum_b (1 - lam_b) BCE(logits_b, y_perm_b) / N
    with N = B T C, the non-ignored count (thesis Eq. 6.7 with the code's full BCE; spec §7.10);
    = BCE against the mixed soft labels. logits, y: (B, T, C). In fp32."""
    with torch.autocast(logits.device.type, enabled=False):
        z = logits.float()

        def per_window(t):
            return F.binary_cross_entropy_with_logits(z, t.float(), reduction="none").flatten(1)\
                .sum(1)
        return (lam * per_window(y) + (1 - lam) * per_window(y_perm)).sum() / z.numel()


# ---- 6. Training step ----
def train_step(stage: str, model: nn.Module, batch: tuple, optimizer, amp: optim.Amp,
               args: Args, momentum: float = 1.0) -> dict:
    """One optimiser step of a stage (spec §1 pseudo-code), AMP forward, loss, backward,
    clipping at args.clip_grad, step; a non-finite loss raises before the update.
    spatial: batch (v1, v2), then the EMA (momentum) and the queue (both views' keys);
    distill: (x, p, keep) with p the (B, T, P) teacher features, L2-normalised here, then the
    queue (all of p); finetune: (x, y, keep, lam, u) token labels, mixup (lambda (B,), the
    permutation argsort(u)), BCE. `keep` (B, K), the kept tokens, masks the ViViT when it is
    in train mode with a mask ratio (phase A's trunk is in eval mode: no mask). Every random
    draw but drop-path's comes with the batch (`sample_draws`): the step makes one host sync,
    the non-finite check."""
    net = checkpoint.unwrap(model)
    masked = stage != "spatial" and net.trunk.training and net.trunk.mask_ratio > 0
    if stage == "spatial":
        with amp.autocast():
            loss, keys = model(*batch)
        amp.step(loss, optimizer, args.clip_grad)
        optim.ema_update(net.trunk_m, net.trunk, momentum, copy_buffers=False)
        optim.ema_update(net.projector_m, net.projector, momentum, copy_buffers=False)
        net.memory.enqueue(keys, "--queue-size")
    elif stage == "distill":
        x, p, keep = batch
        p = F.normalize(p.float(), dim=-1)
        with amp.autocast():
            loss = model(x, p, keep if masked else None)
        amp.step(loss, optimizer, args.clip_grad)
        net.memory.enqueue(p.flatten(0, 1), "--distill-queue-size")
    elif stage == "finetune":
        x, y, keep, lam, u = batch
        x, y_perm = mixup(x, y, lam, u.argsort()) if args.mixup_alpha > 0 else (x, y)
        with amp.autocast():
            logits = model(x, keep if masked else None)
        loss = mixup_bce(logits, y, y_perm, lam)
        amp.step(loss, optimizer, args.clip_grad)
    else:
        raise ValueError(f"train_step: unknown stage {stage!r}")
    return {"loss": loss.detach()}


# ---- 7. Evaluation ----
# Spotting is the benchmark's protocol (common/soccernet.py, spec §1 "Inference"): 64-s windows
# -> per-token probabilities -> edge removal -> max merge on the 0.5-s grid -> per-class NMS ->
# results_spotting.json, then the official metric (spec §5). The model enters as `score`.

def spot(model: nn.Module, root: Path, args: Args, device, amp: optim.Amp,
         predictions_root: Path) -> tuple:
    """Spot every game of --eval-split with `model` (None: uniform random scores, the floor;
    `soccernet.spot`: games shared out across ranks, each predicted once;
    `<predictions_root>/<game>/results_spotting.json`), windows resized and normalised only,
    sigmoid of the per-token logits; scored on rank 0 (tight, loose and --metric, in %; --metric
    also visible, unshown and the mean over the classes present in the split). Returns
    (metrics dict, {(game, half): buffer} of this rank)."""
    tf = transform("eval", args)

    def score(frames: torch.Tensor) -> torch.Tensor:  # (b, 2W, 3, H, W) uint8 -> (b, W, 17)
        x = torch.stack([tf(f).transpose(0, 1) for f in frames]).to(device)
        if model is None:  # the metric's floor: uniform random scores
            return torch.rand(len(x), x.shape[2] // FRAMES_PER_TOKEN, soccernet.NUM_CLASSES)
        with amp.autocast():
            return model(x).float().sigmoid()

    games = soccernet.read_split(root, args.eval_split)
    if model is not None:
        model.eval()
    results, buffers = soccernet.spot(
        score, root, games, predictions_root, dict.fromkeys([args.metric, "tight", "loose"]),
        args.video_name, args.window, args.ft_batch_size, args.remove_s, args.official_end,
        args.merge, args.nms, args.nms_window, args.nms_threshold, args.cache_frames)
    metrics = {}
    for m, res in results.items():
        metrics[f"{m}_a_mAP"] = 100 * res["a_mAP"]
        if m == args.metric:  # and its variants
            for name, key in (("visible",) * 2, ("unshown",) * 2, ("present_classes", "present")):
                metrics[f"{m}_a_mAP_{name}"] = 100 * res[f"a_mAP_{key}"]
    return metrics, buffers


@torch.no_grad()
def pretext_losses(root: Path, args: Args, device, amp: optim.Amp, spatial: nn.Module,
                   distiller: nn.Module, bank: TeacherBank) -> dict:
    """Level 1 (the stages' own objectives on held-out data, the --eval-split halves; fixed
    draws). Stage 1: InfoNCE (lambda = 1) of each held-out 1-s clip's online prediction of
    view 2 against the EMA keys of view 1 of every held-out clip, its own the positive
    (log N for a trunk that tells no clip apart). Stage 2: `sce_token_loss` of the held-out
    windows (eval mode, no masking) with the teacher features of the other windows as the
    queue. Returns {"spatial_heldout_loss", "heldout_clips" (not without `spatial`),
    "distill_heldout_loss"}."""
    halves, qs, ks, out = split_halves(root, [args.eval_split], args), [], [], {}
    for view1, view2, _ in DataLoader(SpatialClips(halves, args, args.seed),
                                      args.spatial_batch_size, num_workers=args.num_workers
                                      ) if spatial else []:
        with amp.autocast():
            qs.append(spatial.eval().predictor(spatial.projector(spatial.trunk(view2.to(device)))))
            ks.append(spatial.projector_m(spatial.trunk_m(view1.to(device))))
    if spatial:
        q, k = (F.normalize(torch.cat(z).float(), dim=1) for z in (qs, ks))
        out = {"spatial_heldout_loss": F.cross_entropy(q @ k.T / args.tau, torch.arange(
            len(q), device=q.device)).item(), "heldout_clips": len(q)}
    distiller.eval()
    ds = Windows(halves, args, "distill", args.distill_windows, args.seed, bank)
    xs, ps = zip(*[ds[i][:2] for i in range(len(ds))])
    p = F.normalize(torch.stack(ps).to(device).float(), dim=-1)  # (N, T, P)
    losses = []
    for b, x in enumerate(xs):
        with amp.autocast():
            qb = F.normalize(distiller.projector(distiller.trunk(x[None].to(device))).float(),
                             dim=-1)
        others = torch.cat([p[:b], p[b + 1:]]).flatten(0, 1)  # the other windows: the queue
        losses.append(sce_token_loss(qb, p[b:b + 1], others, args.lam, args.tau, args.tau_m))
    out["distill_heldout_loss"] = torch.stack(losses).mean().item()
    return out


# ---- 8. Main ----
Phase = collections.namedtuple("Phase", "stage batch epochs base_lr warmup final ckpt")


def phases(args: Args) -> dict:
    """The training loops of thesis Fig. 6.2 in order (spec §1, §4): stage 1, stage 2, and
    stage 3's phase A ("head": the classifier alone) and phase B ("finetune": everything),
    each a `Phase`: the `train_step` stage it runs, its batch per GPU, epochs, lr per 256
    samples, warmup epochs, final lr / peak lr, and checkpoint file."""
    a, ft = args, ("finetune", args.ft_batch_size)
    return {"spatial": Phase("spatial", a.spatial_batch_size, a.spatial_epochs,
                             a.spatial_base_lr, a.spatial_warmup_epochs, 0.0, "spatial.pt"),
            "distill": Phase("distill", a.distill_batch_size, a.distill_epochs,
                             a.distill_base_lr, a.distill_warmup_epochs, a.final_lr_ratio,
                             "distill.pt"),
            "head": Phase(*ft, a.head_epochs, a.head_base_lr, 0, a.final_lr_ratio, "head.pt"),
            "finetune": Phase(*ft, a.ft_epochs, a.ft_base_lr, 0, a.final_lr_ratio,
                              "finetune.pt")}


def optimizer_for(model: nn.Module, args: Args, fused: bool | None = None):
    """AdamW (0.9, 0.999), wd on weights only (spec §4, pitfall 7); fused on CUDA (None),
    or as `fused` says (a test counts the host syncs of the CUDA optimiser on the CPU)."""
    groups = optim.param_groups(model, args.weight_decay)
    fused = next(model.parameters()).is_cuda if fused is None else fused
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8, fused=fused)


def loop_optimizer(name: str, model: nn.Module, args: Args, fused: bool | None = None):
    """The AdamW of loop `name` of `phases` and its `before_step` (or None). Phase A ("head")
    freezes the `Spotter`'s trunk (no gradient; before_step, the trunk's `eval`, runs before
    every step: no masking, no drop-path) and trains the head alone; phase B ("finetune")
    trains everything."""
    if name in ("head", "finetune"):
        model.trunk.requires_grad_(name == "finetune")
    head = name == "head"
    return optimizer_for(model.head_class if head else model, args, fused), \
        model.trunk.eval if head else None


def wrap(model: nn.Module, args: Args) -> nn.Module:
    """torch.compile (--compile) and DDP; without masking the mask token takes no gradient,
    which DDP must be told."""
    if args.compile:
        model.compile()
    if not dist.is_dist():
        return model
    unused = any(isinstance(m, ViViT) and m.mask_ratio == 0 and m.temporal_mask_token.requires_grad
                 for m in model.modules())
    return nn.parallel.DistributedDataParallel(model, find_unused_parameters=unused)


def run_loop(name: str, model: nn.Module, ds: Dataset, args: Args, device, amp: optim.Amp,
             logger: log.Logger, source: str) -> int:
    """Loop `name` of `phases` on `ds`, keyed by its global step, checkpointed in
    <output-dir>/<ckpt>: its optimiser (`loop_optimizer`), the model wrapped (`wrap`),
    lr = base x B_global / 256 (spec §4), linear warmup from final x peak, cosine to
    final x peak, per step; stage 1's EMA momentum cosine from ema_m0 to 1. Returns the
    loop's step."""
    stage, batch, epochs, base_lr, warmup_epochs, final, ckpt = phases(args)[name]
    opt, before_step = loop_optimizer(name, model, args)
    net = wrap(model, args)
    loop = training.Loop(data.make_loader(ds, batch, True, args.seed, args.num_workers), epochs,
                         {"model": model, "optimizer": opt}, args, logger, amp,
                         max_steps=args.max_steps, ckpt_name=ckpt, source=source,
                         desc=f"{stage} epoch", prefix=ckpt.removesuffix(".pt"), resume_flag=None)
    peak = base_lr * batch * dist.world() / 256
    warmup = min(round(warmup_epochs * loop.steps_per_epoch), loop.total_steps)
    dist.print0(f"{stage} ({ckpt}): {len(ds)} samples, {loop.steps_per_epoch} steps/epoch, "
                f"{loop.total_steps} steps, global batch {batch * dist.world()}, peak lr "
                f"{peak:.3g}, amp {amp.mode}")
    explicit = args.resume if args.stage == stage else ""
    if stage == "finetune" and (os.path.basename(explicit) == "head.pt") != (name == "head"):
        explicit = ""  # the other phase's file: this phase resumes from <output-dir> itself
    loop.resume(explicit)
    for *xs, _ in loop:
        lr = optim.cosine_schedule(loop.step, loop.total_steps, peak, warmup, final * peak,
                                   final * peak)
        optim.set_lr_wd(opt, lr)
        m = optim.cosine_schedule(loop.step, max(loop.total_steps - 1, 1), args.ema_m0,
                                  final=1.0)  # stage 1's EMA momentum 0.99 -> 1
        out = loop_step(stage, net, [x.to(device, non_blocking=True) for x in xs], opt, amp,
                        args, m, before_step)
        loop.end_step(out, {f"{loop.prefix}/lr": lr})
    loop.check_replicas(model)
    return loop.step


def loop_step(stage: str, net: nn.Module, batch: list, opt, amp: optim.Amp, args: Args,
              momentum: float, before_step=None) -> dict:
    """A step as the loops run it (and --bench times it): train mode, then `before_step`
    (phase A: the trunk back in eval mode), then `train_step`."""
    net.train()
    if before_step:
        before_step()
    return train_step(stage, net, batch, opt, amp, args, momentum)


def initial_trunk(path: str, what: str, args: Args, trunk: nn.Module) -> str:
    """Load the ViViT weights a stage starts from into `trunk` (nothing for "random") and
    return their fingerprint. Only `time_embed` and `temporal_mask_token` may be missing (a
    stage-1 file has neither); any other missing or unexpected key, or a file in no known
    layout (`load_trunk`), is a one-line CheckpointError."""
    if path == "random":
        return "random"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no {what} weights (run that stage into this "
                                f"--output-dir, or give --init-from)")
    sd = load_trunk(path, args, f"{what} ViViT")
    missing, unexpected = checkpoint.load_model(trunk, sd, strict=False, what=path)
    missing = [k for k in missing if k not in ("time_embed", "temporal_mask_token")]
    if missing or unexpected:
        raise checkpoint.CheckpointError(
            f"{path}: not {what} ViViT weights: missing {missing[:4]}, unexpected "
            f"{unexpected[:4]} ({len(missing)} / {len(unexpected)} keys)")
    return checkpoint.fingerprint(sd)


# what each stage starts from: (the weights' name, the previous stage's file in --output-dir)
STARTS = {"distill": ("stage-1", "spatial.pt"), "finetune": ("stage-2", "distill.pt"),
          "spot": ("stage-3", "finetune.pt")}


def start_file(stage: str, args: Args) -> str:
    """--init-from when `stage` is the one asked for (or, under --stage all, for distill:
    stage 1 is then skipped), else <output-dir>/<the previous stage's file> (`STARTS`)."""
    if args.init_from and (args.stage == stage or args.stage == "all" and stage == "distill"):
        return args.init_from
    return os.path.join(args.output_dir, STARTS[stage][1])


def train_stage(stage: str, root: Path, args: Args, device, amp: optim.Amp,
                logger: log.Logger, init: str = "random", after=None) -> tuple:
    """Stage 1, 2 or 3 on the --train-splits halves: its data (1-s clips; windows with the
    teacher bank's features; labelled windows), its model started from `init` (a file of
    `STARTS`, or "random"; stage 1 always starts at random), and its loop(s) of `phases`
    (stage 3: phase A, then phase B), checkpoints in --output-dir; `after(name, model)` after
    each loop. Returns (model, steps)."""
    halves = split_halves(root, args.train_splits, args)
    if stage == "spatial":
        ds, model = SpatialClips(halves, args, args.seed), build_model(args, stage)
    else:
        bank = teacher_bank(root, halves, args, device) if stage == "distill" else None
        ds = Windows(halves, args, stage, args.distill_windows if bank else args.ft_windows,
                     args.seed, bank)
        model = build_model(args, stage, bank.pca["components"].shape[1] if bank else 512)
    ds = data.SafeDataset(ds, args.max_fail_fraction, "1-s clips" if stage == "spatial" else
                          "windows")
    model = model.to(device)
    source = "random" if stage == "spatial" else initial_trunk(init, STARTS[stage][0], args,
                                                               model.trunk)
    steps = 0
    for name in ("head", "finetune") if stage == "finetune" else (stage,):
        steps += run_loop(name, model, ds, args, device, amp, logger, source)
        if after:
            after(name, model)
    return model, steps


def teacher_root(root: Path, args: Args) -> Path:
    """--teacher-dir; else <output-dir>/teacher for the stage-1 teacher ("stage1", written by
    stage `features`), else the data root (SoccerNet's own feature files)."""
    if args.teacher_dir:
        return Path(args.teacher_dir)
    return Path(args.output_dir) / "teacher" if args.teacher_name == "stage1" else root


def teacher_paths(root: Path, halves: list, args: Args) -> list:
    """The teacher-bank file of each half, checked: present, (T, F) with one F for all, at
    least floor(D x fps) - 1 rows. Raises FileNotFoundError / cli.InputError naming it."""
    bank, paths, dims = teacher_root(root, args), [], set()
    for h in halves:
        paths.append(p := bank / h.game / f"{h.half}_{args.teacher_name}.npy")
        if not p.is_file():
            raise FileNotFoundError(f"{p}: teacher features missing (--teacher-dir, "
                                    f"--teacher-name, or run --stage features)")
        shape = np.load(p, mmap_mode="r").shape
        if len(shape) != 2 or shape[0] < math.floor(h.duration * args.teacher_fps) - 1:
            raise cli.InputError(f"{p}: teacher features {shape} do not cover the "
                                 f"{h.duration:.1f}-s half at {args.teacher_fps:g} rows/s")
        dims.add(shape[1])
    if len(dims) > 1:
        raise cli.InputError(f"teacher features under {bank} differ in width: {sorted(dims)}")
    return paths


def teacher_bank(root: Path, halves: list, args: Args, device) -> TeacherBank:
    """Stage 2's `TeacherBank` of `halves` (`teacher_paths`), its PCA (`fit_pca`, all ranks)
    cached in <output-dir>/teacher_pca.pt with the list of files it is of, refitted when
    that changes."""
    paths, pca_path = teacher_paths(root, halves, args), os.path.join(args.output_dir,
                                                                       "teacher_pca.pt")
    files = [str(p) for p in paths] + [f"pca_dim={args.pca_dim}"]  # what the PCA is of
    stale = dist.is_main() and (not os.path.isfile(pca_path) or
                                checkpoint.load(pca_path).get("files") != files)
    if dist.all_reduce(torch.tensor(float(stale), device=device), "sum").item():  # rank 0's
        dist.print0(f"teacher-bank PCA of {len(paths)} files, shared by {dist.world()} "
                    f"process(es)")
        checkpoint.save(pca_path, {**fit_pca(paths, args.pca_dim, device), "files": files})
    dist.barrier()  # every rank then reads rank 0's file: the same PCA everywhere
    return TeacherBank(teacher_root(root, args), args.teacher_name, args.teacher_fps,
                       checkpoint.load(pca_path))


@torch.no_grad()
def stage_features(root: Path, args: Args, device, amp) -> None:
    """A teacher bank for data that has none (the demo): the stage-1 EMA trunk's CLS of every
    1-s clip of every half, `<teacher_root>/<game>/{half}_<teacher_name>.npy` (floor(D), D)
    at 1 fps (like the thesis' SCE-R3D50 teacher: self-supervised, spec §6 "Teacher bank")."""
    path, out = os.path.join(args.output_dir, "spatial.pt"), teacher_root(root, args)
    model = build_model(args, "spatial")
    checkpoint.load_model(model, checkpoint.load(path)["model"], what=path)
    trunk = model.trunk_m.to(device).eval()
    games = [g for s in (*args.train_splits, args.eval_split)
             for g in soccernet.read_split(root, s)]
    halves = soccernet.read_halves(root, list(dict.fromkeys(games)),
                                   args.video_name)[dist.rank()::dist.world()]
    for h in halves:
        ds = SpatialClips([h], args, args.seed, single=True)
        feats = []
        for x, _ in DataLoader(ds, args.spatial_batch_size, num_workers=args.num_workers):
            with amp.autocast():
                feats.append(trunk(x.to(device)).float().cpu())
        target = out / h.game / f"{h.half}_{args.teacher_name}.npy"
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, torch.cat(feats).numpy())
    dist.barrier()


def check_inputs(root: Path, args: Args, stages: list) -> None:
    """Refuse, before any training, what a later stage would refuse hours later: the split
    lists, games, labels and videos, the window counts per half, the queue sizes, and the
    teacher bank (every training half's file, (T, F) with one F, at least floor(D x fps) - 1
    rows). Raises cli.InputError / FileNotFoundError naming the file or the flag."""
    train = split_halves(root, args.train_splits, args)
    if "spot" in stages:
        split_halves(root, [args.eval_split], args)
    T, world = int(args.window), dist.world()
    for stage, n in (("distill", args.distill_windows), ("finetune", args.ft_windows)):
        if stage in stages:  # the datasets check their window counts when built
            Windows(train, args, stage, n, args.seed)
    for stage, size, keys, flag in (
            ("spatial", args.queue_size, 2 * args.spatial_batch_size * world, "--queue-size"),
            ("distill", args.distill_queue_size, args.distill_batch_size * world * T,
             "--distill-queue-size")):
        if stage in stages and size % keys:
            raise cli.InputError(f"{flag} {size} must be a multiple of the keys enqueued per "
                                 f"step ({keys})")
    if "distill" in stages and args.teacher_name != "stage1":
        teacher_paths(root, train, args)


def main(args: Args) -> dict:
    """Thesis Fig. 6.2 for --stage (all: each in turn, each from the previous one's file):
    stage 1, a stage-1 teacher bank where the data has none, stage 2, stage 3, spotting; with
    --eval-random-init spotting after phase A too, the same stage 3 from random trunks, uniform
    random scores, (all) the pretext losses. Prints the tables and verdicts, writes
    summary.json (rank 0) and returns it."""
    if args.eval_random_init and args.random_init_seeds < 1:
        raise cli.InputError("--eval-random-init needs --random-init-seeds >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = dist.init(args.device)
    amp = optim.Amp(args.amp, device)
    args.output_dir = args.output_dir or time.strftime("runs/comedian-%Y%m%d-%H%M%S")
    if not args.data and args.preset == "demo":
        dist.print0("no --data: running the demo preset on the embedded synthetic SoccerNet set")
    dist.seed_all(args.seed, per_rank=False)
    if dist.is_main():
        cli.save_args(args, args.output_dir)
    logger = log.Logger(args.output_dir)
    if args.bench:
        out = bench(args, device, amp)
        dist.cleanup()
        return out
    root, out = data_root(args), Path(args.output_dir)
    t0, steps, results, buffers, model = time.time(), 0, {}, {}, None
    stages = [args.stage] if args.stage != "all" else [  # Fig. 6.2
        *(["spatial"] if not args.init_from else []),  # else stage 2 starts from --init-from
        *(["features"] if args.teacher_name == "stage1" else []),  # else the data's bank
        "distill", "finetune", "spot"]
    check_inputs(root, args, stages)

    def scored(col: str, where: Path):  # spot after phase A (classifier only, "C") and B
        def after(name: str, model: nn.Module) -> None:
            if "spot" in stages and {"head": args.head_epochs and args.eval_random_init,
                                     "finetune": True}.get(name):
                res, buf = spot(model, root, args, device, amp, where / (
                    "predictions" if name == "finetune" else "predictions_classifier"))
                results.setdefault(col, {}).update(
                    {("" if name == "finetune" else "classifier_") + k: v for k, v in res.items()})
                buffers.setdefault(col, buf)  # the timeline shows the first phase
        return after
    for stage in stages:
        if stage == "features":
            stage_features(root, args, device, amp)
        elif stage != "spot":
            steps += train_stage(stage, root, args, device, amp, logger, start_file(stage, args)
                                 if stage in STARTS else "random", scored("trained", out))[1]
    if "spot" in stages and "finetune" not in stages:
        model = build_model(args).to(device)
        load_spotter(model, start_file("spot", args))
        results["trained"], buffers["trained"] = spot(model, root, args, device, amp,
                                                      out / "predictions")
    for i in range(args.random_init_seeds if args.eval_random_init and "spot" in stages else 0):
        col = "random_init" + (f"_{i}" if i else "")  # the same stage 3 from random trunks
        dist.print0(f"baseline: the same stage 3 from random trunk {i}, into {out / col}")
        torch.manual_seed(args.seed + i)
        steps += train_stage("finetune", root, dataclasses.replace(
            args, output_dir=str(out / col)), device, amp, logger, after=scored(col, out / col))[1]
    floor = []
    for i in range(3 if args.eval_random_init and "spot" in stages else 0):
        torch.manual_seed(i)  # the floor: uniform random scores, 3 draws
        floor.append(spot(None, root, args, device, amp, out / "floor")[0][f"{args.metric}_a_mAP"])
    if args.eval_random_init and args.stage == "all" and dist.is_main():
        for name, res in level1(root, args, device, amp).items():
            results[name] = {**res, **results.get(name, {})}
    summary = {"method": "comedian", "data": args.data or "synthetic-soccernet",
               "preset": args.preset, "steps": steps, "seconds": round(time.time() - t0, 1),
               "metrics": {}}
    if floor:
        summary["random_scores"] = {f"{args.metric}_a_mAP": [round(f, 3) for f in floor]}
    if results and dist.is_main():
        report(summary, results, buffers, root, out, args)
    dist.cleanup()
    return summary


def report(summary: dict, results: dict, buffers: dict, root: Path, out: Path,
           args: Args) -> None:
    """Rank 0: fill summary["metrics"] ({name: {column: value}}) from `results` ({column:
    {name: value}}, columns random_init and trained), print the level-1 and level-2
    tables, draw timeline.png of the first half spotted, write summary.json."""
    cols = [c for c in ("random_init", "trained") if c in results]
    n_clips = [results[c].pop("heldout_clips", None) for c in cols][-1]
    summary["metrics"] = {n: {c: round(results[c].get(n, math.nan), 3) for c in cols}
                          for n in results["trained"]}
    if n_clips:
        summary["chance"] = {"spatial_heldout_loss": round(math.log(n_clips), 3)}
    for level, title in ((1, "held-out pretext losses (level 1" + (
                              f"; stage 1 at chance: log {n_clips} = {math.log(n_clips):.2f})"
                              if n_clips else ")")),
                         (2, f"spotting on {args.eval_split!r} (level 2; a-mAP in %, 17 "
                             f"classes unless said)")):
        names = [n for n in summary["metrics"] if ("loss" in n) == (level == 1)]
        if names:
            dist.print0(f"\n{title}\n{'':<34}" + "".join(f"{c:>14}" for c in cols))
            for n in names:
                dist.print0(f"{n:<34}" + "".join(f"{summary['metrics'][n][c]:>14.2f}"
                                                 for c in cols))
    wrote = [out / "summary.json"]
    if key := next(iter(buffers["trained"]), None):
        wrote.append(out / "timeline.png")
        shown = {c.replace("_", " "): buffers[c][key] for c in cols if c in buffers}
        what = "classifier only," if args.eval_random_init and args.head_epochs else \
            "spotting on the"  # with the baseline, `buffers` hold phase A's scores ("C")
        soccernet.save_timeline(wrote[1], soccernet.read_halves(root, [key[0]], args.video_name)
                                [key[1] - 1], shown,
                                f"COMEDIAN {what} {args.eval_split!r} split")
    m = args.metric
    floor = torch.tensor(summary.get("random_scores", {}).get(f"{m}_a_mAP", [math.nan]))
    for key, name, what, spread in (
            (f"classifier_{m}_a_mAP", "verdict", "classifier only", args.trained_spread),
            (f"{m}_a_mAP", "verdict_finetune", "full fine-tuning", 0.0)):
        randoms = [r[key] for c, r in results.items() if c.startswith("random_init") and key in r]
        if randoms and key in results["trained"]:  # DESIGN §3, with the floor beside
            summary[name] = verdict(f"{m} a-mAP ({what})", randoms,
                                    [results["trained"][key]], trained_spread=spread or None,
                                    decimals=2)
            dist.print0(f"{summary[name]['line']}; uniform random scores {floor.mean():.2f}"
                        f" +- {floor.std():.2f}")
    with open(wrote[0], "w") as fh:
        json.dump(summary, fh, indent=2)
    dist.print0("wrote " + " and ".join(map(str, wrote)))


def level1(root: Path, args: Args, device, amp: optim.Amp) -> dict:
    """`pretext_losses` of the trained stage-1 (unless --init-from skipped it) and stage-2
    models of <output-dir> and of the same models at their random initialisation (seeded)."""
    pca = checkpoint.load(os.path.join(args.output_dir, "teacher_pca.pt"))
    bank = TeacherBank(teacher_root(root, args), args.teacher_name, args.teacher_fps, pca)
    dim, out = pca["components"].shape[1], {}
    for name in ("random_init", "trained"):
        torch.manual_seed(args.seed)
        spatial, distiller = build_model(args, "spatial"), build_model(args, "distill", dim)
        spatial = None if args.init_from else spatial.to(device)
        if name == "trained":
            for model, file in ((spatial, "spatial.pt"), (distiller, "distill.pt"))[
                    bool(args.init_from):]:
                path = os.path.join(args.output_dir, file)
                checkpoint.load_model(model, checkpoint.load(path)["model"], what=path)
        out[name] = pretext_losses(root, args, device, amp, spatial, distiller.to(device), bank)
    return out


def bench(args: Args, device, amp: optim.Amp) -> dict:
    """--bench: the step of each loop of `phases` as its loop runs it (`loop_step`: its
    optimiser with its parameter groups at its peak lr, the model wrapped, phase A's frozen
    trunk in eval mode), on random tensors at the configured shapes with the loader's draws
    (masks, mixup); one JSON line each, with its data pipeline's rate on the synthetic set.
    Returns {name: that line as a dict}."""
    S, T, out = args.img_size, int(args.window), {}
    halves = split_halves(synthetic.soccernet(), ["train"], args)
    for name, (stage, b, _, base_lr, *_) in phases(args).items():
        if args.stage not in ("all", stage):
            continue
        model, distill = build_model(args, stage, args.pca_dim).to(device), stage == "distill"
        opt, before_step = loop_optimizer(name, model, args)
        optim.set_lr_wd(opt, base_lr * b * dist.world() / 256)
        net = wrap(model, args)
        if stage == "spatial":
            batch = [torch.randn(b, 3, 2, S, S, device=device) for _ in range(2)]
            ds = SpatialClips(halves, args, args.seed)
        else:
            keep, lam, u = (torch.stack(d).to(device) for d in zip(*[sample_draws(
                T, args.mask_ratio if distill else args.ft_mask_ratio,
                0.0 if distill else args.mixup_alpha) for _ in range(b)]))
            x = torch.randn(b, 3, 2 * T, S, S, device=device)
            batch = [x, torch.randn(b, T, args.pca_dim, device=device), keep] if distill else \
                [x, (torch.rand(b, T, soccernet.NUM_CLASSES, device=device) < 0.05).float(),
                 keep, lam, u]
            ds = Windows(halves, args, "finetune", 4, args.seed)  # (stage 2 decodes the same)
        loader = data.make_loader(ds, b, True, args.seed, args.num_workers) \
            if len(ds) >= b else None
        out[name] = log.bench(lambda: loop_step(stage, net, batch, opt, amp, args, 0.99,
                                                before_step), b, device, loader=loader,
                              amp_dtype=amp.dtype, stage=name, amp=amp.mode,
                              clip=f"{2 if stage == 'spatial' else 2 * T}x{S}")
    return out


if __name__ == "__main__":
    cli.run(main, Args, PRESETS)
