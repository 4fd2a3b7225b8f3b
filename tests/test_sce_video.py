"""sce_video.py: the SCE loss by hand and at lambda = 1, the Slow-path ResNet3D against the
layer table (Tab. B.1) by parameter count, kernels and shapes, the symmetric loss and the
training step's EMA/queue, the heads' init, the step's one host sync, clip sampling, RGB
difference on hand-made clips, per-clip augmentation draws, the 30-view test, retrieval,
--init-from in every eztorch layout, whole runs (learning, resume, DDP, CLI), --bench against
the training step, and on CUDA (marked gpu) channels_last_3d and the step against the CPU's."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

import sce_video as S
from common import checkpoint, cli, data, evaluate, log, optim, synthetic
from tests import checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two fighting over a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---- the loss ----
def test_sce_loss_by_hand():
    q, k = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    lam, tau, tau_m = 0.5, 0.1, 0.05
    online = [0.6 / tau, 0.0 / tau, -1.0 / tau]  # [q.k, q.Q1, q.Q2] / tau (Eq. 4.9)
    target = [0.0, 0.8 / tau_m, -0.6 / tau_m]  # [0, k.Q1, k.Q2] / tau_m (Eq. 4.5, logit 0)
    z = sum(math.exp(t) for t in target)
    w = [lam + (1 - lam) * math.exp(target[0]) / z] + [(1 - lam) * math.exp(t) / z
                                                       for t in target[1:]]  # Eq. 4.8
    lse = math.log(sum(math.exp(o) for o in online))
    expected = -sum(wi * (oi - lse) for wi, oi in zip(w, online))  # Eq. 4.10
    assert S.sce_loss(q, k, queue, lam, tau, tau_m).item() == pytest.approx(expected, rel=1e-6)


def test_lambda_one_is_infonce_and_fp32_under_bf16():
    q, k, queue = unit(8, 16, seed=1), unit(8, 16, seed=2), unit(32, 16, seed=3)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.1
    moco = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
    assert torch.allclose(S.sce_loss(q, k, queue, lam=1.0, tau=0.1), moco, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = S.sce_loss(q.bfloat16(), k.bfloat16(), queue)
    assert out.dtype == torch.float32


# ---- the backbone (Tab. B.1) ----
def conv(cin, cout, kt, kh):
    return cin * cout * kt * kh * kh


def bn(c):
    return 2 * c


def expected_params(depth: int) -> int:
    """Tab. B.1 written out: stem 1x7^2 64; res2-res5 with conv_a temporal kernels 1, 1, 3, 3;
    a 1x1x1 conv + BN shortcut at each stage's first block where the shape changes."""
    total = conv(3, 64, 1, 7) + bn(64)
    cin = 64
    for i, (n, kt) in enumerate(zip({18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth], (1, 1, 3, 3))):
        w = 64 * 2 ** i
        for j in range(n):
            c_in = cin if j == 0 else (w if depth == 18 else 4 * w)
            if depth == 18:  # [kt x 3^2, w ; 1 x 3^2, w]
                total += conv(c_in, w, kt, 3) + bn(w) + conv(w, w, 1, 3) + bn(w)
                out = w
            else:  # [kt x 1^2, w ; 1 x 3^2, w ; 1 x 1^2, 4w]
                total += conv(c_in, w, kt, 1) + bn(w) + conv(w, w, 1, 3) + bn(w)
                total += conv(w, 4 * w, 1, 1) + bn(4 * w)
                out = 4 * w
            if j == 0 and (c_in != out or i > 0):
                total += conv(c_in, out, 1, 1) + bn(out)
        cin = out
    return total


@pytest.mark.parametrize("depth,feat,count", [(18, 512, 20_023_872), (50, 2048, 31_634_496)])
def test_backbone_matches_table_b1(depth, feat, count):
    net = S.build_backbone(depth)
    assert sum(p.numel() for p in net.parameters()) == expected_params(depth) == count
    assert net.feat_dim == feat
    stem = net.blocks[0]
    assert (stem.conv.kernel_size, stem.conv.stride, stem.conv.padding) == (
        (1, 7, 7), (1, 2, 2), (0, 3, 3))
    assert (stem.pool.kernel_size, stem.pool.stride) == ((1, 3, 3), (1, 2, 2))
    for i, kt in enumerate((1, 1, 3, 3)):
        for j, block in enumerate(net.blocks[i + 1].res_blocks):
            b = block.branch2
            convs = [m for m in b.modules() if isinstance(m, torch.nn.Conv3d)]
            assert all(c.stride[0] == 1 for c in convs)  # never a temporal stride
            assert b.conv_a.kernel_size[0] == kt and b.conv_b.kernel_size == (1, 3, 3)
            strided = b.conv_b if depth == 50 else b.conv_a
            assert strided.stride == ((1, 2, 2) if i > 0 and j == 0 else (1, 1, 1))
            last = b.norm_c if depth == 50 else b.norm_b
            assert torch.all(last.weight == 0)  # zero-init last BN of each residual branch
            assert torch.all(b.norm_a.weight == 1)


@pytest.mark.parametrize("frames", [4, 8])
def test_time_is_preserved_through_the_network(frames):
    net = S.build_backbone(18, width=8).eval()
    x = torch.randn(2, 3, frames, 64, 64)
    assert net.features_map(x).shape == (2, 64, frames, 2, 2)
    assert net(x).shape == (2, 64)
    # a change confined to the last frame changes the last time step of the map, no other
    # (temporal kernels of 3 in res4/res5 spread it by 2 steps at most)
    y = x.clone()
    y[:, :, -1] += 1
    d = (net.features_map(x) - net.features_map(y)).abs().amax((0, 1, 3, 4))
    assert d[-1] > 0 and torch.all(d[:max(frames - 3, 0)] == 0)


def tiny_args(**kw) -> S.Args:
    base = dict(width=4, proj_hidden=(16, 16), proj_dim=8, pred_hidden=16, queue_size=64,
                num_frames=4, clip_duration=0.32, crop_size=16, batch_size=4, lin_batch_size=4,
                ft_batch_size=4, num_workers=0, amp="none", warmup_epochs=1, epochs=2,
                train_scale=(16, 20), test_size=16, test_clips=2, test_crops=1, knn_k=(3,),
                log_every=2, ckpt_every=1000, sync_bn=False)
    return S.Args(**{**base, **kw})


def test_projector_predictor_and_symmetric_step():
    torch.manual_seed(0)
    m = S.build_model(tiny_args())
    lin = [(l.in_features, l.out_features, l.bias) for l in m.projector
           if isinstance(l, torch.nn.Linear)]
    assert [(i, o) for i, o, _ in lin] == [(32, 16), (16, 16), (16, 8)]
    assert all(b is None for *_, b in lin) and not m.projector[-1].affine  # BN all
    pred = [l for l in m.predictor if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features, l.bias) for l in pred] == [(8, 16, None), (16, 8, None)]
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    amp = optim.Amp("none", "cpu")
    g = torch.Generator().manual_seed(1)
    clips = [torch.randn(4, 3, 4, 16, 16, generator=g) for _ in range(2)]
    S.train_step(m, clips, opt, amp, 0.9)  # online and target now differ
    with torch.no_grad():  # train-mode BN: the same statistics as the step's forward
        k0, k1 = m.target(clips[0]), m.target(clips[1])
        q0, q1 = m.online(clips[0]), m.online(clips[1])
        loss, keys = m(*clips)
    sym = (S.sce_loss(q1, k0, m.queue, 0.5, 0.1, 0.05)
           + S.sce_loss(q0, k1, m.queue, 0.5, 0.1, 0.05)) / 2
    assert torch.allclose(loss, sym, atol=1e-5)
    assert torch.allclose(keys, torch.cat([k0, k1]), atol=1e-6)
    target_before = [p.clone() for p in m.target_encoder.parameters()]
    ptr = int(m.queue_ptr)
    S.train_step(m, clips, opt, amp, 0.75)
    for t0, t, s in zip(target_before, m.target_encoder.parameters(), m.encoder.parameters()):
        assert torch.allclose(t, 0.75 * t0 + 0.25 * s, atol=1e-6)  # Eq. 4.2, params only
        assert t.grad is None
    assert int(m.queue_ptr) == (ptr + 8) % 64  # both clips' keys (2B) enqueued
    assert torch.allclose(m.queue[ptr:ptr + 8], keys, atol=1e-5)


def test_heads_start_from_pytorch_default_init():
    """eztorch's MLPHead keeps PyTorch's Linear init (last_init_normal is off in the SCE
    configs): under one seed the projector's Linears equal freshly built nn.Linear layers. The
    classifier keeps eztorch's video-head init, N(0, 0.01) and bias 0."""
    torch.manual_seed(5)
    proj = S.mlp(32, (16, 16), 8, last_bn=True)
    torch.manual_seed(5)
    ref = [torch.nn.Linear(32, 16, bias=False), torch.nn.Linear(16, 16, bias=False),
           torch.nn.Linear(16, 8, bias=False)]
    lin = [m for m in proj if isinstance(m, torch.nn.Linear)]
    assert len(lin) == 3 and all(torch.equal(a.weight, b.weight) for a, b in zip(lin, ref))
    assert lin[0].weight.abs().max() > 0.1  # U(+-1/sqrt(32)): not N(0, 0.01)
    head = S.Classifier(S.build_backbone(18, width=64), 400, 0.0).head
    assert head.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.all(head.bias == 0)


def test_train_step_makes_one_host_sync():
    """The step with the training optimiser (LARS) reads one value back to the host: the
    non-finite check."""
    torch.manual_seed(0)
    a = tiny_args()
    m = S.build_model(a)
    opt = S.build_optimizer(m, a)[0]
    amp = optim.Amp("none", "cpu")
    g = torch.Generator().manual_seed(1)
    clips = [torch.randn(4, 3, 4, 16, 16, generator=g) for _ in range(2)]
    S.train_step(m, clips, opt, amp, 0.99)  # the momentum buffers exist from here on
    counts = checks.count_host_syncs(S.train_step, m, clips, opt, amp, 0.99)
    assert counts == {"_local_scalar_dense": 1}, counts


# ---- data ----
def test_clip_sampling_by_hand():
    assert S.clip_frames(100, 64, 8, 10) == [10, 19, 28, 37, 46, 55, 64, 73]  # linspace(0, 63)
    assert S.clip_frames(20, 64, 4, 0) == [0, 6, 12, 19]  # short video: spread over all of it
    a = tiny_args(clip_duration=0.32, num_frames=4, test_clips=10)
    assert S.test_clips(20, 25.0, a) == [[s, s + 2, s + 4, s + 7] for s in
                                         (0, 1, 2, 4, 5, 6, 8, 9, 10, 12)]  # int(k 12 / 9)
    torch.manual_seed(0)
    starts = {S.random_clip(20, 25.0, a)[0] for _ in range(300)}
    assert starts == set(range(13))  # uniform over [0, n - L], L = 0.32 x 25 = 8


def test_rgb_difference_on_a_hand_made_clip():
    f = torch.zeros(2, 3, 1, 2, dtype=torch.uint8)
    f[0, :, 0, 0] = torch.tensor([100, 50, 10])  # grey int(.2989*100 + .587*50 + .114*10) = 60
    f[0, :, 0, 1] = 200  # grey 199 (truncated, as torchvision on uint8)
    nxt = torch.zeros_like(f)
    nxt[0, :, 0, 0] = 20
    nxt[0, :, 0, 1] = 255  # grey 254
    f[1] = 7
    nxt[1] = 7  # a frame equal to its successor: 0 difference -> 127.5 -> 128
    out = S.rgb_difference(f, nxt)
    assert out.dtype == torch.uint8 and out.shape == f.shape
    grey = [(0.2989 * 100 + 0.587 * 50 + 0.114 * 10), 0.2989 * 200 + 0.587 * 200 + 0.114 * 200]
    g0, g1 = int(grey[0]), int(grey[1])
    n0, n1 = int(20 * (0.2989 + 0.587 + 0.114)), int(255 * (0.2989 + 0.587 + 0.114))
    assert (g0, g1, n0, n1) == (60, 199, 19, 254)
    expected = [round((g0 - n0 + 255) / 2), round((g1 - n1 + 255) / 2)]  # 148, 100
    for c in range(3):  # 3-channel grayscale
        assert out[0, c, 0].tolist() == expected
    assert torch.all(out[1] == 128)


def test_rgb_difference_last_frame_repeats_the_previous_difference(tmp_path):
    """A clip of the whole video (8 frames of grey 10 + 3 i^2, kept frames 0, 2, 4, 7): frame j
    shows g(j) - g(j + 1), the last frame (7) repeats the difference before it, g(6) - g(7),
    as eztorch's temporal_difference (not a frame past the clip)."""
    greys = [10 + 3 * i * i for i in range(8)]  # 10 13 22 37 58 85 118 157
    folder = frame_folder(tmp_path / "v", greys, size=(8, 8))
    a = tiny_args(num_frames=4, clip_duration=0.32, frames_fps=25.0, diff_p=1.0)  # 8 frames
    ds = S.PretrainClips([data.VideoRecord(folder, 0)], a, seed=0)
    ds.transforms = [v2.ToDtype(torch.float32)] * 2  # the temporal part alone
    g = [v - 1 for v in greys]  # rgb_to_grayscale on uint8: int(0.9999 v)
    expected = [(g[0] - g[1] + 255) / 2, (g[2] - g[3] + 255) / 2, (g[4] - g[5] + 255) / 2,
                (g[6] - g[7] + 255) / 2]
    assert expected == [126, 120, 114, 108]
    for clip in ds[(0, 0)][:2]:  # (3, T, 8, 8), both clips start at frame 0
        assert clip.shape == (3, 4, 8, 8)
        assert clip[:, :, 0, 0].tolist() == [expected] * 3
        assert torch.all(clip == clip[:, :, :1, :1])
    # a video shorter than the clip: kept frames 0, 0, 1, 2 (e = 2)
    assert S.difference_pairs([0, 0, 1, 2]) == ([0, 0, 1, 1], [1, 1, 2, 2])
    assert S.difference_pairs([3]) == ([2], [3])


def frame_folder(root, values, size=(24, 32)) -> str:
    """A frame-folder video: frame i is a constant grey `values[i]` (lossless PNGs)."""
    os.makedirs(root, exist_ok=True)
    for i, v in enumerate(values):
        img = Image.fromarray(np.full((*size, 3), v, np.uint8))
        img.save(os.path.join(root, f"{i + 1:05d}.png"))
    return str(root)


def test_one_draw_per_clip_for_all_frames_independent_between_clips(tmp_path):
    """A static video (every frame the same random image): every frame of an augmented clip
    must come out the same (one crop, jitter, blur, flip for the clip), the two clips not."""
    os.makedirs(tmp_path / "v")
    img = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for i in range(30):
        Image.fromarray(img).save(tmp_path / "v" / f"{i + 1:05d}.png")
    a = tiny_args(crop_size=24, diff_p=0.0)
    ds = S.PretrainClips([data.VideoRecord(str(tmp_path / "v"), 0)], a, seed=3)
    for epoch in range(4):
        c0, c1, _ = ds[(epoch, 0)]
        assert c0.shape == c1.shape == (3, 4, 24, 24)
        for c in (c0, c1):
            assert all(torch.equal(c[:, t], c[:, 0]) for t in range(4))
        assert not torch.allclose(c0[:, 0], c1[:, 0], atol=1e-3)
    assert torch.equal(ds[(1, 0)][0], ds[(1, 0)][0])  # (seed, epoch, index) decide the draws


def test_test_views_are_clips_by_crops_at_the_expected_frames(tmp_path):
    """30 views (10 clips x 3 crops); frame i of the video has grey 10 i, so each view's
    pixel tells which frame it shows: starts int(k 12 / 9), frames + int(linspace(0, 7, 4))."""
    folder = frame_folder(tmp_path / "v", [10 * i for i in range(20)])
    a = tiny_args(test_clips=10, test_crops=3, test_size=16, frames_fps=25.0)
    x, label, index = S.EvalClips([data.VideoRecord(folder, 3)], a, "test")[0]
    assert x.shape == (30, 3, 4, 16, 16) and label == 3
    grey = (x[:, 0, :, 0, 0] * 0.225 + 0.45) * 255  # (V, T)
    for k, frames in enumerate(S.test_clips(20, 25.0, a)):
        for c in range(3):
            assert torch.allclose(grey[3 * k + c], torch.tensor([10.0 * f for f in frames]),
                                  atol=1e-3)


def test_retrieval_centres_each_set_on_hand_made_features():
    """Every bank and query vector shares a large offset (its own per set): uncentred, all
    cosines are about 1 and the nearest is wrong; centred, each query finds its class."""
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) + 50.0
    yb = torch.tensor([0, 1, 2, 3])
    query = (torch.tensor([[0.9, 0.1], [0.1, 0.9], [-0.9, -0.1], [-0.1, -0.9]]) * 2
             + torch.tensor([-30.0, 20.0]))
    yq = torch.tensor([0, 1, 2, 3])
    out = evaluate.retrieval_recall(query, yq, bank, yb, (1, 2), center=True)
    assert out == {"R@1": 100.0, "R@2": 100.0}
    raw = evaluate.retrieval_recall(query, yq, bank, yb, (1,), center=False)
    assert raw["R@1"] < 100.0


# ---- checkpoints (--init-from) ----
def trunk_weights(seed: int) -> dict:
    """A tiny R3D-18's state dict with every tensor drawn at random (BN statistics too)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v + seed)
            for k, v in S.build_backbone(18, width=4).state_dict().items()}


def layouts(w: dict, other: dict) -> dict:
    """Files in every layout the trunk comes in: `w` is the trunk, `other` an EMA copy."""
    def under(prefix, sd):
        return {prefix + k: v for k, v in sd.items()}
    head = {"projector.layers.0.weight": torch.ones(8, 32), "queue": torch.ones(8, 64)}
    return {
        "eztorch-pretrain.ckpt": {  # Lightning: VideoHeadModel trunk and its EMA copy
            "state_dict": {**under("momentum_trunk.model.", other), **under("trunk.model.", w),
                           **head}, "epoch": 199, "global_step": 1000},
        "eztorch-trunk.ckpt": {"state_dict": {**under("trunk.", w),
                                              "classifier.proj.weight": torch.ones(3, 32)}},
        "eztorch-trunk-raw.pt": {**under("trunk.", w), **under("momentum_trunk.", other)},
        "last.pt": {"model": {**under("encoder.", w), **under("target_encoder.", other),
                              **head}, "step": 3},
        "ddp.pt": {"model": under("module.encoder.", w)},
        "backbone.pt": w,
        "released-bare.pt": {"state_dict": w},
    }


def test_load_encoder_reads_every_layout(tmp_path):
    w, other = trunk_weights(1), trunk_weights(2)
    for name, content in layouts(w, other).items():
        torch.save(content, tmp_path / name)
        enc = S.build_backbone(18, width=4)
        S.load_encoder(enc, str(tmp_path / name))
        got = enc.state_dict()
        assert set(got) == set(w), name
        assert all(torch.equal(got[k], w[k]) for k in w), name  # the trunk, never its EMA


def test_load_encoder_names_the_prefixes_of_a_file_of_no_layout(tmp_path, capsys):
    w = trunk_weights(1)
    files = {"other.pt": {"state_dict": {**{"backbone." + k: v for k, v in w.items()},
                                         "head.fc.weight": torch.ones(2, 2)}},
             "ema-only.ckpt": {"state_dict": {"momentum_trunk.model." + k: v
                                              for k, v in w.items()}}}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    with pytest.raises(checkpoint.CheckpointError) as err:
        S.load_encoder(S.build_backbone(18, width=4), str(tmp_path / "other.pt"))
    msg = str(err.value)
    assert "\n" not in msg and "backbone.blocks., head.fc." in msg and "trunk.model." in msg
    with pytest.raises(SystemExit) as exit_:  # through the CLI: one line, status 2
        cli.run(S.main, S.Args, S.PRESETS, ["--eval", "retrieval", "--init-from",
                                            str(tmp_path / "ema-only.ckpt"), "--data",
                                            str(tmp_path), "--output-dir", str(tmp_path / "o")])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err_lines) == 1, err_lines
    assert "no SCE video trunk" in err_lines[0] and "momentum_trunk.model." in err_lines[0]
    # a Lightning file whose hyper-parameters weights_only refuses: how to extract the weights
    torch.save({"state_dict": w, "hyper_parameters": {"lr": Fraction(1, 3)}}, tmp_path / "hp.ckpt")
    with pytest.raises(checkpoint.CheckpointError, match="weights_only=False") as err:
        S.load_encoder(S.build_backbone(18, width=4), str(tmp_path / "hp.ckpt"))
    assert "\n" not in str(err.value)


# ---- whole runs ----
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """16 train / 7 val synthetic videos (32 px, 16 frames at 25 fps), listed in CSVs; 7 is
    odd, so 2 processes get unequal evaluation shares."""
    src = synthetic.videos(tmp_path_factory.mktemp("vid"), size=32, frames=16,
                           per_class_train=2, per_class_val=1)
    root = tmp_path_factory.mktemp("lists")
    for name, keep in (("train.csv", 16), ("val.csv", 7)):
        lines = open(src / name).read().splitlines()[:keep]
        (root / name).write_text("".join(f"{src}/{line}\n" for line in lines))
    return str(root)


def run_args(data_root, out, **kw) -> S.Args:
    return tiny_args(**{"data": data_root, "output_dir": str(out), **kw})


def losses(path) -> list:
    return [r["train/loss"] for r in log.read_jsonl(str(path / "log.jsonl")) if "train/loss" in r]


def test_tiny_run_lowers_the_loss_against_an_lr0_control(tiny_data, tmp_path):
    """20 steps at base lr 2 against lr 0 on the same draws: the last 6 losses sum lower.
    (Measured for seeds 0-2 on torch 2.11 and 2.14: margins 2.3-5.7; base lr 4 and 12 steps,
    the former setting, failed on one seed of 2.11: the step-to-step noise is about 1.)"""
    kw = dict(epochs=10, batch_size=8, queue_size=64, diff_p=0.0, log_every=1, warmup_epochs=0)
    S.main(run_args(tiny_data, tmp_path / "a", base_lr=2.0, **kw))
    S.main(run_args(tiny_data, tmp_path / "b", base_lr=0.0, **kw))
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(a) == 20 and sum(a[-6:]) < sum(b[-6:]) - 0.5, (a, b)
    assert os.path.exists(tmp_path / "a" / "backbone.pt")


def test_resume_is_bit_identical(tiny_data, tmp_path):
    """Every random operation on: RGB difference, reverse, duration jitter, both clips."""
    kw = dict(max_steps=6, diff_p=0.5, reverse_p=0.5, duration_jitter=0.2, epochs=3)
    S.main(run_args(tiny_data, tmp_path / "straight", **kw))
    S.main(run_args(tiny_data, tmp_path / "resumed", **{**kw, "max_steps": 3}))  # mid-epoch 0
    S.main(run_args(tiny_data, tmp_path / "resumed", **kw))
    ckpt = checks.assert_same_checkpoints(tmp_path / "straight" / "last.pt",
                                          tmp_path / "resumed" / "last.pt")
    assert ckpt["step"] == 6


def test_finetune_resumes_bitwise_and_tests_once_per_clip(tiny_data, tmp_path, monkeypatch):
    """Fine-tuning (dropout and colour jitter drawing) stopped mid-way and resumed equals the
    uninterrupted run, and so does its multi-view test."""
    S.main(run_args(tiny_data, tmp_path / "pre", max_steps=1))
    kw = dict(eval="finetune", init_from=str(tmp_path / "pre" / "backbone.pt"), ft_epochs=2,
              ckpt_every=2)
    straight = S.main(run_args(tiny_data, tmp_path / "straight", **kw))
    checks.stop_after_step(monkeypatch, 3, "finetune-split1.pt")
    with pytest.raises(checks.Stop):
        S.main(run_args(tiny_data, tmp_path / "resumed", **kw))
    resumed = S.main(run_args(tiny_data, tmp_path / "resumed", **kw))
    checks.assert_same_checkpoints(tmp_path / "straight" / "finetune-split1.pt",
                                   tmp_path / "resumed" / "finetune-split1.pt")
    assert straight["metrics"] == resumed["metrics"]
    top1 = straight["metrics"]["finetune_top1_split1"]["trained"]
    assert round(top1 * 7 / 100, 3) == round(top1 * 7 / 100)  # k of the 7 clips


def test_non_finite_loss_stops_before_its_update(tiny_data, tmp_path, monkeypatch):
    seen = checks.nan_input_at_step(monkeypatch, S, 3)
    checks.assert_stopped_before_update(
        seen, lambda: S.main(run_args(tiny_data, tmp_path, ckpt_every=2, log_every=5)),
        tmp_path / "last.pt", step=3, kept=2)


def test_ddp_two_processes_stay_identical_and_evaluate_each_clip_once(tiny_data, tmp_path):
    """2 gloo processes: the replicas (weights, target, queue) stay equal; the monitor on the
    7 validation clips (shares of 4 and 3) gives what one process computes from the same
    checkpoint."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", os.path.join(ROOT, "sce_video.py"),
           "--data", tiny_data, "--output-dir", str(tmp_path)]
    a = run_args(tiny_data, tmp_path, epochs=1, batch_size=2, monitor_eval=True)
    for f in dataclasses.fields(a):  # the tiny settings as flags
        v = getattr(a, f.name)
        if f.name in ("data", "output_dir", "preset") or v == getattr(S.Args(), f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        cmd += ([flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else
                [flag, *map(str, v)] if isinstance(v, tuple) else [flag, str(v)])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = log.read_jsonl(str(tmp_path / "log.jsonl"))
    assert [r["step"] for r in recs if "train/loss" in r][-1] == 16 // 4
    (diff,) = [r["ddp/max_replica_diff"] for r in recs if "ddp/max_replica_diff" in r]
    assert diff == 0.0
    two = json.load(open(tmp_path / "summary.json"))["metrics"]
    sce = S.build_model(a)
    checkpoint.load_model(sce, checkpoint.load(str(tmp_path / "last.pt"))["model"])
    one = S.monitor(sce, a, torch.device("cpu"), optim.Amp("none", "cpu"))
    for name in ("R@1", "R@5", "knn_top1@3", "view_top1"):
        assert two[name]["trained"] == pytest.approx(one[name], abs=1e-3), name
    assert two["view_loss"]["trained"] == pytest.approx(one["view_loss"], abs=1e-3)


def test_cli_help_user_errors_and_unknown_flag(tmp_path, capsys):
    out = subprocess.run([sys.executable, "sce_video.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split()).replace("- ", "-")
    for f in dataclasses.fields(S.Args):
        doc = cli.field_docs(S.Args)[f.name]
        assert doc and (f.name == "preset" or doc.replace("- ", "-") in text), f.name
    bad = subprocess.run([sys.executable, "sce_video.py", "--tau-mm", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unrecognized arguments: --tau-mm" in bad.stderr
    for argv, msg in ((["--eval", "linear", "--data", str(tmp_path)], "give --init-from"),
                      (["--data", str(tmp_path / "nowhere")], "no such folder")):
        with pytest.raises(SystemExit) as exit_:
            cli.run(S.main, S.Args, S.PRESETS, argv + ["--output-dir", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
        assert msg in err[0]


def test_presets_follow_the_thesis():
    def preset(name):
        return cli.parse(S.Args, S.PRESETS, ["--preset", name, "--data", "/x"])
    k200 = preset("k200-r3d18")
    assert (k200.queue_size, k200.lam, k200.tau, k200.tau_m, k200.diff_p, k200.color_strength,
            k200.crop_scale, k200.warmup_epochs) == (32768, 0.5, 0.1, 0.05, 0.2, 1.0,
                                                     (0.2, 0.766), 35)
    assert k200.base_lr * k200.batch_size * 8 / 256 == pytest.approx(4.8)  # 8 GPUs x 64
    small = preset("k400-r3d18-16x112")
    assert (small.num_frames, small.clip_duration, small.crop_size, small.test_size) == (
        16, 1.28, 112, 128)
    r50 = preset("k400-r3d50-16x224")
    assert (r50.depth, r50.proj_hidden, r50.pred_hidden, r50.num_frames, r50.clip_duration,
            r50.queue_size) == (50, (4096, 4096), 4096, 16, 2.56, 65536)
    assert S.build_model(tiny_args()).queue.shape == (64, 8)


def test_demo_reads_the_motion_set_at_the_linearly_scaled_lr(tmp_path, monkeypatch):
    """The demo trains on `synthetic.motion_videos` (4 flip-proof motions) at the official
    base lr scaled to its batch (2.4 x 16 / 256 = 0.15), validates on >= 100 videos per class
    (DESIGN's rule for accuracies) and carries a measured trained spread for its verdict."""
    demo = cli.parse(S.Args, S.PRESETS, ["--preset", "demo"])
    assert demo.synthetic_set == "motion" and demo.synthetic_per_class[1] >= 100
    assert demo.base_lr * demo.batch_size / 256 == pytest.approx(0.15)
    assert demo.trained_spread > 0 and demo.random_init_seeds >= 3
    monkeypatch.setenv("SSL_REFS_CACHE", str(tmp_path))
    small = dataclasses.replace(demo, synthetic_per_class=(2, 1), synthetic_seed=3)
    train, val = S.read_split(small, True), S.read_split(small, False)
    assert [r.label for r in val] == [0, 1, 2, 3] and len(train) == 8
    assert all("motion-videos" in r.path and "-s3-" in r.path for r in train + val)


# ---- --bench and the GPU (tests marked gpu run on CUDA only) ----
@pytest.fixture(scope="module")
def frame_data(tmp_path_factory):
    """8 train / 4 val frame-folder videos (12 random 24 px PNG frames, 2 classes) in CSVs:
    real inputs that need no PyAV."""
    root = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for i in range(n):
            os.makedirs(root / split / f"v{i}")
            for t in range(12):
                Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(
                    root / split / f"v{i}" / f"{t + 1:05d}.png")
        (root / f"{split}.csv").write_text("".join(f"{split}/v{i} {i % 2}\n" for i in range(n)))
    return str(root)


def record_steps(monkeypatch) -> list:
    """Wrap `S.train_step`: each call appends (unwrapped model, clips, optimiser)."""
    real, calls = S.train_step, []

    def wrapped(model, clips, optimizer, amp, momentum):
        calls.append((checkpoint.unwrap(model), clips, optimizer))
        return real(model, clips, optimizer, amp, momentum)
    monkeypatch.setattr(S, "train_step", wrapped)
    return calls


def train_then_bench(data_root, tmp_path, monkeypatch, **kw) -> tuple:
    """One pretraining step and one --bench run of the same settings: the (model, clips,
    optimiser) each stepped, and the bench's result."""
    calls = record_steps(monkeypatch)
    S.main(run_args(data_root, tmp_path / "train", max_steps=1, **kw))
    (train,) = calls
    calls.clear()
    out = S.main(run_args(data_root, tmp_path / "bench", bench=True, **kw))
    assert len(calls) == 26 and all(c[2] is calls[0][2] for c in calls)  # 5 + 1 FLOPs + 20
    return train, calls[0], out


def group_settings(model, opt) -> list:
    """Each parameter group's options (but the scheduled lr) and parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [({k: v for k, v in g.items() if k not in ("params", "lr")},
             [names[id(p)] for p in g["params"]]) for g in opt.param_groups]


def assert_bench_is_the_training_step(train, bench, args, fmt) -> None:
    (m_t, clips_t, opt_t), (m_b, clips_b, opt_b) = train, bench
    assert type(opt_b) is type(opt_t) is optim.LARS
    assert group_settings(m_b, opt_b) == group_settings(m_t, opt_t)
    names = [n for n, p in m_t.named_parameters() if p.requires_grad]
    assert sum((names for _, names in group_settings(m_t, opt_t)), []) == names
    assert all(g["lr"] == args.base_lr * args.batch_size / 256 for g in opt_b.param_groups)
    for model, clips in ((m_t, clips_t), (m_b, clips_b)):
        assert all(c.device.type == args.device and c.is_contiguous(memory_format=fmt)
                   for c in clips)
        convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
        assert convs and all(w.is_contiguous(memory_format=fmt) for w in convs)


def test_bench_times_the_training_step(frame_data, tmp_path, monkeypatch):
    """--bench steps the optimiser training builds (LARS, its groups and options, the peak lr)
    on clips laid out as training lays them out (CPU: contiguous)."""
    train, bench, out = train_then_bench(frame_data, tmp_path, monkeypatch, device="cpu")
    assert_bench_is_the_training_step(train, bench, run_args(frame_data, tmp_path, device="cpu"),
                                      torch.contiguous_format)
    assert out["samples_per_s"] > 0 and out["data_samples_per_s"] > 0


@pytest.mark.gpu
def test_training_and_bench_on_cuda_are_channels_last_3d(frame_data, tmp_path, monkeypatch):
    """On CUDA the pretraining step and --bench take channels_last_3d clips into a
    channels_last_3d model (every Conv3d weight), in bf16 by default, with the same LARS."""
    kw = dict(device="cuda", amp="auto")
    train, bench, out = train_then_bench(frame_data, tmp_path, monkeypatch, **kw)
    assert_bench_is_the_training_step(train, bench, run_args(frame_data, tmp_path, **kw),
                                      torch.channels_last_3d)
    assert out["amp"] == "bf16" and torch.backends.cudnn.benchmark


@pytest.mark.gpu
def test_cuda_step_agrees_with_the_fp32_cpu_step():
    """The real training step of a tiny R3D-18 (width 8, 8 clips of 8 x 64 x 64), channels_last_3d
    as in training, on CUDA against fp32 on the CPU: fp32 tightly, bf16 and fp16 within the
    CPU autocast's own distance (at this scale the fp32 step itself moves by gradient cosine
    0.968-0.992 when only its input is perturbed by bf16's rounding: max-pool ties, BN over 8
    clips)."""
    torch.manual_seed(0)
    model = S.build_model(tiny_args(width=8, batch_size=8, crop_size=64, num_frames=8))
    g = torch.Generator().manual_seed(1)
    batch = [torch.randn(8, 3, 8, 64, 64, generator=g) for _ in range(2)]

    def step(model, clips, opt, amp):
        dev = clips[0].device
        if dev.type == "cuda":
            model.to(memory_format=torch.channels_last_3d)
        return S.train_step(model, [S.channels_last(c, dev) for c in clips], opt, amp, 0.99)
    checks.assert_gpu_step_agrees(model, batch, step)


def test_demo_verdict_on_retrieval_over_random_inits(tiny_data, tmp_path, monkeypatch):
    """The demo's verdict: R@1 of --random-init-seeds random encoders (the first is the run's
    own start, the table's column) against the trained one, with the validation split's size
    as n_eval; without a measured trained spread it cannot conclude."""
    a = run_args(tiny_data, tmp_path, epochs=1, batch_size=2, monitor_eval=True,
                 eval_random_init=True, random_init_seeds=3)
    seen, real = [], S.retrieval_eval

    def spy(fn, *args, **kw):  # a fingerprint of every encoder that is ranked
        if isinstance(fn, torch.nn.Module):
            seen.append(float(sum(p.detach().double().sum() for p in fn.parameters())))
        return real(fn, *args, **kw)
    monkeypatch.setattr(S, "retrieval_eval", spy)
    summary = S.main(a)
    assert len(seen) == 4 and len(set(seen)) == 4  # trained, and 3 different random inits
    ver, r1 = summary["verdict"], summary["metrics"]["R@1"]
    assert len(ver["random_init"]) == 3 and round(ver["random_init"][0], 3) == r1["random_init"]
    assert round(ver["trained"][0], 3) == r1["trained"]
    assert ver["rule"].startswith("needs") and not ver["helps"]
    assert json.load(open(tmp_path / "summary.json"))["verdict"] == ver
    raw = summary["versus_raw_pixels"]
    assert round(raw["raw_pixels"], 3) == r1["raw_pixels"] and raw["trained"] == ver["trained"][0]


def test_versus_raw_pixels_by_hand():
    """3 SE of the difference, SE^2 = binomial SE^2 of raw pixels + the larger of the trained
    binomial SE and the trained spread, squared (400 samples: SE(50 %) = 2.5 points)."""
    out = S.versus_raw_pixels(50.0, 55.0, 400, 0.0)
    se = math.hypot(2.5, 100 * math.sqrt(0.55 * 0.45 / 400))
    assert out["se"] == pytest.approx(se) and not out["beats"]  # 5 < 3 x 3.53
    assert S.versus_raw_pixels(50.0, 55.0, 400, 4.0)["se"] == pytest.approx(math.hypot(2.5, 4))
    assert S.versus_raw_pixels(40.0, 60.0, 400, 1.0)["beats"]  # 20 > 3 x 3.46
    assert "beats them" in S.versus_raw_pixels(40.0, 60.0, 400, 1.0)["line"]
