"""sce_image.py: the SCE loss against hand computations and the thesis' propositions, the
training step's gradient/EMA/queue mechanics and view pairing, Tab. 4.1 augmentations and the
blur's effective sigma, the App. A.5.1 probe transforms, loading the authors' checkpoints, and
whole runs (learning, resume, 2-process DDP, CLI, backbone export)."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import sce_image as S
from common import augment, checkpoint, evaluate, log, optim, synthetic
from tests import checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---- the loss ----
def test_sce_loss_by_hand():
    # B = 1, D = 2, M = 2: every number written out.
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    lam, tau, tau_m = 0.5, 0.1, 0.07
    online = [0.6 / tau, 0.0 / tau, -1.0 / tau]  # [q.k, q.Q1, q.Q2] / tau
    target = [0.0, 0.8 / tau_m, -0.6 / tau_m]  # [0, k.Q1, k.Q2] / tau_m
    z = sum(math.exp(t) for t in target)
    w = [lam + (1 - lam) * math.exp(target[0]) / z] + [(1 - lam) * math.exp(t) / z for t in target[1:]]
    lse = math.log(sum(math.exp(o) for o in online))
    expected = -sum(wi * (oi - lse) for wi, oi in zip(w, online))
    got = S.sce_loss(q, k, queue, lam, tau, tau_m)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_lambda_one_is_moco_infonce():
    q, k, queue = unit(8, 16, seed=1), unit(8, 16, seed=2), unit(32, 16, seed=3)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.2
    moco = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
    assert torch.allclose(S.sce_loss(q, k, queue, lam=1.0, tau=0.2), moco, atol=1e-6)


def test_proposition_1_decomposition():
    """L_SCE = lam L_InfoNCE + (1 - lam) L_ReSSL + (1 - lam) L_Ceil, with s_ii = 0 (Eq. 4.5)."""
    q, k, queue = unit(6, 8, seed=4), unit(6, 8, seed=5), unit(20, 8, seed=6)
    lam, tau, tau_m = 0.3, 0.1, 0.05
    pos, neg = (q * k).sum(1) / tau, q @ queue.T / tau
    all_ = torch.cat([pos[:, None], neg], 1)
    infonce = -(pos - all_.logsumexp(1)).mean()
    s = (k @ queue.T / tau_m).softmax(1)  # relations over the other instances only
    ressl = -(s * neg.log_softmax(1)).sum(1).mean()
    ceil = -(neg.logsumexp(1) - all_.logsumexp(1)).mean()
    expected = lam * infonce + (1 - lam) * ressl + (1 - lam) * ceil
    got = S.sce_loss(q, k, queue, lam, tau, tau_m, mask_positive=True)
    assert torch.allclose(got, expected, atol=1e-5)
    # Prop. 2: = lam L_DCL + (1 - lam) L_ReSSL + L_Ceil, with L_DCL = L_InfoNCE - L_Ceil.
    assert torch.allclose(got, lam * (infonce - ceil) + (1 - lam) * ressl + ceil, atol=1e-5)


def test_zero_logit_positive_differs_from_masking_only_by_its_mass():
    q, k = unit(4, 8, seed=7), unit(4, 8, seed=8)
    near = F.normalize(k.repeat(5, 1) + 0.05 * unit(20, 8, seed=9), dim=1)  # queue close to k
    far = -near  # queue opposite to k: the zero-logit positive takes most relational mass
    for queue, close in ((near, True), (far, False)):
        a = S.sce_loss(q, k, queue, mask_positive=False)
        b = S.sce_loss(q, k, queue, mask_positive=True)
        assert torch.isclose(a, b, atol=1e-4) == close


def test_loss_is_fp32_under_bf16_autocast():
    q, k, queue = unit(8, 16, seed=10), unit(8, 16, seed=11), unit(64, 16, seed=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = S.sce_loss(q.bfloat16(), k.bfloat16(), queue)
    assert out.dtype == torch.float32
    ref = S.sce_loss(q.bfloat16().float(), k.bfloat16().float(), queue)
    assert torch.allclose(out, ref, atol=1e-5)


def test_in_batch_negatives_add_the_other_keys():
    q, k, queue = unit(4, 8, seed=13), unit(4, 8, seed=14), unit(16, 8, seed=15)
    got = S.sce_loss(q, k, queue, in_batch=True)
    per = [S.sce_loss(q[i:i + 1], k[i:i + 1], torch.cat([k[torch.arange(4) != i], queue]))
           for i in range(4)]
    assert torch.allclose(got, torch.stack(per).mean(), atol=1e-5)


# ---- the model and one training step ----
def tiny_args(**kw) -> S.Args:
    base = dict(arch="resnet18", small_stem=False, img_size=32, proj_hidden=(32,), proj_dim=16,
                proj_bn="hid", proj_last_bias=True, pred_hidden=0, queue_size=64, batch_size=8,
                symmetric=False, aug_view0="weak", aug_view1="strong", optimizer="sgd",
                base_lr=0.06, weight_decay=5e-4, ema_m0=0.9, num_workers=0, amp="none",
                lin_aug=False, sync_bn=False, warmup_epochs=1)
    return S.Args(**{**base, **kw})


def views(n=2, b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 32, 32, generator=g) for _ in range(n)]


def test_projector_and_predictor_shapes():
    a = tiny_args(proj_hidden=(64, 64), proj_bn="all", pred_hidden=48)
    m = S.build_model(a)
    lin = [l for l in m.projector if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features, l.bias is None) for l in lin] == [
        (512, 64, True), (64, 64, True), (64, 16, True)]  # BN follows every Linear: no bias
    assert not m.projector[-1].affine  # last BN without affine parameters
    pred = [l for l in m.predictor if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features, l.bias is None) for l in pred] == [
        (16, 48, True), (48, 16, True)]
    cifar = S.build_model(tiny_args())
    assert cifar.projector[-1].bias is not None  # Tab. A.2 "hid": last Linear keeps its bias
    assert cifar.encoder.conv1.stride == (2, 2)
    small = S.build_backbone(tiny_args(small_stem=True))
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)


@pytest.mark.parametrize("symmetric", [False, True])
def test_train_step_grad_ema_and_queue(symmetric):
    torch.manual_seed(0)
    a = tiny_args(symmetric=symmetric)
    m = S.build_model(a)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    amp = optim.Amp("none", torch.device("cpu"))
    x = views()
    S.train_step(m, x, opt, amp, momentum=0.9)  # one step so the online and target differ
    online_before = {n: p.clone() for n, p in m.encoder.named_parameters()}
    target_before = {n: p.clone() for n, p in m.target_encoder.named_parameters()}
    bn_target_before = m.target_encoder.bn1.running_mean.clone()
    queue_before, ptr = m.queue.clone(), int(m.queue_ptr)

    # The loss seen by the step uses the old queue (clone before the loss).
    with torch.no_grad():
        loss_expected, keys = m(x)
    out = S.train_step(m, x, opt, amp, momentum=0.75)
    assert torch.allclose(out["loss"], loss_expected, atol=1e-5)

    # No gradient in the target branch.
    assert all(p.grad is None and not p.requires_grad for p in
               [*m.target_encoder.parameters(), *m.target_projector.parameters()])
    # EMA over parameters: t = m t + (1 - m) s_new; buffers are not copied.
    for n, p in m.target_encoder.named_parameters():
        new = dict(m.encoder.named_parameters())[n]
        assert torch.allclose(p, 0.75 * target_before[n] + 0.25 * new, atol=1e-6), n
    assert any(not torch.equal(online_before[n], p) for n, p in m.encoder.named_parameters())
    assert not torch.equal(m.target_encoder.bn1.running_mean, m.encoder.bn1.running_mean)
    assert not torch.equal(m.target_encoder.bn1.running_mean, bn_target_before)  # own stats
    # FIFO: the keys of this step (both views when symmetric) at the old pointer.
    n = 2 * 8 if symmetric else 8
    assert len(keys) == n and int(m.queue_ptr) == (ptr + n) % 64
    assert torch.allclose(m.queue[ptr:ptr + n], keys, atol=1e-6)
    rest = torch.ones(64, dtype=torch.bool)
    rest[ptr:ptr + n] = False
    assert torch.equal(m.queue[rest], queue_before[rest])


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_train_step_makes_one_host_sync(optimizer):
    """Only the non-finite check reads a value back: no item(), no data-dependent shape, no
    tensor built from Python data, with LARS's trust ratios too."""
    torch.manual_seed(0)
    a = tiny_args(optimizer=optimizer, symmetric=True, local_sizes=(16,))
    m = S.build_model(a)
    opt = S.make_optimizer(m, a, 0.1)
    amp = optim.Amp("none", torch.device("cpu"))
    x = views() + [torch.randn(8, 3, 16, 16)]
    S.train_step(m, x, opt, amp, 0.9)  # the first step creates the optimiser's state
    assert checks.count_host_syncs(S.train_step, m, x, opt, amp, 0.9) == {"_local_scalar_dense": 1}


@pytest.mark.gpu
def test_gpu_step_matches_the_cpu_step():
    """bf16 and fp16 (scaled) CUDA steps, channels_last as training feeds them, against fp32."""
    torch.manual_seed(0)
    a = tiny_args(symmetric=True)
    model, x = S.build_model(a), views()

    def step(m, batch, opt, amp):
        m = m.to(memory_format=torch.channels_last) if batch[0].is_cuda else m
        return S.train_step(m, S.to_device(batch, batch[0].device), opt, amp, 0.9)

    checks.assert_gpu_step_agrees(model, x, step)


def test_accumulation_buffers_the_keys_and_steps_the_ema_once():
    """--accum-iter 2: both micro-batches see the old queue; after the second, the optimiser
    and the EMA step once and the keys of both are enqueued together (eztorch, spec §7.3)."""
    torch.manual_seed(0)
    m = S.build_model(tiny_args(symmetric=False))
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    amp = optim.Amp("none", torch.device("cpu"))
    x1, x2 = views(), [v.flip(-1) for v in views()]
    target0 = [p.clone() for p in m.target_encoder.parameters()]
    queue0, ptr = m.queue.clone(), int(m.queue_ptr)
    with torch.no_grad():
        keys = [m(x)[1] for x in (x1, x2)]  # BN in train mode: statistics only move
    amp.accum = (0, 2)
    S.train_step(m, x1, opt, amp, momentum=0.5)
    assert not amp.stepped and torch.equal(m.queue, queue0) and len(m.pending) == 1
    assert all(torch.equal(a, b) for a, b in zip(target0, m.target_encoder.parameters()))
    amp.accum = (1, 2)
    S.train_step(m, x2, opt, amp, momentum=0.5)
    assert amp.stepped and m.pending == [] and int(m.queue_ptr) == (ptr + 16) % 64
    assert torch.allclose(m.queue[ptr:ptr + 16], torch.cat(keys), atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(target0, m.target_encoder.parameters()))


@pytest.mark.parametrize("symmetric", [True, False])
def test_multicrop_pairing(symmetric, monkeypatch):
    """Which (query view, key view) pairs enter the loss with 2 global + 2 local views.
    Symmetric: each global key with the 3 other views (Sec. 4.4.3: 2 x 5 with 6 views).
    Non-symmetric (eztorch `training_step`, sym=False): the key of view 0 with views 1, 2, 3."""
    torch.manual_seed(0)
    m = S.build_model(tiny_args(symmetric=symmetric, local_sizes=(16, 16))).train()
    x = views() + [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    with torch.no_grad():  # train-mode BN uses batch statistics: the forward sees the same
        q, k = [m.online(v) for v in x], [m.target(v) for v in x]
    real, seen = S.sce_loss, []

    def spy(qq, kk, queue, **kw):
        seen.append((next(j for j in range(4) if torch.allclose(qq, q[j], atol=1e-6)),
                     next(i for i in range(4) if torch.allclose(kk, k[i], atol=1e-6))))
        return real(qq, kk, queue, **kw)

    monkeypatch.setattr(S, "sce_loss", spy)
    loss, keys = m(x)
    pairs = ([(1, 0), (2, 0), (3, 0), (0, 1), (2, 1), (3, 1)] if symmetric
             else [(1, 0), (2, 0), (3, 0)])
    assert sorted(seen) == sorted(pairs)
    assert torch.allclose(loss, torch.stack([real(q[j], k[i], m.queue) for j, i in pairs]).mean(),
                          atol=1e-5)
    assert torch.allclose(keys, torch.cat(k[:2] if symmetric else k[:1]), atol=1e-6)  # enqueued


def test_queue_size_must_divide():
    m = S.build_model(tiny_args(queue_size=60))
    with pytest.raises(ValueError, match="multiple"):
        m.enqueue(torch.randn(8, 16))


# ---- augmentations (Tab. 4.1) ----
def find(t, cls):
    """The transforms of type `cls` in a v2.Compose, looking inside RandomApply."""
    out = []
    for op in t.transforms:
        inner = op.transforms if isinstance(op, v2.RandomApply) else [op]
        out += [(op.p if isinstance(op, v2.RandomApply) else None, i) for i in inner
                if isinstance(i, cls)]
    return out


@pytest.mark.parametrize("kind,sat,gray,blur,sol", [
    ("weak", None, 0, 0, 0), ("strong", 0.4, 0.2, 0.5, 0), ("strong-alpha", 0.2, 0.2, 1.0, 0),
    ("strong-beta", 0.2, 0.2, 0.1, 0.2), ("strong-gamma", 0.2, 0.2, 0.5, 0.2)])
def test_augmentations_match_table_4_1(kind, sat, gray, blur, sol):
    t = S.pretrain_transform(kind, 224, (0.2, 1.0))
    (_, rrc), = find(t, v2.RandomResizedCrop)
    assert rrc.scale == (0.2, 1.0) and rrc.ratio == pytest.approx((3 / 4, 4 / 3))
    assert tuple(rrc.size) == (224, 224)
    (_, flip), = find(t, v2.RandomHorizontalFlip)
    assert flip.p == 0.5
    jit = find(t, v2.ColorJitter)
    if sat is None:
        assert jit == []
    else:
        (p, cj), = jit
        assert p == 0.8 and cj.brightness == (0.6, 1.4) and cj.contrast == (0.6, 1.4)
        assert cj.saturation == pytest.approx((1 - sat, 1 + sat)) and cj.hue == (-0.1, 0.1)
    assert sum(g.p for _, g in find(t, v2.RandomGrayscale)) == gray
    blurs = find(t, v2.GaussianBlur)
    assert sum(p for p, _ in blurs) == blur
    for _, b in blurs:
        assert list(b.sigma) == [0.1, 2.0] and tuple(b.kernel_size) == (23, 23)
    sols = find(t, v2.RandomSolarize)
    assert sum(s.p for _, s in sols) == sol and all(s.threshold == 0.5 for _, s in sols)
    (_, norm), = find(t, v2.Normalize)
    assert tuple(norm.mean) == S.MEAN and tuple(norm.std) == S.STD


def test_blur_holds_sigma_at_32px():
    """A blurred impulse has variance sigma^2 (per axis) when the kernel holds +-3 sigma. At
    32 px the 10 % rule gave 5 taps: sigma 2 blurred like sigma 1.29 (variance 1.66)."""
    (_, blur), = find(S.pretrain_transform("strong-alpha", 32, (0.2, 1.0)), v2.GaussianBlur)
    k = blur.kernel_size[0]
    assert k == 13 == 2 * math.ceil(3 * 2.0) + 1
    assert (augment.blur_kernel(224), augment.blur_kernel(96), augment.blur_kernel(64), augment.blur_kernel(8)) == (
        23, 13, 13, 7)  # the official 23 kept; capped by a crop smaller than the kernel
    impulse = torch.zeros(1, 32, 32)
    impulse[0, 16, 16] = 1.0
    x = torch.arange(32.0) - 16
    for sigma in (1.0, 2.0):
        out = v2.functional.gaussian_blur(impulse, blur.kernel_size, [sigma, sigma])
        assert out.sum().item() == pytest.approx(1.0, abs=1e-5)
        var = (out[0].sum(0) * x ** 2).sum().item()  # variance along the width
        taps = range(-(k // 2), k // 2 + 1)  # the sampled Gaussian truncated at k // 2 taps
        w = [math.exp(-t * t / (2 * sigma ** 2)) for t in taps]
        assert var == pytest.approx(sum(wi * t * t for wi, t in zip(w, taps)) / sum(w), rel=1e-4)
        assert var == pytest.approx(sigma ** 2, rel=0.015)  # 3.951 for sigma 2, 1.000 for 1


@pytest.mark.parametrize("size", [32, 64, 96, 224])
def test_linear_probe_transforms_follow_app_a51(size):
    """Train: CIFAR (32 px) RandomCrop(32, padding 4) + flip (SCE repo); STL-10 (96), Tiny-IN
    (64) and ImageNet RandomResizedCrop(size, (0.08, 1)) + flip. Val: the image at the dataset
    size unchanged (32/64/96); ImageNet: short side 256, centre crop 224."""
    train = S.eval_transform(size, train=True)
    crops, resized = find(train, v2.RandomCrop), find(train, v2.RandomResizedCrop)
    if size == 32:
        (_, c), = crops
        assert resized == [] and tuple(c.size) == (32, 32) and c.padding == [4, 4, 4, 4]
    else:
        (_, r), = resized
        assert crops == [] and tuple(r.size) == (size, size) and r.scale == (0.08, 1.0)
    (_, flip), = find(train, v2.RandomHorizontalFlip)
    assert flip.p == 0.5
    val = S.eval_transform(size)
    n = 256 if size == 224 else size
    img = torch.randint(0, 256, (3, n, n), dtype=torch.uint8)
    o = (n - size) // 2  # 16 for ImageNet
    mean, std = torch.tensor(S.MEAN)[:, None, None], torch.tensor(S.STD)[:, None, None]
    ref = (img[:, o:o + size, o:o + size].float() / 255 - mean) / std
    out = val(torchvision.transforms.functional.to_pil_image(img))
    assert out.shape == (3, size, size) and torch.allclose(out, ref, atol=1e-5)


def test_views_are_deterministic_per_seed_epoch_index():
    base = [(torchvision.transforms.functional.to_pil_image(torch.rand(3, 40, 40)), 0)] * 3
    ds = S.Views(base, S.pretrain_views(tiny_args()), seed=5)
    a, b = ds[(2, 1)][0], ds[(2, 1)][0]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(ds[(3, 1)][0][1], a[1]) and not torch.equal(ds[(2, 2)][0][1], a[1])


def test_local_crop_scales_follow_the_size_rule():
    ts = S.pretrain_views(S.Args(local_sizes=(192, 96)))
    (_, rrc), = find(ts[2], v2.RandomResizedCrop)
    assert rrc.scale == pytest.approx((0.2 * 192 / 224, 192 / 224))  # (0.171, 0.857)
    (_, rrc), = find(ts[3], v2.RandomResizedCrop)
    assert rrc.scale == pytest.approx((0.086, 0.429), abs=1e-3)


def test_presets_reproduce_table_a2():
    def preset(name):
        return S.cli.parse(S.Args, S.PRESETS, ["--preset", name, "--data", "/x"])
    c10 = preset("cifar10")
    assert (c10.queue_size, c10.ema_m0, c10.base_lr, c10.batch_size, c10.weight_decay) == (
        4096, 0.9, 0.06, 256, 5e-4)
    assert (c10.tau, c10.tau_m, c10.proj_hidden, c10.proj_dim, c10.img_size) == (
        0.2, 0.1, (512,), 128, 32)
    in1k = preset("imagenet")
    assert (in1k.optimizer, in1k.base_lr, in1k.weight_decay, in1k.symmetric) == (
        "lars", 0.3, 1e-6, True)
    assert in1k.batch_size * 8 == 4096 and in1k.base_lr * 4096 / 256 == pytest.approx(4.8)
    assert preset("imagenet100").proj_bn == "no" and preset("stl10").tau_m == 0.04
    for name in ("stl10", "tiny-imagenet"):  # medium datasets: RandomResizedCrop probes
        assert find(S.eval_transform(preset(name).img_size, train=True), v2.RandomResizedCrop)


# ---- whole runs ----
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return str(synthetic.images(tmp_path_factory.mktemp("img"), size=32, per_class_train=6,
                                per_class_val=2))


def run_args(data, out, **kw) -> S.Args:
    return tiny_args(**{"data": data, "output_dir": str(out), "epochs": 4, "log_every": 2,
                        "ckpt_every": 1000, "knn_k": (5,), **kw})


def test_tiny_run_learns_and_exports_the_backbone(tiny_data, tmp_path):
    """The same run with lr = 0 is the control: same data, same queue dynamics."""
    summary = S.main(run_args(tiny_data, tmp_path / "a", base_lr=0.5))
    S.main(run_args(tiny_data, tmp_path / "b", base_lr=0.0))
    loss = {r: [x["train/loss"] for x in log.read_jsonl(str(tmp_path / r / "log.jsonl"))
                if "train/loss" in x] for r in "ab"}
    assert sum(loss["a"][-2:]) < sum(loss["b"][-2:]) - 0.2, loss
    assert summary["steps"] == 4 * 6 and "knn_top1@5" in summary["metrics"]
    saved = json.load(open(tmp_path / "a" / "summary.json"))
    assert saved["metrics"] == summary["metrics"] and saved["method"] == "sce_image"
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(torch.load(tmp_path / "a" / "backbone.pt",
                                                         weights_only=True), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


@pytest.mark.parametrize("stop, accum", [(5, 1), (6, 1), (2, 2)])  # mid-epoch; right after
def test_resume_is_bit_identical(tiny_data, tmp_path, stop, accum):  # the epoch-end kNN; accum
    """With a kNN + quick probe after every epoch (--eval-every 1): the evaluation must not
    draw from the training's random stream, or a run stopped at the epoch's end would differ.
    With 2 accumulated micro-batches per step too (EMA per step, keys queued per batch)."""
    kw = dict(eval_every=1, accum_iter=accum)
    S.main(run_args(tiny_data, tmp_path / "straight", max_steps=10, **kw))
    S.main(run_args(tiny_data, tmp_path / "resumed", max_steps=stop, **kw))
    S.main(run_args(tiny_data, tmp_path / "resumed", max_steps=10, **kw))  # resumes
    a = checks.assert_same_checkpoints(tmp_path / "straight" / "last.pt",
                                       tmp_path / "resumed" / "last.pt")  # queue, LARS, RNG too
    assert a["step"] == 10


def test_linear_probe_resumes_bitwise(tiny_data, tmp_path, monkeypatch):
    """The thesis probe (augmented images, head init from the global RNG) stopped mid-way and
    resumed equals the uninterrupted probe, and so does its score."""
    S.main(run_args(tiny_data, tmp_path / "pre", max_steps=2))
    kw = dict(eval_only=True, init_from=str(tmp_path / "pre" / "last.pt"), lin_aug=True,
              lin_epochs=3, lin_batch_size=16, ckpt_every=2)
    straight = S.main(run_args(tiny_data, tmp_path / "straight", **kw))
    checks.stop_after_step(monkeypatch, 4, "linear.pt")  # mid-epoch 2 of 3 (3 steps each)
    with pytest.raises(checks.Stop):
        S.main(run_args(tiny_data, tmp_path / "resumed", **kw))
    resumed = S.main(run_args(tiny_data, tmp_path / "resumed", **kw))
    checks.assert_same_checkpoints(tmp_path / "straight" / "linear.pt",
                                   tmp_path / "resumed" / "linear.pt")
    assert straight["metrics"] == resumed["metrics"]


def test_non_finite_loss_stops_before_its_update(tiny_data, tmp_path, monkeypatch):
    """NaN pixels at step 4: no update, no EMA step, no enqueued key; last.pt of step 2."""
    seen = checks.nan_input_at_step(monkeypatch, S, 4)
    checks.assert_stopped_before_update(
        seen, lambda: S.main(run_args(tiny_data, tmp_path, ckpt_every=2, log_every=5)),
        tmp_path / "last.pt", step=4, kept=2)


def test_eval_only_from_checkpoint(tiny_data, tmp_path):
    S.main(run_args(tiny_data, tmp_path / "a", max_steps=2))
    ckpt = str(tmp_path / "a" / "last.pt")
    out = S.main(run_args(tiny_data, tmp_path / "b", eval_only=True, init_from=ckpt))
    first = S.main(run_args(tiny_data, tmp_path / "c", eval_only=True,
                            init_from=str(tmp_path / "a" / "backbone.pt")))
    assert out["steps"] == 0 and out["metrics"] == first["metrics"]
    # The thesis probe (augmented images, step schedule) is deterministic given the seed.
    lin = [S.main(run_args(tiny_data, tmp_path / f"l{i}", eval_only=True, init_from=ckpt,
                           lin_aug=True, lin_epochs=2, lin_batch_size=16)) for i in range(2)]
    assert lin[0]["metrics"] == lin[1]["metrics"] and "linear_top1" in lin[0]["metrics"]
    with pytest.raises(RuntimeError, match="does not match"):
        S.load_encoder(S.build_backbone(tiny_args(arch="resnet50")), ckpt)


def test_the_demo_verdict_compares_every_random_init_and_the_raw_pixels(tiny_data, tmp_path):
    """Random inits from seeds seed, seed + 1, the raw-pixel kNN and probe beside them (not in
    the verdict), and the verdict of DESIGN §3 on the linear probe from the values printed in
    the table."""
    out = S.main(run_args(tiny_data, tmp_path, max_steps=2, eval_random_init=True,
                          random_init_seeds=2, trained_spread=1.0))
    m, v = out["metrics"], out["verdict"]
    assert m["linear_top1"].keys() == {"trained", "random_init", "random_init_2", "pixels"}
    assert "pixels" not in m["view_top1"] and "knn_top1@5" in m and "pixels" in m["knn_top1@5"]
    assert v["random_init"] == pytest.approx([m["linear_top1"]["random_init"],
                                              m["linear_top1"]["random_init_2"]], abs=0.005)
    assert v["trained"] == pytest.approx([m["linear_top1"]["trained"]], abs=0.005)
    want = evaluate.verdict("linear top-1 (%)", v["random_init"], v["trained"], 16, 1.0)
    assert v == want and v["spread"][1] == 1.0
    assert json.load(open(tmp_path / "summary.json"))["verdict"] == v


class HParams:
    """Stands for the config objects (omegaconf) that Lightning pickles in `hyper_parameters`."""
    temp = 0.1


def lightning_checkpoint(path, online: dict, momentum: dict, hparams) -> None:
    """A file laid out as eztorch's SCE checkpoints: Lightning entries around a `state_dict`
    with the online and momentum trunks (torchvision ResNet keys, no `fc`) and the heads."""
    sd = {**{f"trunk.{k}": v for k, v in online.items()},
          **{f"momentum_trunk.{k}": v for k, v in momentum.items()},
          "projector.layers.0.weight": torch.randn(32, 512),
          "momentum_projector.layers.0.weight": torch.randn(32, 512),
          "predictor.layers.0.weight": torch.randn(16, 16),
          "queue": torch.randn(16, 64), "queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 199, "global_step": 50000, "pytorch-lightning_version": "1.6.0",
                "state_dict": sd, "optimizer_states": [{"state": {}, "param_groups": []}],
                "lr_schedulers": [], "hyper_parameters": hparams}, path)


def test_load_encoder_reads_the_authors_checkpoints(tmp_path, tiny_data, capsys):
    """The online `trunk.*` (what eztorch's linear evaluation loads), from a Lightning file or
    its `state_dict` alone; a torchvision ResNet state dict with its `fc`; and a file that
    weights_only refuses: one `error:` line whose extraction command makes it loadable."""
    a = tiny_args(small_stem=True)
    online, momentum = S.build_backbone(a).state_dict(), S.build_backbone(a).state_dict()

    def loaded(path, args=a):
        enc = S.build_backbone(args)
        S.load_encoder(enc, str(path))
        return enc.state_dict()

    def same(x, y):
        return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)

    lightning_checkpoint(tmp_path / "plain.ckpt", online, momentum, {"sym": False, "temp": 0.1})
    assert same(loaded(tmp_path / "plain.ckpt"), online)
    assert not torch.equal(online["conv1.weight"], momentum["conv1.weight"])  # trunk, not EMA
    sd = torch.load(tmp_path / "plain.ckpt", weights_only=True)["state_dict"]
    torch.save(sd, tmp_path / "sd.pt")
    assert same(loaded(tmp_path / "sd.pt"), online)
    wrapped = {k.replace("trunk.", "trunk.model.", 1): v for k, v in sd.items()}
    torch.save({"state_dict": wrapped}, tmp_path / "wrapped.ckpt")  # a trunk inside a wrapper
    assert same(loaded(tmp_path / "wrapped.ckpt"), online)
    tv = torchvision.models.resnet18().state_dict()  # with fc.weight, fc.bias
    torch.save(tv, tmp_path / "tv.pt")
    std = tiny_args()  # the standard stem, as torchvision's
    assert same(loaded(tmp_path / "tv.pt", std), {k: v for k, v in tv.items() if "fc." not in k})

    bad = tmp_path / "pickled.ckpt"
    lightning_checkpoint(bad, online, momentum, {"model": HParams()})
    with pytest.raises(checkpoint.CheckpointError) as err:
        loaded(bad)
    msg = str(err.value)
    assert "\n" not in msg and "HParams" in msg and f"{bad}.state_dict.pt" in msg
    # The user's side: the command, run where the file is trusted, writes a loadable file.
    exec(msg.split('python -c "')[1].split('" and pass')[0])
    assert same(loaded(f"{bad}.state_dict.pt"), online)
    # From the command line: one `error:` line, exit status 2.
    argv = ["--data", tiny_data, "--output-dir", str(tmp_path / "run"), "--eval-only",
            "--init-from", str(bad), "--arch", "resnet18", "--num-workers", "0"]
    with pytest.raises(SystemExit) as exit_:
        S.cli.run(S.main, S.Args, S.PRESETS, argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: cannot load")


def test_ddp_two_processes_stay_identical(tiny_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", os.path.join(ROOT, "sce_image.py"),
           "--data", tiny_data, "--output-dir", str(tmp_path), "--arch", "resnet18",
           "--no-small-stem", "--img-size", "32", "--proj-hidden", "32", "--proj-dim", "16",
           "--proj-bn", "hid", "--pred-hidden", "0", "--queue-size", "64", "--batch-size", "4",
           "--optimizer", "sgd", "--base-lr", "0.1", "--num-workers", "0", "--amp", "none",
           "--no-lin-aug", "--knn-k", "5", "--epochs", "1", "--log-every", "2",
           "--no-symmetric"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = log.read_jsonl(str(tmp_path / "log.jsonl"))
    steps = [r["step"] for r in recs if "train/loss" in r]
    assert steps[-1] == 48 // 8  # 48 images, global batch 2 x 4
    (diff,) = [r["ddp/max_replica_diff"] for r in recs if "ddp/max_replica_diff" in r]
    assert diff == 0.0
    assert json.load(open(tmp_path / "summary.json"))["steps"] == 6


def test_cli_help_and_unknown_flag():
    out = subprocess.run([sys.executable, "sce_image.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split()).replace("- ", "-")  # argparse wraps after hyphens
    for f in dataclasses.fields(S.Args):
        doc = S.cli.field_docs(S.Args)[f.name]
        assert doc and (f.name == "preset" or doc.replace("- ", "-") in text), f.name
    bad = subprocess.run([sys.executable, "sce_image.py", "--tau-mm", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unrecognized arguments: --tau-mm" in bad.stderr


def test_view_retrieval_closed_form_and_determinism(tiny_data):
    """A constant encoder ties every similarity: argmax picks first view 0, so exactly one of
    the N second views (image 0's) is found: 100 / N, with its binomial SE. A real encoder
    gives the same numbers twice and leaves the global RNG alone."""
    a = run_args(tiny_data, "/unused", lin_batch_size=5)
    n = len(S.base_dataset(a, "val"))

    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.ones(len(x), 4)
    out = S.view_retrieval(Constant(), a, torch.device("cpu"), optim.Amp("none", "cpu"))
    assert out["view_top1"] == pytest.approx(100 / n)
    assert out["view_top1_se"] == pytest.approx(100 * ((1 / n) * (1 - 1 / n) / n) ** 0.5)
    torch.manual_seed(0)
    enc, state = S.build_backbone(a), torch.get_rng_state()
    first = S.view_retrieval(enc, a, torch.device("cpu"), optim.Amp("none", "cpu"))
    assert first == S.view_retrieval(enc, a, torch.device("cpu"), optim.Amp("none", "cpu"))
    assert torch.equal(state, torch.get_rng_state()) and enc.training


def test_view_loss_closed_form_and_mode(tiny_data):
    """Held-out SCE loss: when every query and key is the same unit vector, all N logits of
    each query tie, so the cross-entropy against any target distribution is log N exactly,
    for every image (standard error 0). A real model gives the same value twice, above 0,
    and is back in train mode with the global RNG untouched."""
    a = run_args(tiny_data, "/unused", lin_batch_size=5)
    n = len(S.base_dataset(a, "val"))

    class Constant(torch.nn.Module):
        feat_dim = 4

        def forward(self, x):
            return torch.ones(len(x), 4)

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = Constant()

        def online(self, x):
            return F.normalize(torch.ones(len(x), a.proj_dim), dim=1)
        target = online
    tied = Tied()
    out = S.view_retrieval(tied.encoder, a, torch.device("cpu"), optim.Amp("none", "cpu"),
                           sce=tied)
    assert out["view_loss"] == pytest.approx(math.log(n)) and out["view_loss_se"] == 0
    torch.manual_seed(0)
    model, state = S.build_model(a), torch.get_rng_state()
    first = S.view_retrieval(model.encoder, a, torch.device("cpu"), optim.Amp("none", "cpu"),
                             sce=model)
    again = S.view_retrieval(model.encoder, a, torch.device("cpu"), optim.Amp("none", "cpu"),
                             sce=model)
    assert first == again and first["view_loss"] > 0 and first["view_loss_se"] > 0
    assert torch.equal(state, torch.get_rng_state()) and model.training
