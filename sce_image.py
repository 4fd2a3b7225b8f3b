"""SCE: Similarity Contrastive Estimation for self-supervised image representation learning.

J. Denize, J. Rabarisoa, A. Orcesi, R. Hérault, S. Canu, "Similarity Contrastive Estimation
for Self-Supervised Soft Contrastive Learning", WACV 2023 (arXiv:2111.14585); thesis ch. 4 and
app. A (pseudo-code A.1), the source followed here.

Method in five lines: an online encoder+projector(+predictor) and a momentum (EMA) target
encoder+projector embed two augmented views. The target's similarities to a memory buffer of
past target embeddings, sharpened at temperature tau_m, give a soft distribution over the other
instances; mixed with the one-hot positive (weight lambda) it is the target of a cross-entropy
against the online similarities at temperature tau (Eqs. 4.5-4.10). lambda = 1 is MoCo's
InfoNCE; lambda = 0 is relational learning (ReSSL + the Ceil term, Prop. 1).

Launch:
    python sce_image.py                                   # CPU demo on the embedded synthetic images
    python sce_image.py --preset cifar10 --data ~/data/cifar     # 1 GPU
    torchrun --nproc_per_node=8 sce_image.py --data ~/data/imagenet  # Tab. 4.7 (batch 8 x 512)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        sce_image.py --preset imagenet-multicrop --data ~/data/imagenet
    python sce_image.py --eval-only --init-from runs/x/last.pt --preset cifar10 --data ~/data/cifar
    python sce_image.py --eval-only --init-from sce200.state_dict.pt --data ~/data/imagenet
        # the authors' released checkpoint, extracted as `load_encoder` says
Presets: cifar10, cifar100, stl10, tiny-imagenet, imagenet100, imagenet-baseline (Tab. 4.6
setting), imagenet (= the defaults, Tab. 4.7), imagenet-multicrop, demo.

Deviations, with reasons:
- Augmentations run per sample on the CPU (torchvision v2) rather than batched on the GPU as
  in eztorch: one readable pipeline, same distributions; the random draws of each sample come
  from (seed, epoch, index).
- Gaussian-blur kernel = the odd number nearest 10 % of the crop size (23 at 224 px, as the
  code), widened where that is shorter to hold +-3 sigma_max (2 ceil(3 x 2.0) + 1 = 13 taps,
  capped by the crop size): 10 % of 32 px is 5 taps, which blurs sigma = 2 like 1.3 (the
  variance of a blurred impulse is 1.66 instead of 4); with 13 taps it is 3.95. The SCE repo's
  CIFAR runs use a PIL blur of radius sigma instead.
- Normalisation with the ImageNet mean/std everywhere (eztorch's default; the older SCE repo
  used CIFAR-specific statistics).
- SGD applies weight decay to every parameter, as MoCo/eztorch; LARS excludes 1-D parameters
  from decay and adaptation (spec §7.6).
- CIFAR (32 px) linear probe: RandomCrop(32, padding 4) + flip (the SCE repo's code) instead
  of the thesis' RandomResizedCrop(0.08, 1) + padding 4. STL-10 and Tiny-ImageNet follow the
  thesis text (App. A.5.1; no official config exists for them): RandomResizedCrop(size,
  scale (0.08, 1)) + flip, resize to the dataset size for validation; the crop's aspect-ratio
  range (3/4, 4/3) and bilinear interpolation, which the thesis does not state, are
  torchvision's defaults. Which protocol applies is read from the crop size (<= 32 px small,
  <= 96 px medium, larger: the ImageNet protocol), as the thesis' dataset classes (Sec. 4.4.2).
- Checkpoints load with `weights_only=True` (DESIGN §5), where eztorch unpickles everything: a
  PyTorch Lightning file whose `hyper_parameters` hold pickled config objects is refused with
  a one-line command that extracts its `state_dict` (see `load_encoder`).
- The demo's linear probe is `common.evaluate.linear_probe` on frozen, pre-extracted features
  (no augmentation; `--no-lin-aug`) so that it fits the CPU budget; the thesis protocol
  (`--lin-aug`, the default) trains on augmented images.
- Shuffle-BN (SCE repo CIFAR config) is not implemented; SyncBN under DDP as eztorch.
- The `demo` preset (2 CPU cores, about 10 minutes) uses the CIFAR setting at 32 px but with
  the standard ResNet-18 stem (the small stem costs 8x more), batch 64, a 1024-key queue, m0
  0.99, bf16 autocast on the CPU, 30 epochs with 5 warmup epochs (1,860 steps; 12 epochs leave
  the linear probe below random init: the budget, not the method); it ends with the verdict of
  the linear probe, trained against 3 random initialisations (the trained spread from 3
  training seeds measured beforehand, `--trained-spread`). Its settings were checked on
  another draw of the synthetic images (`--synthetic-seed 1`), not the verdict's (seed 0).
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
import torchvision
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from common import (augment, checkpoint, cli, data, dist, evaluate, log, optim, synthetic,
                    training)


# ---- 2. Arguments ----
@dataclass
class Args:
    # run
    output_dir: str = ""
    """run folder (default runs/sce_image-<time>): args.json, log.jsonl, last.pt, summary.json"""
    seed: int = 0
    """random seed (per-sample augmentations derive from seed, epoch and index)"""
    epochs: int = 200
    """pretraining epochs (App. A.5)"""
    max_steps: int = 0
    """stop after this many optimiser steps (0: run all epochs; schedules still span all)"""
    log_every: int = 50
    """steps between log lines"""
    ckpt_every: int = 1000
    """steps between checkpoints (last.pt, atomic); also written at the end"""
    eval_every: int = 0
    """epochs between kNN monitors during training (0: only at the end)"""
    resume: str = ""
    """checkpoint to resume from (default: <output_dir>/last.pt when it exists)"""
    init_from: str = ""
    """weights to start from / to evaluate: a last.pt, or an exported backbone.pt"""
    eval_only: bool = False
    """skip pretraining: evaluate --init-from"""
    bench: bool = False
    """time the training step on random tensors and the data pipeline, print JSON, exit"""
    # data
    data: str = ""
    """dataset root (empty: the embedded synthetic images, demo preset)"""
    synthetic_seed: int = 0
    """seed of the embedded synthetic images (0: the demo's verdict; 1: the other split, on
    which the demo's hyper-parameters were chosen)"""
    dataset: Literal["imagefolder", "cifar10", "cifar100", "stl10"] = "imagefolder"
    """format of --data: ImageFolder root/{train,val}/<class>/*, or a torchvision dataset folder"""
    img_size: int = 224
    """crop size of the global views (Tab. A.2 'Input')"""
    crop_scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop scale range of the global views (Sec. 4.4, Tab. 4.1)"""
    local_sizes: tuple[int, ...] = ()
    """multi-crop local view sizes; scale of size s: crop_scale * s / img_size (spec §2)"""
    num_workers: int = 8
    """data loader workers per process"""
    max_fail_fraction: float = 0.05
    """stop when more than this fraction of the images is unreadable (one is always skipped)"""
    # model
    arch: Literal["resnet18", "resnet50"] = "resnet50"
    """backbone (App. A.5.1: ResNet-50 for large, ResNet-18 for small datasets)"""
    small_stem: bool = False
    """3x3 stride-1 first conv and no max-pool, for 32-96 px inputs (App. A.5.1)"""
    proj_hidden: tuple[int, ...] = (4096, 4096)
    """projector hidden widths (Tab. A.2; MoCo v3 projector for Tab. 4.7)"""
    proj_dim: int = 256
    """projector output dimension (Tab. A.2 'Out dim')"""
    proj_bn: Literal["no", "hid", "all"] = "all"
    """projector BN: none, after hidden layers, or also after the output (affine-free) (Tab. A.2)"""
    proj_last_bias: bool = False
    """bias on the projector's last Linear when no BN follows it (spec §1 table)"""
    pred_hidden: int = 4096
    """predictor hidden width, 0 for no predictor (Tab. 4.7 uses MoCo v3's 256-4096-256)"""
    sync_bn: bool = True
    """convert BatchNorm to SyncBatchNorm under DDP on CUDA (eztorch runs, spec §7.4)"""
    # method
    lam: float = 0.5
    """lambda: weight of the one-hot positive in the target distribution (Eq. 4.8)"""
    tau: float = 0.1
    """online temperature (Eq. 4.9)"""
    tau_m: float = 0.07
    """target (momentum) temperature (Eq. 4.5)"""
    queue_size: int = 65536
    """memory buffer size M (Tab. A.2 'Buffer')"""
    in_batch_negatives: bool = False
    """also use the other keys of the batch as instances (off in every official config)"""
    mask_positive: bool = False
    """thesis Eq. 4.5: s_ii = 0 exactly; default: the code's relational logit 0 (spec §7.1)"""
    symmetric: bool = True
    """symmetrised loss: each global view is a query for the other's key (Sec. 4.4.3); off:
    view 0 is the only key and every other view a query (spec §1)"""
    aug_view0: Literal["weak", "strong", "strong-alpha", "strong-beta", "strong-gamma"] = "strong-alpha"
    """augmentation of view 0 (the target view when not symmetric) (Tab. 4.1, 4.4)"""
    aug_view1: Literal["weak", "strong", "strong-alpha", "strong-beta", "strong-gamma"] = "strong-beta"
    """augmentation of view 1 (the online view when not symmetric) (Tab. 4.1, 4.4)"""
    aug_local: Literal["weak", "strong", "strong-alpha", "strong-beta", "strong-gamma"] = "strong-gamma"
    """augmentation of the multi-crop local views (spec §2)"""
    ema_m0: float = 0.99
    """initial EMA momentum, cosine to 1 per step (App. A.5.2; 0.996 for 1000 epochs)"""
    # optimisation
    optimizer: Literal["sgd", "lars"] = "lars"
    """SGD momentum 0.9 (App. A.5.1) or LARS (App. A.5.2)"""
    base_lr: float = 0.3
    """learning rate for a global batch of 256 (linear scaling rule)"""
    batch_size: int = 512
    """batch size per process (Tab. 4.7: 4096 = 8 GPUs x 512)"""
    weight_decay: float = 1e-6
    """weight decay (App. A.5.2; 1.5e-6 for 1000 epochs)"""
    warmup_epochs: int = 10
    """linear lr warmup from 0, per step (App. A.5)"""
    accum_iter: int = 1
    """gradient accumulation: micro-batches per optimiser step; the lr follows the effective
    batch batch x GPUs x accum_iter (keys buffered and enqueued once per step, EMA per step, as
    eztorch; BatchNorm sees micro-batches)"""
    # system
    device: str = "auto"
    """cpu, cuda, cuda:N or auto"""
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"
    """autocast dtype (auto: bf16 on CUDA, none on CPU); the loss always runs in fp32. On
    CUDA, fp32 matmuls and convolutions use TF32 and cuDNN autotunes the convolutions"""
    compile: bool = False
    """torch.compile the encoders"""
    # evaluation
    knn_k: tuple[int, ...] = (20, 200)
    """k of the weighted kNN monitor (Sec. 2.4)"""
    knn_t: float = 0.07
    """temperature of the weighted kNN monitor"""
    lin_aug: bool = True
    """thesis linear probe on augmented images (App. A.5.1); off: quick probe on frozen features"""
    lin_epochs: int = 100
    """linear probe epochs (App. A.5.1: 100; ImageNet protocol: 90)"""
    lin_lr: float = 30.0
    """linear probe lr (App. A.5.1: 30, x0.1 at 60 % and 80 %); with cosine: x global batch/256"""
    lin_schedule: Literal["step", "cosine"] = "step"
    """linear probe lr schedule (App. A.5.1: step; ImageNet MoCo v3 protocol: cosine)"""
    lin_batch_size: int = 256
    """linear probe batch size per process"""
    eval_random_init: bool = False
    """also evaluate randomly initialised encoders, side by side, and give the verdict"""
    random_init_seeds: int = 1
    """random initialisations evaluated (seeds --seed, +1, ...; the demo: 3, the verdict's
    random-init spread)"""
    trained_spread: float = 0.0
    """std of the linear top-1 over >= 3 training seeds, measured beforehand (the demo: the
    README's table), for a one-run verdict; 0: none"""
    preset: str = ""
    """the preset applied (set by --preset)"""


_SMALL = dict(arch="resnet18", small_stem=True, proj_hidden=(512,), proj_dim=128, proj_bn="hid",
              proj_last_bias=True, pred_hidden=0, optimizer="sgd", base_lr=0.06, batch_size=256,
              weight_decay=5e-4, warmup_epochs=5, symmetric=False, aug_view0="weak",
              aug_view1="strong", sync_bn=False, num_workers=8)  # Tab. A.2 rows R-18
PRESETS = {
    "cifar10": dict(_SMALL, dataset="cifar10", img_size=32, queue_size=4096, ema_m0=0.9,
                    tau=0.2, tau_m=0.1),  # Tab. 4.6: 90.3
    "cifar100": dict(_SMALL, dataset="cifar100", img_size=32, queue_size=4096, ema_m0=0.9,
                     tau=0.1, tau_m=0.08),  # 65.5
    "stl10": dict(_SMALL, dataset="stl10", img_size=96, queue_size=16384, ema_m0=0.996,
                  tau=0.1, tau_m=0.04),  # 89.9
    "tiny-imagenet": dict(_SMALL, img_size=64, queue_size=16384, ema_m0=0.996, tau=0.1,
                          tau_m=0.07),  # 51.9
    "imagenet100": dict(proj_hidden=(4096,), proj_dim=256, proj_bn="no", proj_last_bias=True,
                        pred_hidden=0, optimizer="sgd", base_lr=0.3, batch_size=64,
                        weight_decay=1e-4, warmup_epochs=5, symmetric=False, aug_view0="weak",
                        aug_view1="strong", ema_m0=0.996),  # 8 x 64 = 512; Tab. 4.6: 83.4
    "imagenet-baseline": dict(proj_hidden=(2048, 2048), proj_dim=256, proj_bn="all",
                              pred_hidden=0, optimizer="sgd", base_lr=0.5, batch_size=64,
                              weight_decay=1e-4, warmup_epochs=5, symmetric=False,
                              aug_view0="weak", aug_view1="strong", ema_m0=0.996,
                              lin_epochs=90, lin_lr=0.1, lin_schedule="cosine",
                              lin_batch_size=128),  # Tab. 4.6: 70.5
    "imagenet": dict(lin_epochs=90, lin_lr=0.1, lin_schedule="cosine",
                     lin_batch_size=128),  # Tab. 4.7, 200 epochs: 72.7
    "imagenet-multicrop": dict(local_sizes=(192, 160, 128, 96), batch_size=256, lin_epochs=90,
                               lin_lr=0.1, lin_schedule="cosine",
                               lin_batch_size=128),  # 2 nodes x 8 x 256; Tab. 4.8: 75.4
    # CPU demo (2 cores, about 10 min): the synthetic shapes at 32 px with the standard
    # ResNet-18 stem (the small stem costs 8x more here) and bf16 autocast on the CPU; 30 epochs
    # of the 4,000 images (1,860 steps), 5 warmup; the verdict on the linear probe against 3
    # random inits, with the trained spread of 3 training seeds (README)
    "demo": dict(_SMALL, img_size=32, small_stem=False, epochs=30, warmup_epochs=5,
                 queue_size=1024, batch_size=64, ema_m0=0.99, tau=0.1, tau_m=0.07, amp="bf16",
                 num_workers=1, log_every=20, ckpt_every=500, lin_aug=False,
                 eval_random_init=True, random_init_seeds=3, trained_spread=1.5),  # std of 3 seeds
}


# ---- 3. Data ----
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Tab. 4.1: (colour-jitter saturation, grayscale p, blur p, solarize p); jitter p = 0.8 with
# brightness 0.4, contrast 0.4, hue 0.1 whenever it is applied.
AUGS = {"weak": (None, 0.0, 0.0, 0.0), "strong": (0.4, 0.2, 0.5, 0.0),
        "strong-alpha": (0.2, 0.2, 1.0, 0.0), "strong-beta": (0.2, 0.2, 0.1, 0.2),
        "strong-gamma": (0.2, 0.2, 0.5, 0.2)}


def pretrain_transform(kind: str, size: int, scale: tuple) -> v2.Compose:
    """One view of Tab. 4.1: RandomResizedCrop, colour jitter, grayscale, blur, solarize, flip."""
    saturation, gray_p, blur_p, solarize_p = AUGS[kind]
    ops = [v2.ToImage(), v2.RandomResizedCrop(size, scale=scale, ratio=(3 / 4, 4 / 3),
                                              antialias=True),
           v2.ToDtype(torch.float32, scale=True)]
    if saturation is not None:
        ops.append(v2.RandomApply([v2.ColorJitter(0.4, 0.4, saturation, 0.1)], p=0.8))
    if gray_p:
        ops.append(v2.RandomGrayscale(p=gray_p))
    if blur_p:  # sigma ~ U[0.1, 2.0] (Tab. 4.1, spec §2)
        ops.append(v2.RandomApply([v2.GaussianBlur(augment.blur_kernel(size), sigma=(0.1, 2.0))],
                                  p=blur_p))
    if solarize_p:
        ops.append(v2.RandomSolarize(threshold=0.5, p=solarize_p))
    ops += [v2.RandomHorizontalFlip(0.5), v2.Normalize(MEAN, STD)]
    return v2.Compose(ops)



def eval_transform(size: int, train: bool = False) -> v2.Compose:
    """Linear-probe / kNN transforms (App. A.5.1, spec §5), by the thesis' dataset classes
    (Sec. 4.4.2), told apart by the crop size `size`:
    - small (CIFAR, <= 32 px): train RandomCrop(size, padding 4) + flip (the SCE repo's code);
    - medium (Tiny-ImageNet 64 px, STL-10 96 px): train RandomResizedCrop(size, scale
      (0.08, 1)) + flip; small and medium evaluate resized to the dataset size;
    - large (ImageNet): train RandomResizedCrop(size, (0.08, 1)) + flip; evaluate: short side
      resized to 256/224 x size, centre crop of size.
    Returns (3, size, size) float tensors normalised with the ImageNet mean/std."""
    if train:
        crop = ([v2.Resize((size, size), antialias=True), v2.RandomCrop(size, padding=4)]
                if size <= 32 else [v2.RandomResizedCrop(size, scale=(0.08, 1.0), antialias=True)])
        ops = crop + [v2.RandomHorizontalFlip(0.5)]
    else:
        ops = ([v2.Resize((size, size), antialias=True)] if size <= 96
               else [v2.Resize(size * 256 // 224, antialias=True), v2.CenterCrop(size)])
    return v2.Compose([v2.ToImage(), *ops, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(MEAN, STD)])


def base_dataset(args: Args, split: str) -> Dataset:
    """The raw (PIL image, label) dataset of `split` in {"pretrain", "train", "val"}."""
    root = args.data or str(synthetic.images(seed=args.synthetic_seed))
    if args.dataset == "imagefolder":
        return data.image_folder(os.path.join(root, "val" if split == "val" else "train"))
    tv_split = {"pretrain": "train", "train": "train", "val": "test"}[split]
    if args.dataset == "stl10" and split == "pretrain":
        tv_split = "unlabeled"  # spec §5: STL10 pretrains on the 100k unlabeled images
    return data.torchvision_dataset(args.dataset, root, tv_split)


class Views(Dataset):
    """Applies a list of transforms to one image; the draws come from (seed, epoch, index).

    Keys are `(epoch, index)` from `ResumableSampler(with_epoch=True)`, or plain indices.
    Returns (list of views, label, index).
    """

    def __init__(self, base: Dataset, transforms: list, seed: int):
        self.base, self.transforms, self.seed = base, transforms, seed
        self.samples = getattr(base, "samples", None)  # file names for SafeDataset's messages

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = data.split_key(key)
        img, label = self.base[index]
        with data.sample_seeded(self.seed, epoch, index):  # v2 draws from the global RNG
            views = [t(img) for t in self.transforms]
        return views, label, index


def pretrain_views(args: Args) -> list:
    """Global views (view 0, view 1) then the local views, each with its transform (spec §2)."""
    ts = [pretrain_transform(args.aug_view0, args.img_size, args.crop_scale),
          pretrain_transform(args.aug_view1, args.img_size, args.crop_scale)]
    for s in args.local_sizes:
        scale = tuple(c * s / args.img_size for c in args.crop_scale)
        ts.append(pretrain_transform(args.aug_local, s, scale))
    return ts


def make_loader(ds: Dataset, batch_size: int, args: Args, train: bool) -> DataLoader:
    """Shuffled full batches keyed (epoch, index) for training; every sample once, in order,
    for evaluation (also under DDP); the loader's own generator (`data.make_loader`)."""
    return data.make_loader(ds, batch_size, train, args.seed, args.num_workers)


# ---- 4. Model ----
def build_backbone(args: Args) -> nn.Module:
    """torchvision ResNet without fc; small stem for 32-96 px inputs (App. A.5.1)."""
    net = getattr(torchvision.models, args.arch)(weights=None)
    if args.small_stem:
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def mlp(in_dim: int, hidden: tuple, out_dim: int, bn: str, last_bias: bool) -> nn.Sequential:
    """Linear(+BN+ReLU) per hidden width, then Linear (+ affine-free BN when bn == "all").
    A Linear followed by BN has no bias (spec §1 table)."""
    layers, d = [], in_dim
    for h in hidden:
        layers += [nn.Linear(d, h, bias=bn == "no")]
        layers += [nn.BatchNorm1d(h)] if bn != "no" else []
        layers += [nn.ReLU(inplace=True)]
        d = h
    layers.append(nn.Linear(d, out_dim, bias=last_bias and bn != "all"))
    if bn == "all":
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


class SCE(nn.Module):
    """Online encoder/projector/predictor, EMA target encoder/projector, memory buffer.

    `forward(views) -> (loss, keys)`: one call per step so that DDP sees the whole online pass.
    views: global views 0 and 1, (B, 3, H, W), then the local views, (B, 3, h, w). Symmetric:
    keys of both global views, every other view a query for each; keys (2B, D). Non-symmetric:
    the key of view 0, views 1.. its queries; keys (B, D). The keys are what `enqueue` takes.
    """

    def __init__(self, args: Args):
        super().__init__()
        self.args = args
        self.encoder = build_backbone(args)
        self.projector = mlp(self.encoder.feat_dim, args.proj_hidden, args.proj_dim,
                             args.proj_bn, args.proj_last_bias)
        self.predictor = (mlp(args.proj_dim, (args.pred_hidden,), args.proj_dim, "hid", False)
                          if args.pred_hidden else nn.Identity())
        self.target_encoder = copy.deepcopy(self.encoder)  # initialised as the online weights
        self.target_projector = copy.deepcopy(self.projector)
        for p in [*self.target_encoder.parameters(), *self.target_projector.parameters()]:
            p.requires_grad = False
        # Memory buffer: normalised random init, FIFO (spec §1, §7.3); one vector per row. Drawn
        # from its own generator so that every DDP rank starts with the same buffer.
        g = torch.Generator().manual_seed(args.seed)
        self.register_buffer("queue", F.normalize(
            torch.randn(args.queue_size, args.proj_dim, generator=g), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.pending = []  # keys of this step's micro-batches (--accum-iter); empty between steps

    def online(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, D)
        return F.normalize(self.predictor(self.projector(self.encoder(x))), dim=1)

    @torch.no_grad()
    def target(self, x: torch.Tensor) -> torch.Tensor:  # (B, D), no gradient (Alg. A.1 l. 34)
        return F.normalize(self.target_projector(self.target_encoder(x)), dim=1)

    def forward(self, views: list):
        a = self.args
        # Each view is forwarded on its own, so BN statistics are per view (spec §7.4).
        queue = self.queue.clone()  # both symmetric terms see the old buffer (spec §7.3)
        kw = dict(lam=a.lam, tau=a.tau, tau_m=a.tau_m, in_batch=a.in_batch_negatives,
                  mask_positive=a.mask_positive)
        if a.symmetric:  # mean over pairs (query j, key i), i != j, keys global (Sec. 4.4.3)
            keys = [self.target(v) for v in views[:2]]
            queries = [self.online(v) for v in views]
            pairs = [(j, i) for i in range(2) for j in range(len(views)) if i != j]
            loss = sum(sce_loss(queries[j], keys[i], queue, **kw) for j, i in pairs) / len(pairs)
            return loss, torch.cat(keys)
        # Non-symmetric: view 0 (weak) is the only key; view 1 (strong) and every local view
        # are queries, loss averaged over them (spec §1; eztorch `training_step`, sym=False).
        key = self.target(views[0])
        loss = sum(sce_loss(self.online(v), key, queue, **kw) for v in views[1:])
        return loss / (len(views) - 1), key

    def enqueue(self, keys: torch.Tensor) -> None:
        """FIFO update with the keys of every rank, after the loss (Alg. A.1 l. 50-52)."""
        optim.enqueue(self.queue, self.queue_ptr, keys, "--queue-size",
                      "views x batch x world x accum-iter, as in the official code")


def build_model(args: Args) -> SCE:
    return SCE(args)


# ---- 5. Loss ----
def sce_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, lam: float = 0.5,
             tau: float = 0.1, tau_m: float = 0.07, in_batch: bool = False,
             mask_positive: bool = False) -> torch.Tensor:
    """SCE loss (Eqs. 4.5-4.10, Alg. A.1 `sce_loss`), in fp32.

    q: (B, D) L2-normalised online predictions; k: (B, D) L2-normalised target projections
    (no grad); queue: (M, D) memory buffer. Distributions are over [positive, queue] (1 + M).
    The positive gets a relational logit of 0 as in the official code and Alg. A.1 (spec
    §7.1), or -inf with `mask_positive` (Eq. 4.5, where Prop. 1 holds exactly); `in_batch`
    also puts the batch's other keys in both distributions.
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = q.float(), k.float(), queue.float()
        pos = (q * k).sum(1, keepdim=True)  # (B, 1): z1_i . z2_i
        sim_q, sim_k = q @ queue.T, k @ queue.T  # (B, M)
        if in_batch:  # other keys of the batch as extra instances; self excluded
            off = torch.eye(len(q), dtype=torch.bool, device=q.device)
            sim_q = torch.cat([(q @ k.T).masked_fill(off, -1e9), sim_q], 1)
            sim_k = torch.cat([(k @ k.T).masked_fill(off, -1e9), sim_k], 1)
        logits_q = torch.cat([pos, sim_q], 1) / tau  # Eq. 4.9: p1 = softmax(logits_q)
        logits_k = torch.cat([torch.zeros_like(pos), sim_k], 1) / tau_m  # Eq. 4.5 (logit 0)
        if mask_positive:
            logits_k[:, 0] = -torch.inf  # s_ii = 0 exactly (Eq. 4.5)
        w = (1 - lam) * logits_k.softmax(1)  # Eq. 4.8: w2 = lam * one_hot + (1 - lam) * s2
        w[:, 0] += lam
        return -(w * logits_q.log_softmax(1)).sum(1).mean()  # Eq. 4.10: cross-entropy


# ---- 6. Training step ----
def train_step(model, views: list, optimizer, amp: optim.Amp, momentum: float) -> dict:
    """Forward, SCE loss, backward and step, then EMA of the target and the FIFO update. With
    --accum-iter the keys of the step's micro-batches are buffered and enqueued once, after the
    optimiser step (eztorch, spec §7.3), and the EMA follows the optimiser steps."""
    with amp.autocast():
        loss, keys = model(views)
    amp.step(loss, optimizer)
    sce = checkpoint.unwrap(model)
    sce.pending.append(keys)
    if amp.stepped:
        optim.ema_update(sce.target_encoder, sce.encoder, momentum, copy_buffers=False)  # Eq. 4.2
        optim.ema_update(sce.target_projector, sce.projector, momentum, copy_buffers=False)
        sce.enqueue(torch.cat(sce.pending))
        sce.pending.clear()
    return {"loss": loss.detach()}


# ---- 7. Evaluation ----
class Indexed(Dataset):
    """(transformed image, label, index): the index lets DDP feature extraction re-order."""

    def __init__(self, base: Dataset, transform, seed: int = 0):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key):
        epoch, i = data.split_key(key)
        img, label = self.base[i]
        with data.sample_seeded(self.seed, epoch, i):  # train-time augmentation
            return self.transform(img), label, i


def knn_eval(encoder: nn.Module, args: Args, device, amp) -> dict:
    """Weighted kNN on the encoder's pooled features (train split as the bank)."""
    loaders = [make_loader(Indexed(base_dataset(args, s), eval_transform(args.img_size)),
                           args.lin_batch_size, args, train=False) for s in ("train", "val")]
    was_training = encoder.training
    encoder.eval()
    (ftr, ytr), (fva, yva) = [evaluate.extract_features(encoder, ld, device, amp) for ld in loaders]
    encoder.train(was_training)
    out = evaluate.knn_classify(ftr, ytr, fva, yva, int(ytr.max()) + 1, args.knn_k, args.knn_t)
    if not args.lin_aug:  # quick probe on the same frozen features
        out.update(evaluate.linear_probe(ftr, ytr, fva, yva, int(ytr.max()) + 1, seed=args.seed))
    return out


@torch.no_grad()
def view_retrieval(encoder: nn.Module, args: Args, device, amp,
                   sce: "SCE | None" = None) -> dict:
    """The pretext on held-out data (level 1): each validation image gives its two
    pretraining views (view 0 and view 1 transforms, drawn from (seed + 1, 0, index), so every
    encoder sees the same pairs); `view_top1` is the percentage of second views whose most
    cosine-similar first view, among all N, is their own (chance 100 / N), on the encoder's
    pooled features (B, D); `view_top1_se` its binomial standard error.

    With `sce` (the whole model, whose `encoder` is `encoder`), also `view_loss`: the SCE loss
    (Eq. 4.10) of each second view's online prediction against its first view's target key,
    with the other N - 1 validation keys as the memory buffer, averaged over the N images
    (`view_loss_se`: standard error of that mean). The data are ones the run never trained on."""
    t0, t1 = pretrain_views(args)[:2]
    pairs = Indexed(base_dataset(args, "val"), lambda img: torch.stack([t0(img), t1(img)]),
                    args.seed + 1)  # (2, 3, S, S) per image
    loader = make_loader(pairs, args.lin_batch_size, args, train=False)
    module = sce if sce is not None else encoder
    was_training = module.training
    module.eval()

    def feats(x):  # (B, 2, 3, S, S) -> (B, 2 D [+ 2 P]): pooled features [, query, key]
        out = [encoder(x[:, 0]), encoder(x[:, 1])]
        if sce is not None:
            out += [sce.online(x[:, 1]), sce.target(x[:, 0])]
        return torch.cat(out, 1)
    f, _ = evaluate.extract_features(feats, loader, device, amp)
    module.train(was_training)
    d = (f.shape[1] - (2 * args.proj_dim if sce is not None else 0)) // 2
    f1, f2 = F.normalize(f[:, :d], dim=1), F.normalize(f[:, d:2 * d], dim=1)
    same = torch.arange(len(f), device=f.device)
    hit = ((f2 @ f1.T).argmax(1) == same).double().mean().item()
    out = {"view_top1": 100 * hit, "view_top1_se": 100 * (hit * (1 - hit) / len(f)) ** 0.5}
    if sce is not None:
        p = args.proj_dim
        q, k = f[:, 2 * d:2 * d + p], f[:, 2 * d + p:]
        loss = torch.stack([sce_loss(q[i:i + 1], k[i:i + 1], torch.cat([k[:i], k[i + 1:]]),
                                     args.lam, args.tau, args.tau_m) for i in range(len(f))])
        out.update(view_loss=loss.mean().item(),
                   view_loss_se=(loss.std() / len(f) ** 0.5).item() if len(f) > 1 else 0.0)
    return out


def linear_eval(encoder: nn.Module, args: Args, device, amp, logger: log.Logger,
                name: str = "trained") -> dict:
    """Thesis linear probe (App. A.5.1 / MoCo v3 protocol for ImageNet): frozen encoder in
    eval mode, a Linear layer trained with SGD (momentum 0.9, no wd) on augmented images.
    Checkpointed in `<output-dir>/linear.pt` (`linear-<name>.pt` for the other encoders) and
    resumed bitwise, unless that file started from other encoder weights (then refused)."""
    source = f"encoder weights {checkpoint.fingerprint(encoder.state_dict())}"
    train_ds = data.SafeDataset(Indexed(base_dataset(args, "train"),
                                        eval_transform(args.img_size, train=True), args.seed),
                                args.max_fail_fraction, "linear-probe images")
    val_ds = Indexed(base_dataset(args, "val"), eval_transform(args.img_size))
    n_cls = len(train_ds.dataset.base.classes)
    head = nn.Linear(encoder.feat_dim, n_cls).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    head_ddp = nn.parallel.DistributedDataParallel(head) if dist.is_dist() else head
    lr = args.lin_lr * (args.lin_batch_size * dist.world() / 256 if args.lin_schedule == "cosine" else 1)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    loader = make_loader(train_ds, args.lin_batch_size, args, train=True)
    loop = training.Loop(loader, args.lin_epochs, {"model": head, "optimizer": opt}, args,
                         logger, amp, source=source, batch_flag="--lin-batch-size",
                         ckpt_name="linear.pt" if name == "trained" else f"linear-{name}.pt",
                         desc="linear", prefix="linear", resume_flag=None)
    loop.resume()
    encoder.eval()
    for x, y, _ in loop:
        if args.lin_schedule == "cosine":
            lr_now = optim.cosine_schedule(loop.step, loop.total_steps, lr)
        else:  # x0.1 at 60 % and 80 % of training (epochs 60 and 80 of 100)
            lr_now = lr * 0.1 ** ((loop.epoch >= 0.6 * args.lin_epochs)
                                  + (loop.epoch >= 0.8 * args.lin_epochs))
        optim.set_lr_wd(opt, lr_now)
        with torch.no_grad(), amp.autocast():
            feats = encoder(x.to(device, non_blocking=True))
        loss = F.cross_entropy(head_ddp(feats.float()), y.to(device))
        amp.step(loss, opt)
        loop.end_step({"loss": loss.detach()}, {"linear/lr": lr_now})
    correct = torch.zeros(2, device=device)
    with torch.no_grad():  # the evaluation loader gives each rank a share, no repeats
        for x, y, _ in make_loader(val_ds, args.lin_batch_size, args, train=False):
            with amp.autocast():
                pred = head(encoder(x.to(device)).float()).argmax(1)
            correct += torch.stack([(pred == y.to(device)).sum(), torch.tensor(len(y), device=device)])
    correct = dist.all_reduce(correct, "sum")  # each validation image counted exactly once
    return {"linear_top1": 100.0 * (correct[0] / correct[1]).item()}


def evaluate_encoder(encoder: nn.Module, args: Args, device, amp, logger: log.Logger,
                     name: str = "trained", sce: "SCE | None" = None) -> dict:
    """Held-out pretext (`view_retrieval`, with the loss when `sce` is given), kNN and the
    linear probe of `encoder`."""
    out = {**view_retrieval(encoder, args, device, amp, sce),
           **knn_eval(encoder, args, device, amp)}
    if args.lin_aug:
        out.update(linear_eval(encoder, args, device, amp, logger, name))
    return out


def load_encoder(encoder: nn.Module, path: str) -> None:
    """Load the backbone weights of `path` into `encoder` (strict), whatever the layout:
    - our `last.pt` (`{"model": {"encoder.*", "target_encoder.*", ...}, ...}`) or `backbone.pt`;
    - a torchvision ResNet state dict (`fc.*`, if present, is dropped);
    - the authors' eztorch / SCE-repo files: a PyTorch Lightning checkpoint
      `{"state_dict": {"trunk.*", "momentum_trunk.*", "projector.*", "momentum_projector.*",
      "predictor.*", "queue", "queue_ptr"}, "hyper_parameters": ..., ...}`, or its `state_dict`
      alone. The online `trunk.*` is loaded, as eztorch's linear evaluation does (its default
      `trunk_pattern`, the prefix `trunk.`, which no SCE evaluation config overrides).
    Files are read with `weights_only=True`. A Lightning file whose `hyper_parameters` hold
    pickled config objects is refused (`checkpoint.CheckpointError`) with the command that
    extracts its `state_dict` once, in a session that trusts the file."""
    sd = checkpoint.read_weights(path)
    # ours (online encoder); eztorch's online trunk, bare or inside a model wrapper; never
    # the momentum (target) trunk
    sd, _ = checkpoint.strip_prefix(sd, ("encoder.", "trunk.model.", "trunk."),
                                    ignore=("momentum_trunk.", "target_encoder."))
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}  # torchvision's classifier
    checkpoint.load_model(encoder, sd, strict=True, what=path)


# ---- 8. Main ----
def main(args: Args) -> dict:
    device = dist.init(args.device, cudnn_benchmark=True)  # fixed crop sizes in pretraining
    amp = optim.Amp(args.amp, device)
    args.output_dir = args.output_dir or time.strftime("runs/sce_image-%Y%m%d-%H%M%S")
    if not args.data and args.preset == "demo":
        dist.print0("no --data: running the demo preset on the embedded synthetic images")
    dist.seed_all(args.seed)
    if dist.is_main():
        cli.save_args(args, args.output_dir)
    logger = log.Logger(args.output_dir)

    model = build_model(args).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        if args.sync_bn and dist.is_dist():
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:
        model.encoder.compile()
        model.target_encoder.compile()
    if args.init_from:
        load_encoder(model.encoder, args.init_from)
        model.target_encoder.load_state_dict(model.encoder.state_dict())
    sce = model
    if dist.is_dist():
        model = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)

    summary = {"method": "sce_image", "data": args.data or "synthetic-images",
               "preset": args.preset, "metrics": {}}
    t0 = time.time()
    step = 0
    if args.bench:
        result = bench(model, sce, args, device, amp)
        dist.cleanup()
        return result
    if not args.eval_only:
        step = pretrain(model, sce, args, device, amp, logger)
    summary.update(steps=step, seconds=round(time.time() - t0, 1))
    dist.broadcast_buffers(sce)  # rank 0's BN statistics on every rank's evaluation share

    results = {"trained": evaluate_encoder(sce.encoder, args, device, amp, logger, sce=sce)}
    for i in range(args.random_init_seeds if args.eval_random_init else 0):
        torch.manual_seed(args.seed + i)  # the same architecture at its initial weights
        rand = build_model(args).to(device)
        name = "random_init" + (f"_{i + 1}" if i else "")
        results[name] = evaluate_encoder(rand.encoder, args, device, amp, logger, name, sce=rand)
    if args.eval_random_init and not args.lin_aug:  # kNN and the probe on the raw pixels
        results["pixels"] = knn_eval(nn.Flatten(), args, device, amp)
    n_val = len(base_dataset(args, "val"))
    for res in results.values():  # binomial standard errors of the accuracies (percent)
        for name in [k for k in res if k.startswith(("knn_top1", "linear_top1"))]:
            p = res[name] / 100
            res[f"{name}_se"] = 100 * (p * (1 - p) / n_val) ** 0.5
    for name in results["trained"]:
        summary["metrics"][name] = {k: round(v[name], 2) for k, v in results.items() if name in v}
    dist.print0(f"{'metric':<16}" + "".join(f"{k:>14}" for k in reversed(results)))
    for name, vals in summary["metrics"].items():
        dist.print0(f"{name:<16}" + "".join(f"{vals[k]:>14.2f}" if k in vals else f"{'-':>14}"
                                            for k in reversed(results)))
    if args.eval_random_init and "linear_top1" in results["trained"]:  # DESIGN §3
        summary["verdict"] = evaluate.verdict(
            "linear top-1 (%)", [v["linear_top1"] for k, v in results.items()
                                 if k.startswith("random_init")],
            [results["trained"]["linear_top1"]], n_val, args.trained_spread or None)
        dist.print0(summary["verdict"]["line"])
    if dist.is_main():
        with open(os.path.join(args.output_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
    dist.cleanup()
    return summary


def make_optimizer(sce: SCE, args: Args, lr: float) -> torch.optim.Optimizer:
    """LARS (momentum 0.9, biases and BN excluded from its adaptation and weight decay) or SGD
    with momentum 0.9, over the trainable parameters (App. A.5)."""
    params = [p for p in sce.parameters() if p.requires_grad]
    if args.optimizer == "lars":
        return optim.LARS(params, lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=args.weight_decay)


def to_device(views: list, device) -> list:
    """Each (B, 3, H, W) view copied without blocking, channels_last on CUDA."""
    views = [v.to(device, non_blocking=True) for v in views]
    if device.type == "cuda":
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views


def pretrain(model, sce: SCE, args: Args, device, amp: optim.Amp, logger: log.Logger) -> int:
    """The training loop, keyed by the global step; returns the number of steps done."""
    ds = data.SafeDataset(Views(base_dataset(args, "pretrain"), pretrain_views(args), args.seed),
                          args.max_fail_fraction, "pretrain images")
    loader = make_loader(ds, args.batch_size, args, train=True)
    global_batch = args.batch_size * dist.world() * args.accum_iter
    peak_lr = args.base_lr * global_batch / 256  # linear scaling rule (App. A.5)
    opt = make_optimizer(sce, args, peak_lr)
    loop = training.Loop(loader, args.epochs, {"model": sce, "optimizer": opt}, args, logger,
                         amp, max_steps=args.max_steps, accum_iter=args.accum_iter)
    warmup = min(args.warmup_epochs * loop.steps_per_epoch, loop.total_steps)
    dist.print0(f"{len(ds)} images, {loop.steps_per_epoch} steps/epoch, global batch "
                f"{global_batch}, peak lr {peak_lr:.4g}, amp {amp.mode}, output {args.output_dir}")
    loop.resume(args.resume)
    model.train()
    for views, _, _ in loop:
        lr = optim.cosine_schedule(loop.step, loop.total_steps, peak_lr, warmup)
        optim.set_lr_wd(opt, lr)
        # EMA momentum: m = 1 - (1 - m0)(cos(pi k / (S - 1)) + 1) / 2 (App. A.5, spec §7.5)
        m = optim.cosine_schedule(loop.step, max(loop.total_steps - 1, 1), args.ema_m0, final=1.0)
        out = train_step(model, to_device(views, device), opt, amp, m)
        loop.end_step(out, {"train/lr": lr, "train/ema_m": m})
        if args.eval_every and loop.epoch_end and (loop.epoch + 1) % args.eval_every == 0:
            dist.broadcast_buffers(sce.encoder)  # BN statistics differ by rank
            logger.log(loop.step, {f"knn/{k}": v for k, v in
                                   knn_eval(sce.encoder, args, device, amp).items()})
    loop.check_replicas(sce, buffers=(sce.queue,))  # weights, target, queue
    if dist.is_main():  # the backbone alone, loadable into torchvision.models.<arch>()
        torch.save(sce.encoder.state_dict(), os.path.join(args.output_dir, "backbone.pt"))
    return loop.step


def bench(model, sce: SCE, args: Args, device, amp: optim.Amp) -> dict:
    """--bench: the training step (its optimiser, channels_last on CUDA) on random views at
    the configured shapes, and the loader."""
    b = args.batch_size
    sizes = [args.img_size] * 2 + list(args.local_sizes)
    views = to_device([torch.randn(b, 3, s, s) for s in sizes], device)
    opt = make_optimizer(sce, args, args.base_lr * b * dist.world() / 256)
    model.train()
    ds = Views(base_dataset(args, "pretrain"), pretrain_views(args), args.seed)
    return log.bench(lambda: train_step(model, views, opt, amp, 0.99), b, device,
                     loader=make_loader(ds, b, args, train=True), amp_dtype=amp.dtype,
                     arch=args.arch, img_size=args.img_size, views=len(sizes), amp=amp.mode)


if __name__ == "__main__":
    cli.run(main, Args, PRESETS)
