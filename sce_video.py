"""SCE for video: Similarity Contrastive Estimation on clips, with action recognition and retrieval.

J. Denize, J. Rabarisoa, A. Orcesi, R. Hérault, "Similarity Contrastive Estimation for Image
and Video Soft Contrastive Self-Supervised Learning", MVA 2023 (arXiv:2212.11187); thesis ch. 5
and app. B (the source followed here), with the official eztorch configs where it is silent.

Method in five lines: two clips drawn independently from each video, each with its own spatial
augmentation (the same on all its frames; RGB difference with p = 0.2), go through an online
Slow-path ResNet3D + projector + predictor and an EMA target ResNet3D + projector. The target's
similarities to a memory buffer, sharpened at tau_m, mixed with the one-hot positive (lambda)
are the soft target of a cross-entropy against the online similarities at tau (Eqs. 4.5-4.10),
symmetrised over the two clips (Sec. 5.3).

Launch (--batch-size is per GPU; 8 x 64 = the official global batch 512):
    python sce_video.py                                # CPU demo on the embedded synthetic videos
    python sce_video.py --preset k200-r3d18 --data ~/data/k200 --batch-size 16 \
        --accum-iter 32                                # 1 GPU, global batch 512
    torchrun --nproc_per_node=8 sce_video.py --preset k400-r3d18-8x224 --data ~/data/k400
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        sce_video.py --preset k400-r3d50-16x224 --batch-size 32 --data ~/data/k400
    torchrun --nproc_per_node=8 sce_video.py --preset k400-r3d18-8x224 --eval linear \
        --init-from runs/x/last.pt --data ~/data/k400                 # 60 epochs, 30-view test
    torchrun --nproc_per_node=8 sce_video.py --preset k400-r3d18-8x224 --eval finetune \
        --dataset ucf101 --ft-splits 1 2 3 --init-from runs/x/last.pt --data ~/data/ucf101
    python sce_video.py --preset k400-r3d18-8x224 --eval retrieval --dataset hmdb51 \
        --init-from runs/x/last.pt --data ~/data/hmdb51               # R@1/5/10/20, split 1
Presets: k200-r3d18 (the Tab. 5.6 ablation setting), k400-r3d18-8x224, k400-r3d18-16x112,
k400-r3d50-8x224, k400-r3d50-16x224, demo. Ablation knobs: --lam, --tau-m, --color-strength,
--diff-p, --duration-jitter, --reverse-p (Tabs. 5.2-5.5).

Deviations, with reasons:
- Clip times are in frames: duration x fps frames (fps from the file; --frames-fps for frame
  folders, 30 as the K200 frames), the start an integer frame drawn uniformly (pytorchvideo
  draws a real start time); a video shorter than the clip gives T frames spread over all of it.
- Augmentations run per clip on the CPU (torchvision v2 on (T, 3, H, W): one draw for all the
  frames), not batched on the GPU; draws come from (seed, epoch, index). The blur kernel is
  23 px at 224 (the code's) and 10 % of the crop, widened to hold +-3 sigma_max, below; it
  is torchvision's blur computed as two banded matrix products (`augment.GaussianBlur`, about
  5x faster on the CPU, outputs within float rounding).
- RGB difference is applied to the raw frames before the crop (the code applies it on the
  CPU clip too): kept frame j shows g(j) - g(j + 1), the clip's last frame repeats the
  difference before it, as eztorch's transform on video files (K400). Its frame-folder decoder
  (K200) gives the second-to-last frame a zero difference when the last two kept frames are
  consecutive (clips of under 2T - 1 frames); not reproduced. The grayscale is torchvision's
  rgb_to_grayscale on uint8 (truncated) and the result is rounded, as that frame decoder; on
  video files the code works on float frames, unrounded (at most 1 grey level apart).
- Linear probe warmup 8 epochs (the code; the thesis says 35). Short-side train scale
  [256, 320] (the code; the thesis says 256).
- Test crops: pytorchvideo's uniform_crop offsets (left, ceil-centre, right) through
  common/multiview.py; test clips evenly spaced over [0, n - clip frames].
- The projector's output BN is affine-free and the predictor's last Linear has no bias
  (eztorch heads); SyncBN under DDP on CUDA only (CPU refuses it); no shuffle-BN.
- Module names follow pytorchvideo (blocks.0 stem, blocks.1-4 res_blocks.*.branch2.conv_a ...),
  so eztorch weights load unchanged with --init-from: pretraining checkpoints (trunk.model.*),
  trunks without their head (trunk.*) and the released bare trunks (blocks.*).
- --amp applies to every loop (auto: bf16 on CUDA); the code fine-tunes and probes in fp32:
  pass --amp none for that. The loss, softmaxes and the multi-view merge are fp32 always.
- Under DDP without SyncBN (CPU) each rank's BN running statistics follow its own batches;
  rank 0's are broadcast before any evaluation, so every rank evaluates the checkpoint.
- `demo` is a CPU setting, not a thesis one: R3D-18 at 1/4 width (16-128 channels), 8
  frames of 0.64 s at 32 px, batch 16, a 256-key queue (a quarter of the 1,024 training
  videos), 640 steps, fp32, a 2-clip x 1-crop test, at the official base lr 2.4 per 256,
  linearly scaled (peak 0.15 at batch 16). Its data is `synthetic.motion_videos` (4 motions
  that survive the per-clip flip: down, sideways, up, zoom in; 256 + 100 videos per class),
  whose object and background are re-drawn every 2 frames, so that two clips of a video
  share only their motion, which the instance objective must therefore learn (on
  `synthetic.videos` the only instance cues were colours, which the colour jitter removes,
  and the loss stayed at chance). Evaluation: held-out clip retrieval (the pretext), kNN and
  class retrieval on view-averaged features against raw pixels and 3 random inits; no probe
  or fine-tuning (they need a real dataset). Settings chosen on the validation draw
  (--synthetic-seed 1); the numbers are in the README.
"""
import copy
import json
import os
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from common import (augment, checkpoint, cli, data, dist, evaluate, log, multiview, optim,
                    synthetic, training, video)


# ---- 2. Arguments ----
@dataclass
class Args:
    # run
    output_dir: str = ""
    """run folder (default runs/sce_video-<time>): args.json, log.jsonl, last.pt, summary.json"""
    seed: int = 0
    """random seed (clip starts and augmentations derive from seed, epoch and index)"""
    epochs: int = 200
    """pretraining epochs (Sec. 5.4.1, App. B.1)"""
    max_steps: int = 0
    """stop after this many optimiser steps (0: all epochs; schedules still span all)"""
    log_every: int = 50
    """steps between log lines"""
    ckpt_every: int = 1000
    """steps between checkpoints (atomic); also written at the end"""
    resume: str = ""
    """checkpoint to resume from (default: <output_dir>/last.pt, linear.pt, finetune-split<s>.pt)"""
    init_from: str = ""
    """weights to evaluate: a last.pt (encoder.*), a backbone.pt, or eztorch weights (trunk.model.*,
    trunk.*, a bare trunk; a Lightning .ckpt's state_dict)"""
    eval: Literal["none", "linear", "finetune", "retrieval"] = "none"
    """none: pretrain (then the monitor, if on); linear: K400 probe; finetune: UCF101/HMDB51;
    retrieval: R@k, all of --init-from (spec §5)"""
    bench: bool = False
    """time the training step on random clips and the data pipeline alone, print JSON, exit"""
    # data
    data: str = ""
    """dataset root (empty: the embedded synthetic videos, demo preset)"""
    dataset: Literal["csv", "folders", "ucf101", "hmdb51"] = "csv"
    """csv: {train,val}.csv 'path label [n]' (videos or frame folders); folders:
    {train,val}/<class>/<video>; ucf101/hmdb51: the official split files in --data"""
    frames_fps: float = 30.0
    """frame rate of frame-folder videos (K200 frames and HMDB51: 30, UCF101: 25; spec §4)"""
    num_frames: int = 8
    """T frames kept per clip (Sec. 5.4.1: 8; 16 for the 16x presets)"""
    clip_duration: float = 2.56
    """seconds per clip (App. B.1; 1.28 for 16x112, spec §4)"""
    crop_size: int = 224
    """pretraining / training crop (224, or 112)"""
    crop_scale: tuple[float, float] = (0.2, 0.766)
    """RandomResizedCrop scale of the pretraining clips (eztorch config, spec §4)"""
    num_workers: int = 8
    """data loader workers per process"""
    max_fail_fraction: float = 0.05
    """stop when more than this fraction of the videos is unreadable (one is always skipped)"""
    synthetic_per_class: tuple[int, int] = (32, 16)
    """train/val videos per class of the embedded synthetic set (no --data)"""
    synthetic_set: Literal["motion", "shapes"] = "motion"
    """embedded set (no --data): motion = synthetic.motion_videos (4 motions that survive a
    flip; the appearance is re-drawn every 2 frames, so only motion ties two clips of a
    video), shapes = synthetic.videos (8 motions of one striped shape per video)"""
    synthetic_seed: int = 0
    """seed of the embedded synthetic set (0: the demo's verdict; 1: the validation draw its
    settings were chosen on)"""
    # model
    depth: Literal[18, 50] = 18
    """ResNet3D-18 (basic blocks) or ResNet3D-50 (bottlenecks), Slow path (Tab. B.1)"""
    width: int = 64
    """stem / first-stage channels (64 in Tab. B.1; the demo uses 16)"""
    proj_hidden: tuple[int, ...] = (1024, 1024)
    """projector hidden widths, BN all (Tab. B.2: 3 layers, 1024; R3D-50 4096)"""
    proj_dim: int = 256
    """projector output dimension (Tab. B.2)"""
    pred_hidden: int = 1024
    """predictor hidden width, BN hid, 0 for none (Tab. B.2: 1024; R3D-50 4096)"""
    sync_bn: bool = True
    """SyncBatchNorm under DDP on CUDA (eztorch runs, spec §4)"""
    # method
    lam: float = 0.5
    """lambda: weight of the one-hot positive in the target (Eq. 4.8; Tab. 5.6)"""
    tau: float = 0.1
    """online temperature (Eq. 4.9)"""
    tau_m: float = 0.05
    """target temperature (Eq. 4.5; Tab. 5.3, 5.6: 0.05 for video)"""
    queue_size: int = 65536
    """memory buffer M (Tab. B.2: K200 32,768, K400 65,536)"""
    ema_m0: float = 0.99
    """initial EMA momentum, cosine to 1 per step (App. B.1)"""
    color_strength: float = 1.0
    """colour-jitter strength s: brightness 0.8s, contrast 0.8s, saturation 0.4s, hue 0.2s
    (Tab. 5.4)"""
    diff_p: float = 0.2
    """probability of RGB difference per clip (Tab. 5.5)"""
    duration_jitter: float = 0.0
    """clip duration x U(1 - j, 1 + j) (Tab. 5.5 'jitter'; off in the final setting)"""
    reverse_p: float = 0.0
    """probability of reversing a clip's frames (Tab. 5.5 'reverse'; off)"""
    # optimisation
    base_lr: float = 2.4
    """LARS learning rate for a global batch of 256 (App. B.1; 4.8 at 512)"""
    batch_size: int = 64
    """videos per process (App. B.1: 512 = 8 GPUs x 64)"""
    weight_decay: float = 1e-6
    """LARS weight decay, not on 1-D parameters (App. B.1)"""
    warmup_epochs: int = 35
    """linear lr warmup from 0, per step (the eztorch configs, spec §4)"""
    accum_iter: int = 1
    """gradient accumulation: micro-batches per optimiser step (keys enqueued once per step)"""
    # system
    device: str = "auto"
    """cpu, cuda, cuda:N or auto"""
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    """autocast dtype (auto: bf16 on CUDA, none on CPU); the loss always runs in fp32. On CUDA,
    fp32 matmuls and convolutions use TF32 and cuDNN autotunes its convolutions (the clip
    shapes are fixed; the code's trainer sets benchmark too)"""
    compile: bool = False
    """torch.compile the encoders"""
    threads: int = 0
    """CPU threads of the main process (0: torch's default)"""
    # evaluation
    monitor_eval: bool = False
    """after pretraining: held-out pretext, kNN and retrieval on the pretraining data (the demo)"""
    eval_random_init: bool = False
    """monitor also raw pixels and a randomly initialised encoder, side by side (the demo)"""
    random_init_seeds: int = 1
    """with --eval-random-init: how many random initialisations (seeds seed, seed + 1, ...;
    the first is the run's own start, the table's column) give the verdict's R@1 noise"""
    trained_spread: float = 0.0
    """std of the trained R@1 over >= 3 training seeds, measured beforehand, for a one-run
    verdict; 0: not measured (the verdict then cannot say "helps")"""
    knn_k: tuple[int, ...] = (20, 200)
    """k of the weighted kNN monitor"""
    knn_t: float = 0.07
    """temperature of the weighted kNN monitor"""
    retrieval_k: tuple[int, ...] = (1, 5, 10, 20)
    """R@k of the retrieval (Tab. 5.8: 1, 5, 10)"""
    train_scale: tuple[int, int] = (256, 320)
    """probe / fine-tuning short-side scale range before the crop (code; 128-160 for 112)"""
    test_size: int = 256
    """test short side and crop (App. B.1: 256; 128 for 16x112)"""
    test_clips: int = 10
    """temporal test views (App. B.1)"""
    test_crops: int = 3
    """spatial test views (App. B.1)"""
    lin_epochs: int = 60
    """linear probe epochs (App. B.1)"""
    lin_base_lr: float = 2.0
    """linear probe lr for a global batch of 256 (App. B.1; 4.0 at 512)"""
    lin_warmup_epochs: int = 8
    """linear probe warmup (code: 8; the thesis says 35)"""
    lin_batch_size: int = 64
    """linear probe videos per process (8 x 64 = 512)"""
    ft_epochs: int = 200
    """fine-tuning epochs (App. B.1)"""
    ft_base_lr: float = 0.1
    """fine-tuning lr for a global batch of 256 (App. B.1; 0.025 at 64)"""
    ft_batch_size: int = 8
    """fine-tuning videos per process (8 x 8 = 64)"""
    ft_dropout: float = 0.8
    """dropout before the classifier (App. B.1)"""
    ft_splits: tuple[int, ...] = (1,)
    """UCF101/HMDB51 splits to fine-tune on; several: each and their mean (Tab. 5.7: 1 2 3)"""
    preset: str = ""
    """the preset applied (set by --preset)"""


_R50 = dict(depth=50, proj_hidden=(4096, 4096), pred_hidden=4096)
PRESETS = {
    "k200-r3d18": dict(queue_size=32768),  # Tab. 5.6 chosen setting: 66.0 / 88.4 / 62.0
    "k400-r3d18-8x224": dict(),  # Tab. 5.7: 59.8 / 90.9 / 65.7
    "k400-r3d18-16x112": dict(num_frames=16, clip_duration=1.28, crop_size=112,
                              train_scale=(128, 160), test_size=128),  # 56.6 / 89.1 / 66.6
    "k400-r3d50-8x224": dict(_R50),  # 67.6 / 94.1 / 70.5
    "k400-r3d50-16x224": dict(_R50, num_frames=16, batch_size=32),  # 16 GPUs x 32 = 512;
    # 69.6 / 95.3 / 74.7
    # CPU demo (2 cores, <= 15 min), settings chosen on --synthetic-seed 1; see the deviations.
    "demo": dict(width=16, proj_hidden=(256, 256), proj_dim=64, pred_hidden=256,
                 queue_size=256, num_frames=8, clip_duration=0.64, crop_size=32,
                 batch_size=16, epochs=10, warmup_epochs=1, amp="none",
                 synthetic_per_class=(256, 100),
                 num_workers=1, log_every=20, ckpt_every=500, monitor_eval=True,
                 eval_random_init=True, random_init_seeds=3, trained_spread=4.1,
                 knn_k=(10, 20), train_scale=(32, 40), test_size=32, test_clips=2,
                 test_crops=1),
}


# ---- 3. Data ----
MEAN, STD = (0.45, 0.45, 0.45), (0.225, 0.225, 0.225)  # spec §4
# Tab. 4.1 strong-alpha / strong-beta: (blur p, solarize p); jitter p 0.8, grayscale 0.2.
AUGS = {"strong-alpha": (1.0, 0.0), "strong-beta": (0.1, 0.2)}


def read_split(args: Args, train: bool, split: int = 1) -> list:
    """VideoRecords of the train or val/test split of --data (synthetic without it)."""
    if not args.data:
        ptr, pva = args.synthetic_per_class
        if args.synthetic_set == "motion":
            root = synthetic.motion_videos(seed=args.synthetic_seed, per_class_train=ptr,
                                           per_class_val=pva)
        else:
            root = synthetic.videos(seed=args.synthetic_seed, per_class_train=ptr,
                                    per_class_val=pva, scale=1.5, plain=True)
        return data.read_video_csv(root / ("train.csv" if train else "val.csv"))
    if not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data}: no such folder")
    if args.dataset == "ucf101":
        return data.read_ucf101_split(args.data, split, train)
    if args.dataset == "hmdb51":
        return data.read_hmdb51_split(args.data, split, train)
    if args.dataset == "folders":
        return data.read_class_folders(os.path.join(args.data, "train" if train else "val"))[0]
    return data.read_video_csv(os.path.join(args.data, "train.csv" if train else "val.csv"))


def video_info(path: str, args: Args) -> tuple:
    """(frames, fps) of a video file (its own rate) or a frame folder (--frames-fps)."""
    if os.path.isdir(path):
        return video.frame_folder_length(path), args.frames_fps
    meta = video.video_meta(path)
    return meta.num_frames, meta.fps


def clip_frames(n: int, length: int, num_frames: int, start: int) -> list:
    """Uniform subsampling (pytorchvideo UniformTemporalSubsample): frames start +
    int(linspace(0, L - 1, T)) of a clip of L = min(length, n) frames starting at `start`."""
    span = min(length, n)
    return [start + int(x) for x in torch.linspace(0, span - 1, num_frames).tolist()]


def random_clip(n: int, fps: float, args: Args, jitter: float = 0.0) -> list:
    """RandomClipSampler: a clip of clip_duration (x U(1 - j, 1 + j)) seconds starting at a
    uniform frame of [0, n - L], subsampled to T frames; draws from torch's global RNG."""
    scale = 1 + jitter * (2 * torch.rand(()).item() - 1) if jitter else 1.0
    length = max(1, round(args.clip_duration * scale * fps))
    start = int(torch.randint(0, max(n - length, 0) + 1, ()))
    return clip_frames(n, length, args.num_frames, start)


def test_clips(n: int, fps: float, args: Args) -> list:
    """ConstantClipsPerVideoSampler: test_clips clips whose starts are evenly spaced over
    [0, n - L] (int(k (n - L) / (clips - 1)); one clip starts at 0)."""
    length = max(1, round(args.clip_duration * fps))
    room, k = max(n - length, 0), args.test_clips
    return [clip_frames(n, length, args.num_frames, int(i * room / (k - 1)) if k > 1 else 0)
            for i in range(k)]


def difference_pairs(idx: list) -> tuple:
    """The raw frames whose difference stands for each kept frame of a clip (eztorch's
    RandomTemporalDifference: consecutive native frames, before the subsampling): frame j
    gives (j, j + 1), and the clip's last frame e = idx[-1] repeats the difference before it,
    (e - 1, e), as eztorch's temporal_difference does. Returns (firsts, seconds), T each."""
    e = idx[-1]
    return ([j if j < e else max(e - 1, 0) for j in idx],
            [j + 1 if j < e else e for j in idx])


def rgb_difference(firsts: torch.Tensor, seconds: torch.Tensor) -> torch.Tensor:
    """RGB difference (eztorch temporal_difference, spec §4): uint8 (T, 3, H, W) frames and
    the frames to subtract (`difference_pairs`) -> uint8 (T, 3, H, W) of
    round((g(first) - g(second) + 255) / 2) on 3-channel grayscale g (uint8, truncated)."""
    g = v2.functional.rgb_to_grayscale(torch.cat([firsts, seconds]), num_output_channels=3)
    d = g[:len(firsts)].float() - g[len(firsts):].float()
    return ((d + 255) / 2).round().clamp(0, 255).to(torch.uint8)


def pretrain_transform(kind: str, args: Args) -> v2.Compose:
    """One clip's spatial augmentation (spec §4), uint8 (T, 3, H, W) -> normalised float
    (T, 3, S, S), one draw for all the frames: RandomResizedCrop (0.2-0.766, bilinear, no
    antialias), colour jitter (0.8s, 0.8s, 0.4s, 0.2s) p 0.8, grayscale 0.2, blur, solarize,
    flip (strong-alpha / strong-beta of Tab. 4.1 at strength s, Tab. 5.4)."""
    blur_p, solarize_p = AUGS[kind]
    s = args.color_strength
    ops = [v2.RandomResizedCrop(args.crop_size, scale=args.crop_scale, ratio=(3 / 4, 4 / 3),
                                antialias=False),
           v2.ToDtype(torch.float32, scale=True),
           v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.4 * s, 0.2 * s)], p=0.8),
           v2.RandomGrayscale(p=0.2),
           v2.RandomApply([augment.GaussianBlur(augment.blur_kernel(args.crop_size),
                                                (0.1, 2.0))], p=blur_p)]
    if solarize_p:
        ops.append(v2.RandomSolarize(threshold=0.5, p=solarize_p))
    return v2.Compose(ops + [v2.RandomHorizontalFlip(0.5), v2.Normalize(MEAN, STD)])


class PretrainClips(Dataset):
    """(clip 0, clip 1, index): two clips drawn independently from one video, each (3, T, S,
    S), with RGB difference (p = diff_p), reverse (reverse_p) and its own spatial draw;
    every draw from (seed, epoch, index)."""

    def __init__(self, records: list, args: Args, seed: int):
        self.records, self.args, self.seed = records, args, seed
        self.transforms = [pretrain_transform("strong-alpha", args),
                           pretrain_transform("strong-beta", args)]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key):
        epoch, index = data.split_key(key)
        a, path = self.args, self.records[index].path
        n, fps = video_info(path, a)
        with data.sample_seeded(self.seed, epoch, index):  # v2 draws from torch's global RNG
            draws = []  # per clip: frames, RGB difference?, reversed? (independent clips)
            for _ in range(2):
                idx = random_clip(n, fps, a, a.duration_jitter)
                draws.append((idx, torch.rand(()).item() < a.diff_p,
                              torch.rand(()).item() < a.reverse_p))
            wanted = [i for idx, diff, _ in draws  # kept frames, or the pairs to subtract
                      for i in (sum(difference_pairs(idx), []) if diff else idx)]
            frames = video.read_clip(path, wanted).permute(0, 3, 1, 2)  # one decode, uint8
            clips, at = [], 0
            for view, (idx, diff, reverse) in enumerate(draws):
                T = len(idx)
                x = frames[at:at + T]
                if diff:  # consecutive raw frames, before subsampling (spec §4)
                    x = rgb_difference(x, frames[at + T:at + 2 * T])
                at += 2 * T if diff else T
                if reverse:
                    x = x.flip(0)
                clips.append(self.transforms[view](x).transpose(0, 1))  # (3, T, S, S)
        return clips[0], clips[1], index


def normalise(frames: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) in [0, 1] -> normalised (3, T, H, W)."""
    return v2.functional.normalize(frames, MEAN, STD).transpose(0, 1).contiguous()


class EvalClips(Dataset):
    """(clip(s), label, index) for the probe, fine-tuning, retrieval and monitors (spec §5).

    "probe": a random clip, short side scaled to U{train_scale}, random crop, flip (3, T, C, C).
    "finetune": the same plus colour jitter (0.4, 0.4, 0.4, 0.1) p 0.8 and grayscale 0.2.
    "test": test_clips x test_crops views (V, 3, T, S, S): each clip's short side resized to
    test_size, uniform crops of test_size (App. B.1: 10 x 3 of 256).
    """

    def __init__(self, records: list, args: Args, mode: str, seed: int = 0):
        self.records, self.args, self.mode, self.seed = records, args, mode, seed
        ops = [v2.RandomCrop(args.crop_size), v2.ToDtype(torch.float32, scale=True)]
        if mode == "finetune":
            ops += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                    v2.RandomGrayscale(p=0.2)]
        self.train_ops = v2.Compose(ops + [v2.RandomHorizontalFlip(0.5)])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key):
        epoch, index = data.split_key(key)
        a, rec = self.args, self.records[index]
        n, fps = video_info(rec.path, a)
        if self.mode == "test":
            views = []
            for idx in test_clips(n, fps, a):
                frames = video.read_clip(rec.path, idx).permute(0, 3, 1, 2).float()
                frames = multiview.short_side_resize(frames, a.test_size).clamp(0, 255)
                views += [normalise(c / 255) for c in
                          multiview.uniform_crops(frames, a.test_size, a.test_crops, ceil=True)]
            return torch.stack(views), rec.label, index
        with data.sample_seeded(self.seed, epoch, index):
            frames = video.read_clip(rec.path, random_clip(n, fps, a)).permute(0, 3, 1, 2)
            size = int(torch.randint(a.train_scale[0], a.train_scale[1] + 1, ()))
            frames = multiview.short_side_resize(frames.float(), size).round().clamp(0, 255)
            x = self.train_ops(frames.to(torch.uint8))
        return normalise(x), rec.label, index


def make_loader(ds: Dataset, batch_size: int, args: Args, train: bool) -> DataLoader:
    """Shuffled full batches keyed (epoch, index) for training; every clip once, in order,
    for evaluation (also under DDP); the loader's own generator (`data.make_loader`)."""
    return data.make_loader(ds, batch_size, train, args.seed, args.num_workers)


# ---- 4. Model ----
def conv_bn(cin: int, cout: int, kernel: tuple, stride: tuple = (1, 1, 1)) -> tuple:
    """A bias-free Conv3d with 'same' padding (k // 2 per axis) and its BatchNorm3d."""
    pad = tuple(k // 2 for k in kernel)
    return nn.Conv3d(cin, cout, kernel, stride, pad, bias=False), nn.BatchNorm3d(cout)


class Branch2(nn.Module):
    """The residual branch (pytorchvideo names). Basic: conv_a (kt x 3 x 3, spatial stride),
    conv_b (1 x 3 x 3). Bottleneck: conv_a (kt x 1 x 1), conv_b (1 x 3 x 3, spatial stride),
    conv_c (1 x 1 x 1). kt is the stage's temporal kernel (Tab. B.1); no temporal stride."""

    def __init__(self, cin: int, inner: int, cout: int, kt: int, stride: int, bottleneck: bool):
        super().__init__()
        s = (1, stride, stride)
        if bottleneck:
            self.conv_a, self.norm_a = conv_bn(cin, inner, (kt, 1, 1))
            self.conv_b, self.norm_b = conv_bn(inner, inner, (1, 3, 3), s)
            self.conv_c, self.norm_c = conv_bn(inner, cout, (1, 1, 1))
        else:
            self.conv_a, self.norm_a = conv_bn(cin, cout, (kt, 3, 3), s)
            self.conv_b, self.norm_b = conv_bn(cout, cout, (1, 3, 3))
        self.bottleneck = bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm_a(self.conv_a(x)), inplace=True)
        x = self.norm_b(self.conv_b(x))
        if self.bottleneck:
            x = self.norm_c(self.conv_c(F.relu(x, inplace=True)))
        return x


class ResBlock(nn.Module):
    """relu(branch1(x) + branch2(x)); branch1 is a 1x1x1 conv (spatial stride) + BN when the
    shape changes, else the identity."""

    def __init__(self, cin, inner, cout, kt, stride, bottleneck):
        super().__init__()
        self.branch2 = Branch2(cin, inner, cout, kt, stride, bottleneck)
        if cin != cout or stride != 1:
            self.branch1_conv, self.branch1_norm = conv_bn(cin, cout, (1, 1, 1),
                                                           (1, stride, stride))
        else:
            self.branch1_conv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.branch1_conv is None else self.branch1_norm(self.branch1_conv(x))
        return F.relu(skip + self.branch2(x), inplace=True)


class Stage(nn.Module):
    def __init__(self, blocks: list):
        super().__init__()
        self.res_blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for b in self.res_blocks:
            x = b(x)
        return x


class Stem(nn.Module):
    """conv 1x7x7, stride (1, 2, 2) + BN + ReLU + max-pool 1x3x3 stride (1, 2, 2) (Tab. B.1)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv3d(3, width, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False)
        self.norm = nn.BatchNorm3d(width)
        self.pool = nn.MaxPool3d((1, 3, 3), (1, 2, 2), (0, 1, 1))

    def forward(self, x):
        return self.pool(F.relu(self.norm(self.conv(x)), inplace=True))


# Tab. B.1: blocks per stage and the temporal kernel of conv_a in res2..res5.
DEPTHS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}
TEMPORAL_KERNELS = (1, 1, 3, 3)


class ResNet3D(nn.Module):
    """Slow-path ResNet3D-18/50 trunk (Tab. B.1, spec §4): (B, 3, T, H, W) -> (B, D) pooled
    over T x H x W; D = 8 x width (R3D-18) or 32 x width (R3D-50). `features_map` keeps
    (B, D, T, H/32, W/32): T is never strided."""

    def __init__(self, depth: int = 18, width: int = 64):
        super().__init__()
        bottleneck = depth == 50
        blocks, cin = [Stem(width)], width
        for i, (n, kt) in enumerate(zip(DEPTHS[depth], TEMPORAL_KERNELS)):
            inner = width * 2 ** i
            cout = inner * 4 if bottleneck else inner
            blocks.append(Stage([ResBlock(cin if j == 0 else cout, inner, cout, kt,
                                          2 if (i > 0 and j == 0) else 1, bottleneck)
                                 for j in range(n)]))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.feat_dim = cin
        for m in self.modules():  # pytorchvideo init (spec §4)
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # the last BN of every residual branch starts at gamma 0
            if isinstance(m, Branch2):
                nn.init.zeros_((m.norm_c if bottleneck else m.norm_b).weight)

    def features_map(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_map(x).mean((2, 3, 4))  # global average pool


def build_backbone(depth: int = 18, width: int = 64) -> ResNet3D:
    return ResNet3D(depth, width)


def mlp(in_dim: int, hidden: tuple, out_dim: int, last_bn: bool) -> nn.Sequential:
    """Linear (no bias) + BN + ReLU per hidden width, then a bias-free Linear and, when
    `last_bn` (BN "all", Tab. B.2), an affine-free BN (eztorch heads, spec §1). Every layer
    keeps PyTorch's default init, as eztorch's MLPHead (its `last_init_normal` is off in the
    SCE projector and predictor configs)."""
    layers, d = [], in_dim
    for h in hidden:
        layers += [nn.Linear(d, h, bias=False), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
        d = h
    layers.append(nn.Linear(d, out_dim, bias=False))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class SCE(nn.Module):
    """f_s, g_s, h_s online; f_t, g_t EMA target; the memory buffer (queue, queue_ptr).

    `forward(clip0, clip1) -> (loss, keys)`: the symmetric loss (Sec. 5.3)
    (L(q1, k0) + L(q0, k1)) / 2 with q_j = norm(h_s(g_s(f_s(x_j)))), k_i = norm(g_t(f_t(x_i)))
    (B, D), both terms against the buffer as it was before the step; keys (2B, D)."""

    def __init__(self, args: Args):
        super().__init__()
        self.args = args
        self.encoder = build_backbone(args.depth, args.width)
        self.projector = mlp(self.encoder.feat_dim, args.proj_hidden, args.proj_dim, True)
        self.predictor = (mlp(args.proj_dim, (args.pred_hidden,), args.proj_dim, False)
                          if args.pred_hidden else nn.Identity())
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_projector = copy.deepcopy(self.projector)
        for p in [*self.target_encoder.parameters(), *self.target_projector.parameters()]:
            p.requires_grad = False
        g = torch.Generator().manual_seed(args.seed)  # same buffer on every rank
        self.register_buffer("queue", F.normalize(
            torch.randn(args.queue_size, args.proj_dim, generator=g), dim=1))  # (M, D)
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.pending = []  # keys of this step's micro-batches (--accum-iter)

    def online(self, x: torch.Tensor) -> torch.Tensor:  # z1 = h_s(g_s(f_s(x))), (B, D)
        return F.normalize(self.predictor(self.projector(self.encoder(x))), dim=1)

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:  # z2 = g_t(f_t(x)), (B, D), no grad
        return F.normalize(self.target_projector(self.target_encoder(x)), dim=1)

    def forward(self, clip0: torch.Tensor, clip1: torch.Tensor):
        a = self.args
        queue = self.queue.clone()  # both terms see the old buffer (spec §1)
        k0, k1 = self.target(clip0), self.target(clip1)  # each clip on its own: own BN stats
        q0, q1 = self.online(clip0), self.online(clip1)
        loss = (sce_loss(q1, k0, queue, a.lam, a.tau, a.tau_m)
                + sce_loss(q0, k1, queue, a.lam, a.tau, a.tau_m)) / 2  # symmetrised (Sec. 5.3)
        return loss, torch.cat([k0, k1])

    def enqueue(self, keys: torch.Tensor) -> None:
        """FIFO update with the keys of every rank, after the loss (Alg. A.1 l. 50-52)."""
        optim.enqueue(self.queue, self.queue_ptr, keys, "--queue-size",
                      "2 clips x batch x world x accum-iter")


def build_model(args: Args) -> SCE:
    return SCE(args)


# ---- 5. Loss ----
def sce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, lam: float = 0.5,
             tau: float = 0.1, tau_m: float = 0.05) -> torch.Tensor:
    """SCE loss (Eqs. 4.5-4.10), in fp32. q: (B, D) normalised online predictions z1; k:
    (B, D) normalised target projections z2 (no grad); queue: (M, D). Distributions over
    [positive, queue] (1 + M); the positive's relational logit is 0, as the official code
    (spec §7.1), not masked."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()
        pos = (q * k).sum(1, keepdim=True)  # (B, 1): z1_i . z2_i
        logits_q = torch.cat([pos, q @ queue.T], 1) / tau  # Eq. 4.9: p1 = softmax
        logits_k = torch.cat([torch.zeros_like(pos), k @ queue.T], 1) / tau_m  # Eq. 4.5: s2
        w = (1 - lam) * logits_k.softmax(1)  # Eq. 4.8: w2 = lam onehot + (1 - lam) s2
        w[:, 0] += lam
        return -(w * logits_q.log_softmax(1)).sum(1).mean()  # Eq. 4.10


# ---- 6. Training step ----
def train_step(model, clips: list, optimizer, amp: optim.Amp, momentum: float) -> dict:
    """Forward, symmetric SCE loss, backward and step (Eq. 4.1), then the EMA (Eq. 4.2) and
    the FIFO update; with --accum-iter the keys are buffered and enqueued once per step."""
    with amp.autocast():
        loss, keys = model(*clips)
    amp.step(loss, optimizer)  # non-finite loss: raises before the update
    sce = checkpoint.unwrap(model)
    sce.pending.append(keys)
    if amp.stepped:
        optim.ema_update(sce.target_encoder, sce.encoder, momentum, copy_buffers=False)
        optim.ema_update(sce.target_projector, sce.projector, momentum, copy_buffers=False)
        sce.enqueue(torch.cat(sce.pending))
        sce.pending.clear()
    return {"loss": loss.detach()}


# ---- 7. Evaluation ----
# Where the trunk sits in the files --init-from takes, longest prefix first (eztorch wraps the
# pretraining trunk in a VideoHeadModel: trunk.model.blocks.*; its linear-evaluation config
# strips ^(trunk\.model\.); its fine-tuning models hold trunk.blocks.*). The EMA copy is dropped.
TRUNK_PREFIXES = ("trunk.model.", "trunk.", "encoder.")
IGNORED_PREFIXES = ("momentum_trunk.",)


def load_encoder(encoder: nn.Module, path: str) -> None:
    """Backbone weights of `path` into `encoder` (strict), read with weights_only.

    The file holds a state dict, bare or under "model" (our last.pt) or "state_dict"
    (a Lightning checkpoint), in one of these layouts: eztorch pretraining (`trunk.model.*`,
    with `momentum_trunk.*`, heads and queue beside it), an eztorch trunk without its head
    (`trunk.*`), our last.pt (`encoder.*`), or a bare backbone (`blocks.*`: our backbone.pt,
    the authors' released trunks). Raises `checkpoint.CheckpointError` (one line) naming the
    key prefixes found when the file fits none of them, and on missing, unexpected or
    mis-shaped keys (`checkpoint.load_model`)."""
    full = checkpoint.read_weights(path)
    sd, prefix = checkpoint.strip_prefix(full, TRUNK_PREFIXES, IGNORED_PREFIXES)
    if not prefix and not (sd and all(k.startswith("blocks.") for k in sd)):
        raise checkpoint.layout_error(path, "SCE video trunk", f"keys under "
                                      f"{', '.join(TRUNK_PREFIXES)} or a bare backbone's "
                                      f"blocks.*", full)
    checkpoint.load_model(encoder, sd, strict=True, what=f"{path} ({prefix or 'bare'} weights)")


def channels_last(x: torch.Tensor, device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last_3d) if device.type == "cuda" else x


class Classifier(nn.Module):
    """Trunk, dropout, Linear (N(0, 0.01), bias 0: eztorch's video heads init them so, with
    pytorchvideo's init_net_weights) (App. B.1; the probe: dropout 0)."""

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float):
        super().__init__()
        self.encoder, self.dropout = encoder, nn.Dropout(dropout)
        self.head = nn.Linear(encoder.feat_dim, num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.dropout(self.encoder(x)))


def supervised(args: Args, device, amp, logger, linear: bool, split: int = 1) -> dict:
    """Linear probe (frozen trunk in eval mode; SGD 0.9, no wd, warmup + cosine, lr x batch /
    256) or fine-tuning (the whole network, dropout, SGD cosine, no warmup), checkpointed and
    resumed bitwise, then the multi-view test (softmax averaged over the views) (App. B.1)."""
    train_recs, test_recs = read_split(args, True, split), read_split(args, False, split)
    n_cls = max(r.label for r in train_recs + test_recs) + 1
    encoder = build_backbone(args.depth, args.width)
    if args.init_from:
        load_encoder(encoder, args.init_from)
    model = Classifier(encoder, n_cls, 0.0 if linear else args.ft_dropout).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last_3d)
        if not linear and args.sync_bn and dist.is_dist():
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if linear:
        for p in model.encoder.parameters():
            p.requires_grad = False
    b = args.lin_batch_size if linear else args.ft_batch_size
    global_batch = b * dist.world() * args.accum_iter
    peak = (args.lin_base_lr if linear else args.ft_base_lr) * global_batch / 256
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=peak, momentum=0.9, weight_decay=0.0)
    net = nn.parallel.DistributedDataParallel(model) if dist.is_dist() else model
    ds = data.SafeDataset(EvalClips(train_recs, args, "probe" if linear else "finetune",
                                    args.seed), args.max_fail_fraction, "train videos")
    name = "linear" if linear else f"finetune-split{split}"
    loop = training.Loop(make_loader(ds, b, args, train=True),
                         args.lin_epochs if linear else args.ft_epochs,
                         {"model": model, "optimizer": opt}, args, logger, amp,
                         source=f"weights {checkpoint.fingerprint(model.state_dict())}",
                         ckpt_name=f"{name}.pt", desc=name, prefix=name,
                         batch_flag="--lin-batch-size" if linear else "--ft-batch-size",
                         accum_iter=args.accum_iter)
    warmup = min(args.lin_warmup_epochs * loop.steps_per_epoch, loop.total_steps) if linear else 0
    loop.resume(args.resume)
    dist.print0(f"{name}: {len(ds)} clips, {n_cls} classes, batch {global_batch}, "
                f"peak lr {peak:.3g}")
    net.train()
    if linear:
        model.encoder.eval()  # frozen trunk, BN statistics fixed
    for x, y, _ in loop:
        lr = optim.cosine_schedule(loop.step, loop.total_steps, peak, warmup)
        optim.set_lr_wd(opt, lr)
        with amp.autocast():
            logits = net(channels_last(x, device))
        loss = F.cross_entropy(logits.float(), y.to(device, non_blocking=True))
        amp.step(loss, opt)
        loop.end_step({"loss": loss.detach()}, {f"{name}/lr": lr})
    dist.broadcast_buffers(model)
    model.eval()
    test = data.SafeDataset(EvalClips(test_recs, args, "test"), args.max_fail_fraction,
                            "test videos", replace=False)  # an unreadable clip is left out
    res = multiview.multi_view_accuracy(model, make_loader(test, b, args, train=False), device, amp)
    return {"top1": res["top1"], "top5": res["top5"]}


def finetune_splits(args: Args, device, amp, logger) -> dict:
    """Fine-tuning on each of --ft-splits, and their mean (Tab. 5.7: the 3 splits)."""
    out = {}
    for s in args.ft_splits:
        res = supervised(args, device, amp, logger, linear=False, split=s)
        out.update({f"finetune_top1_split{s}": res["top1"], f"finetune_top5_split{s}": res["top5"]})
    if len(args.ft_splits) > 1:
        out["finetune_top1_mean"] = sum(out[f"finetune_top1_split{s}"]
                                        for s in args.ft_splits) / len(args.ft_splits)
    return out


def test_features(fn, records: list, args: Args, device, amp) -> tuple:
    """(N, D) features `fn(x)` averaged over the test views (no softmax), and labels."""
    ds = data.SafeDataset(EvalClips(records, args, "test"), args.max_fail_fraction, "videos",
                          replace=False)
    return multiview.multi_view_features(fn, make_loader(ds, args.lin_batch_size, args, False),
                                         device, amp)


def retrieval_eval(fn, args: Args, device, amp, knn: bool = False) -> dict:
    """Retrieval (spec §5): queries = the test split, bank = the train split (split 1), view-
    averaged features, each set mean-centred then L2-normalised, cosine; R@k in percent.
    With `knn`, also the weighted kNN top-1 on the same (uncentred) features."""
    (fb, yb), (fq, yq) = [test_features(fn, read_split(args, t), args, device, amp)
                          for t in (True, False)]
    out = evaluate.retrieval_recall(fq, yq, fb, yb, args.retrieval_k, center=True)
    if knn:
        n_cls = int(max(yb.max(), yq.max())) + 1
        out.update(evaluate.knn_classify(fb, yb, fq, yq, n_cls, args.knn_k, args.knn_t))
    return out


class Pairs(Dataset):
    """(both clips (2, 3, T, S, S), 0, index) of `PretrainClips`, for `extract_features`."""

    def __init__(self, clips: PretrainClips):
        self.clips, self.records = clips, clips.records  # records: SafeDataset's messages

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key):
        c0, c1, index = self.clips[key]
        return torch.stack([c0, c1]), 0, index


@torch.no_grad()
def view_retrieval(sce: SCE, args: Args, device, amp) -> dict:
    """The pretext on held-out data (level 1): each validation video gives its two
    pretraining clips (`PretrainClips` with seed + 1, so every model sees the same clips);
    `view_top1`: % of second clips whose most cosine-similar first clip (trunk features, among
    all N) is their own (chance 100 / N), with its binomial SE; `view_loss`: the SCE loss of
    each second clip's query against its first clip's key with the other N - 1 keys as the
    buffer, mean and SE. Every rank gets the same values (features gathered in order)."""
    pairs = data.SafeDataset(Pairs(PretrainClips(read_split(args, False), args, args.seed + 1)),
                             args.max_fail_fraction, "held-out videos", replace=False)
    d, p = sce.encoder.feat_dim, args.proj_dim

    def feats(x):  # (B, 2, 3, T, S, S) -> (B, 2 d + 2 p): trunk features, query, key
        c0, c1 = channels_last(x[:, 0], device), channels_last(x[:, 1], device)
        return torch.cat([sce.encoder(c0), sce.encoder(c1), sce.online(c1), sce.target(c0)],
                         1).float()
    f, _ = evaluate.extract_features(feats, make_loader(pairs, args.lin_batch_size, args, False),
                                     device, amp)
    f0, f1 = F.normalize(f[:, :d], dim=1), F.normalize(f[:, d:2 * d], dim=1)
    q, k = f[:, 2 * d:2 * d + p], f[:, 2 * d + p:]
    hit = ((f1 @ f0.T).argmax(1) == torch.arange(len(f), device=f.device)).double().mean()
    hit = hit.item()
    loss = torch.stack([sce_loss(q[i:i + 1], k[i:i + 1], torch.cat([k[:i], k[i + 1:]]),
                                 args.lam, args.tau, args.tau_m) for i in range(len(f))])
    return {"view_top1": 100 * hit, "view_top1_se": 100 * (hit * (1 - hit) / len(f)) ** 0.5,
            "view_loss": loss.mean().item(), "view_loss_se": (loss.std() / len(f) ** 0.5).item()}


def monitor(sce, args: Args, device, amp) -> dict:
    """Held-out pretext, then kNN and retrieval on the pretraining data's view-averaged
    features (`sce` None: raw pixels, the clip average-pooled to (3, T, 8, 8))."""
    if sce is None:
        return retrieval_eval(lambda x: F.adaptive_avg_pool3d(x.float(), (x.shape[2], 8, 8))
                              .flatten(1), args, device, amp, knn=True)
    was = sce.training
    sce.eval()
    out = {**view_retrieval(sce, args, device, amp),
           **retrieval_eval(sce.encoder, args, device, amp, knn=True)}
    sce.train(was)
    return out


def versus_raw_pixels(raw: float, trained: float, n_eval: int, trained_spread: float) -> dict:
    """The trained R@1 (%) against the raw-pixel baseline's: the difference against 3
    standard errors, SE^2 = the raw pixels' binomial SE^2 (one deterministic value) + the
    larger of the trained binomial SE and `trained_spread`, squared. Unlike the verdict, a
    `trained_spread` of 0 (not measured) does not refuse to conclude: the binomial SE alone
    is then used. Returns {"raw_pixels", "trained", "se", "beats", "line"}."""
    def binomial(r: float) -> float:
        return 100 * (r / 100 * (1 - r / 100) / n_eval) ** 0.5
    se = (binomial(raw) ** 2 + max(binomial(trained), trained_spread) ** 2) ** 0.5
    beats = trained - raw > 3 * se
    return {"raw_pixels": raw, "trained": trained, "se": se, "beats": bool(beats),
            "line": f"against raw pixels: retrieval R@1 (%) {raw:.1f} -> {trained:.1f}; "
                    f"{'beats them' if beats else 'does not beat them clearly'}: trained - raw "
                    f"> 3 SE = {3 * se:.1f}, difference {trained - raw:.1f}"}


# ---- 8. Main ----
def main(args: Args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = dist.init(args.device, cudnn_benchmark=True)  # fixed 3-D CNN shapes
    amp = optim.Amp(args.amp, device)
    args.output_dir = args.output_dir or time.strftime("runs/sce_video-%Y%m%d-%H%M%S")
    if not args.data and args.preset == "demo":
        dist.print0("no --data: running the demo preset on the embedded synthetic videos")
    dist.seed_all(args.seed)
    if dist.is_main():
        cli.save_args(args, args.output_dir)
    logger = log.Logger(args.output_dir)
    summary = {"method": "sce_video", "data": args.data or "synthetic-videos",
               "preset": args.preset, "metrics": {}}
    t0, step, results = time.time(), 0, {}
    if args.eval != "none" and not args.init_from:
        raise cli.InputError(f"--eval {args.eval} evaluates pretrained weights: give --init-from")
    if args.eval == "linear":
        res = supervised(args, device, amp, logger, linear=True)
        results["trained"] = {"linear_top1": res["top1"], "linear_top5": res["top5"]}
    elif args.eval == "finetune":
        results["trained"] = finetune_splits(args, device, amp, logger)
    elif args.eval == "retrieval":
        enc = build_backbone(args.depth, args.width).to(device).eval()
        load_encoder(enc, args.init_from)
        results["trained"] = retrieval_eval(enc, args, device, amp)
    else:
        model = build_model(args).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last_3d)
            if args.sync_bn and dist.is_dist():
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if args.compile:
            model.encoder.compile()
            model.target_encoder.compile()
        sce = model
        net = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) \
            if dist.is_dist() else model
        if args.bench:
            out = bench(net, sce, args, device, amp)
            dist.cleanup()
            return out
        step = pretrain(net, sce, args, device, amp, logger)
        if args.monitor_eval:
            results["trained"] = monitor(sce, args, device, amp)
            if args.eval_random_init:  # the same architecture at its initial weights
                torch.manual_seed(args.seed)
                results["random_init"] = monitor(build_model(args).to(device), args, device, amp)
                results["raw_pixels"] = monitor(None, args, device, amp)
                r1 = [results["random_init"]["R@1"]]
                for i in range(1, args.random_init_seeds):
                    torch.manual_seed(args.seed + i)
                    enc = build_model(args).encoder.to(device).eval()
                    r1.append(retrieval_eval(enc, args, device, amp)["R@1"])
                n_eval = len(read_split(args, False))
                summary["verdict"] = evaluate.verdict(
                    "retrieval R@1 (%)", r1, [results["trained"]["R@1"]], n_eval=n_eval,
                    trained_spread=args.trained_spread or None)
                summary["versus_raw_pixels"] = versus_raw_pixels(
                    results["raw_pixels"]["R@1"], results["trained"]["R@1"], n_eval,
                    args.trained_spread)
    summary.update(steps=step, seconds=round(time.time() - t0, 1))
    if results:
        n_val = len(read_split(args, False, args.ft_splits[0]))
        for res in results.values():  # binomial standard errors (percent) of accuracies
            for name in [k for k in list(res) if k.startswith(("knn_top1", "R@"))]:
                p = res[name] / 100
                res[f"{name}_se"] = 100 * (p * (1 - p) / n_val) ** 0.5
        cols = [c for c in ("raw_pixels", "random_init", "trained") if c in results]
        for name in results["trained"]:
            summary["metrics"][name] = {c: round(results[c][name], 3) for c in cols
                                        if name in results[c]}
        print_table(summary["metrics"], cols)
        if "verdict" in summary:
            dist.print0(summary["verdict"]["line"])
            dist.print0(summary["versus_raw_pixels"]["line"])
    if dist.is_main():
        with open(os.path.join(args.output_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
    dist.cleanup()
    return summary


def print_table(metrics: dict, cols: list) -> None:
    """One row per metric, one column per model; `<name>_se` shown as +- in its row."""
    dist.print0(f"{'metric':<14}" + "".join(f"{c:>20}" for c in cols))
    for name, vals in metrics.items():
        if name.endswith("_se"):
            continue
        se = metrics.get(f"{name}_se", {})
        cells = [(f"{vals[c]:.2f}" + (f" +- {se[c]:.2f}" if c in se else "")) if c in vals
                 else "-" for c in cols]
        dist.print0(f"{name:<14}" + "".join(f"{x:>20}" for x in cells))


def build_optimizer(sce: SCE, args: Args) -> tuple:
    """(LARS over the online branch's parameters, peak lr, global batch) of pretraining
    (App. B.1): momentum 0.9, weight decay and trust ratio on parameters of 2+ dims, peak lr
    base_lr x global batch / 256 (the linear scaling rule). `--bench` steps this one too."""
    global_batch = args.batch_size * dist.world() * args.accum_iter
    peak = args.base_lr * global_batch / 256
    params = [p for p in sce.parameters() if p.requires_grad]
    return optim.LARS(params, lr=peak, momentum=0.9, weight_decay=args.weight_decay), peak, \
        global_batch


def pretrain(net, sce: SCE, args: Args, device, amp: optim.Amp, logger: log.Logger) -> int:
    """The pretraining loop, keyed by the global step; returns the number of steps done."""
    ds = data.SafeDataset(PretrainClips(read_split(args, True), args, args.seed),
                          args.max_fail_fraction, "pretrain videos")
    opt, peak, global_batch = build_optimizer(sce, args)
    loop = training.Loop(make_loader(ds, args.batch_size, args, train=True), args.epochs,
                         {"model": sce, "optimizer": opt}, args, logger, amp,
                         max_steps=args.max_steps, accum_iter=args.accum_iter)
    warmup = min(args.warmup_epochs * loop.steps_per_epoch, loop.total_steps)
    dist.print0(f"{len(ds)} videos, {loop.steps_per_epoch} steps/epoch, global batch "
                f"{global_batch}, peak lr {peak:.4g}, amp {amp.mode}, output {args.output_dir}")
    loop.resume(args.resume)
    net.train()
    for c0, c1, _ in loop:
        lr = optim.cosine_schedule(loop.step, loop.total_steps, peak, warmup)
        optim.set_lr_wd(opt, lr)
        # EMA momentum m = 1 - (1 - m0)(cos(pi k / (S - 1)) + 1) / 2 (App. B.1, spec §7.5)
        m = optim.cosine_schedule(loop.step, max(loop.total_steps - 1, 1), args.ema_m0, final=1.0)
        out = train_step(net, [channels_last(c0, device), channels_last(c1, device)], opt, amp, m)
        loop.end_step(out, {"train/lr": lr, "train/ema_m": m})
    loop.check_replicas(sce, buffers=(sce.queue,))
    dist.broadcast_buffers(sce)
    if dist.is_main():  # the trunk alone, for --init-from
        torch.save(sce.encoder.state_dict(), os.path.join(args.output_dir, "backbone.pt"))
    return loop.step


def bench(net, sce: SCE, args: Args, device, amp: optim.Amp) -> dict:
    """--bench: the training step as `pretrain` runs it (the model as `main` prepared it:
    channels_last_3d, SyncBN and DDP on CUDA; the same LARS and its groups at the peak lr; clips
    copied as the loop copies them) on random clips at the configured shapes, and the loader.
    With --accum-iter n a call is one micro-batch and every n-th steps, as in training."""
    b, s = args.batch_size, args.crop_size
    clips = [channels_last(torch.randn(b, 3, args.num_frames, s, s), device) for _ in range(2)]
    opt = build_optimizer(sce, args)[0]
    net.train()
    ds = PretrainClips(read_split(args, True), args, args.seed)
    calls = [0]

    def step():
        amp.accum = (calls[0] % args.accum_iter, args.accum_iter)  # as training.Loop sets it
        calls[0] += 1
        return train_step(net, clips, opt, amp, args.ema_m0)
    return log.bench(step, b, device, amp_dtype=amp.dtype,
                     loader=make_loader(ds, b, args, train=True), depth=args.depth,
                     width=args.width, clip=f"{args.num_frames}x{s}", amp=amp.mode,
                     clips_per_sample=2)  # a sample is a video: two clips


if __name__ == "__main__":
    cli.run(main, Args, PRESETS)
