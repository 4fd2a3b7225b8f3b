"""cropmae.py: masking counts, the norm-pix loss by hand, the Global-to-Local geometry, the
decoder's block order and the official key names and parameter counts, SiamMAE frame pairs,
and whole runs (learning, resume, official-checkpoint loading, 2-process DDP, CLI)."""
import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import cropmae as C
from common import checkpoint, data, evaluate, log, synthetic, vit
from tests import checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(**kw) -> C.Args:
    base = dict(model="tiny", depth=2, patch_size=8, img_size=32, mask_ratio=0.75,
                decoder_dim=32, decoder_depth=2, decoder_heads=4, decoder_ffn=64,
                batch_size=8, num_workers=0, amp="none", warmup_epochs=1)
    return C.Args(**{**base, **kw})


# ---- masking and loss ----
@pytest.mark.parametrize("ratio,keep", [(0.75, 49), (0.90, 19), (0.95, 9), (0.985, 2), (0.99, 1)])
def test_visible_token_counts(ratio, keep):
    torch.manual_seed(0)
    ids_keep, ids_restore, mask = C.random_masking(4, 196, ratio, "cpu")
    assert ids_keep.shape == (4, keep) and mask.shape == (4, 196)
    assert (mask.sum(1) == 196 - keep).all()
    assert (torch.gather(mask, 1, ids_keep) == 0).all()  # the kept tokens are the unmasked ones
    # the official draw: noise = rand(B, L), keep the smallest noise values
    torch.manual_seed(0)
    noise = torch.rand(4, 196)
    assert torch.equal(ids_keep, noise.argsort(1)[:, :keep])
    assert torch.equal(noise.argsort(1).gather(1, ids_restore), torch.arange(196).expand(4, -1))
    with pytest.raises(ValueError, match="keeps 0"):
        C.random_masking(1, 64, 0.985, "cpu")


def boolean_mask_masking(noise: torch.Tensor, ratio: float) -> tuple:
    """The official MAE `random_masking` written with a host-made mask: ones, the first
    `keep` zeroed, unshuffled by ids_restore (the former implementation here)."""
    B, L = noise.shape
    keep = int(L * (1 - ratio))
    ids_shuffle = noise.argsort(1)
    ids_restore = ids_shuffle.argsort(1)
    mask = torch.ones(B, L)
    mask[:, :keep] = 0
    return ids_shuffle[:, :keep], ids_restore, torch.gather(mask, 1, ids_restore)


@pytest.mark.parametrize("ratio", [0.75, 0.985])
def test_visible_tokens_gathered_equal_the_boolean_mask_selection(ratio, monkeypatch):
    """The gathered visible tokens are exactly those of a boolean-mask index x[~mask] (in noise
    order, as the official code, which is the position order once sorted); the mask equals the
    one built from a host constant; the model's loss and prediction are bit-identical to a
    forward that masks the former way."""
    g = torch.Generator().manual_seed(0)
    noise, x = torch.rand(5, 196, generator=g), torch.randn(5, 196, 8, generator=g)
    keep, ids_restore, mask = C.random_masking(5, 196, ratio, "cpu", noise)
    ref_keep, ref_restore, ref_mask = boolean_mask_masking(noise, ratio)
    checks.assert_same((keep, ids_restore, mask), (ref_keep, ref_restore, ref_mask))
    by_bool = x[mask == 0].view(5, keep.shape[1], 8)  # position order
    assert torch.equal(vit.gather_tokens(x, keep.sort(1).values), by_bool)
    assert torch.equal(vit.gather_tokens(x, keep).sort(1).values, by_bool.sort(1).values)
    torch.manual_seed(0)
    model = C.build_model(tiny_args()).train()  # 16 patches, 4 visible; decoder dropout on
    imgs = torch.randn(3, 2, 3, 32, 32, generator=g)
    torch.manual_seed(1)
    now = model(imgs, 0.75)
    monkeypatch.setattr(C, "random_masking", lambda B, L, r, device, noise=None:
                        boolean_mask_masking(torch.rand(B, L) if noise is None else noise, r))
    torch.manual_seed(1)
    checks.assert_same(now, model(imgs, 0.75))


def test_train_step_makes_one_host_sync():
    """On a GPU the step may read back the non-finite check only: no boolean-mask index, no
    tensor from Python data, no AdamW step counter read (fused, as pretraining on CUDA)."""
    args = tiny_args(mask_ratio=0.75)
    torch.manual_seed(0)
    model = C.build_model(args)
    opt = C.make_optimizer(model, args, fused=True)
    amp = C.optim.Amp("none", torch.device("cpu"))
    imgs = torch.randn(4, 2, 3, 32, 32)
    C.train_step(model, imgs, opt, amp, 0.75)  # the optimiser state exists from here on
    assert checks.count_host_syncs(C.train_step, model, imgs, opt, amp, 0.75) == \
        {"_local_scalar_dense": 1}
    noise = torch.rand(4, 16)
    assert checks.count_host_syncs(C.train_step, model, imgs, opt, amp, 0.75, noise) == \
        {"_local_scalar_dense": 1}


def test_norm_pix_loss_by_hand():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32, generator=g)
    mask = torch.zeros(2, 16)
    mask[0, [1, 5]] = 1
    mask[1, 7] = 1
    t = vit.patchify(imgs, 8).numpy().astype(np.float64)  # (2, 16, 192)
    norm = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
    pred = torch.randn(2, 16, 192, generator=g)
    want = ((pred.numpy() - norm) ** 2).mean(-1)[mask.numpy() == 1].mean()
    assert C.mae_loss(imgs, pred, mask, 8).item() == pytest.approx(want, rel=1e-5)
    # closed form: predicting 0 costs (n - 1) / n * var / (var + eps) per patch, ~ 191 / 192
    assert C.mae_loss(imgs, torch.zeros(2, 16, 192), mask, 8).item() == pytest.approx(191 / 192,
                                                                                   rel=1e-5)
    raw = ((pred.numpy() - t) ** 2).mean(-1)[mask.numpy() == 1].mean()
    assert C.mae_loss(imgs, pred, mask, 8, norm_pix=False).item() == pytest.approx(raw, rel=1e-5)


def test_loss_touches_masked_patches_only():
    imgs = torch.randn(2, 3, 32, 32)
    mask = (torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    mask[:, 0], mask[:, 1] = 1, 0
    pred = torch.randn(2, 16, 192, requires_grad=True)
    C.mae_loss(imgs, pred, mask, 8).backward()
    per_patch = pred.grad.abs().sum(-1)
    assert (per_patch[mask == 0] == 0).all() and (per_patch[mask == 1] > 0).all()
    changed = imgs.clone()
    changed[:, :, :8, 8:16] += torch.randn(2, 3, 8, 8)  # patch 1 (visible): the loss must not see it
    assert C.mae_loss(changed, pred, mask, 8) == C.mae_loss(imgs, pred, mask, 8)
    changed[:, :, :8, :8] += 5.0  # patch 0 (masked): a constant shift is invisible to norm-pix
    assert torch.allclose(C.mae_loss(changed, pred, mask, 8), C.mae_loss(imgs, pred, mask, 8))
    changed[:, :, :8, :8] += torch.randn(2, 3, 8, 8)  # but new content is not
    assert not torch.allclose(C.mae_loss(changed, pred, mask, 8), C.mae_loss(imgs, pred, mask, 8))


def test_model_returns_loss_pred_mask_and_masks_only_the_second_view():
    torch.manual_seed(0)
    model = C.build_model(tiny_args()).eval()
    imgs = torch.randn(3, 2, 3, 32, 32)
    loss, pred, mask = model(imgs, 0.75)
    assert pred.shape == (3, 16, 192) and mask.shape == (3, 16) and (mask.sum(1) == 12).all()
    # V1 enters as memory (the loss depends on it), V2's masked pixels do not enter the input
    torch.manual_seed(1)
    base = model(imgs, 0.75)
    other = imgs.clone()
    other[:, 0] = torch.randn(3, 3, 32, 32)
    torch.manual_seed(1)
    assert not torch.allclose(model(other, 0.75)[1], base[1])
    hidden = base[2][0].nonzero()[0, 0].item()  # a masked patch of sample 0
    r, c = divmod(hidden, 4)
    other = imgs.clone()
    other[0, 1, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] = 9.0
    torch.manual_seed(1)
    assert torch.allclose(model(other, 0.75)[1], base[1], atol=1e-6)


# ---- views ----
def coordinate_image(h=120, w=160) -> Image.Image:
    """R = column, G = row (in 0..255 steps), so a crop's pixels tell where they came from."""
    y, x = np.meshgrid(np.linspace(0, 255, h), np.linspace(0, 255, w), indexing="ij")
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).round().astype(np.uint8))


def pixel_box(view: torch.Tensor) -> np.ndarray:
    rgb = C.unnormalise(view).numpy() * 255
    return np.array([rgb[0].min(), rgb[0].max(), rgb[1].min(), rgb[1].max()])


def test_global_to_local_v2_is_a_subwindow_of_v1():
    args = tiny_args(img_size=64, hflip=False)
    make = C.make_views(args)
    img = coordinate_image()
    for seed in range(20):
        torch.manual_seed(seed)
        pair = make([img])
        assert pair.shape == (2, 3, 64, 64)
        b1, b2 = pixel_box(pair[0]), pixel_box(pair[1])
        assert b2[0] >= b1[0] - 2 and b2[1] <= b1[1] + 2 and b2[2] >= b1[2] - 2 \
            and b2[3] <= b1[3] + 2, (seed, b1, b2)
        area = (b2[1] - b2[0]) * (b2[3] - b2[2]) / ((b1[1] - b1[0]) * (b1[3] - b1[2]))
        assert 0.25 < area < 0.65, area  # local scale 0.3-0.6 of V1 (up to edge pixels)
    # local-to-global: the same views, roles swapped (index 0 = the local crop)
    torch.manual_seed(3)
    a = C.make_views(args)([img])
    torch.manual_seed(3)
    b = C.make_views(dataclasses.replace(args, views="local-to-global"))([img])
    assert torch.equal(a.flip(0), b)
    torch.manual_seed(0)
    same = C.make_views(dataclasses.replace(args, views="same"))([img])
    assert torch.equal(same[0], same[1])


def test_flips_are_independent_per_view():
    make = C.make_views(tiny_args(img_size=64, local_scale=(0.99, 1.0), ratio=(1.33, 1.34)))
    img = coordinate_image(120, 160)  # aspect 4/3: the local crop is all of V1
    agree = []
    for seed in range(40):
        torch.manual_seed(seed)
        a, b = (C.unnormalise(v)[0] for v in make([img]))
        left_right = lambda v: (v[:, 0].mean() < v[:, -1].mean()).item()  # noqa: E731
        agree.append(left_right(a) == left_right(b))
    assert 5 < sum(agree) < 35  # the two flips are separate draws


def test_views_are_deterministic_per_seed_epoch_index(tmp_path):
    root = synthetic.images(tmp_path, size=32, per_class_train=2, per_class_val=1)
    ds = C.pretrain_dataset(tiny_args(data=str(root)))
    assert len(ds) == 16
    assert torch.equal(ds[(1, 3)], ds[(1, 3)])
    assert not torch.equal(ds[(1, 3)], ds[(2, 3)])
    sub = C.list_images(str(root), subset=5, seed=0)
    assert len(sub) == 5 and sub == C.list_images(str(root), subset=5, seed=0)


def test_siammae_frames_share_the_crop_and_are_4_to_47_apart(tmp_path):
    """Frame t = a coordinate ramp + 2 t in the blue channel: V2 - V1 is a constant (same crop
    and flip) whose value gives the gap."""
    ramp = np.array(coordinate_image(64, 80))
    folder = tmp_path / "video"
    folder.mkdir()
    for t in range(60):
        frame = ramp.copy()
        frame[..., 2] = 2 * t
        Image.fromarray(frame).save(folder / f"{t + 1:05d}.png")
    (tmp_path / "list.txt").write_text("video 0\n")
    ds = C.pretrain_dataset(tiny_args(data=str(tmp_path / "list.txt"), views="frames",
                                      img_size=32))
    gaps = []
    for i in range(30):
        v1, v2 = (C.unnormalise(v) * 255 for v in ds[(i, 0)])
        assert (v2[:2] - v1[:2]).abs().max() < 1.0  # same crop, same flip
        gap = (v2[2] - v1[2]).mean().item() / 2
        assert abs(gap - round(gap)) < 0.05
        gaps.append(round(gap))
    assert min(gaps) >= 4 and max(gaps) <= 47 and len(set(gaps)) > 5  # V1 is the earlier frame


# ---- model structure ----
def test_decoder_block_order_cross_ffn_self_post_norm():
    torch.manual_seed(0)
    blk = C.DecoderBlock(16, 4, 32, 0.1).eval()
    x, mem = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    h = blk.norm2(x + blk.multihead_attn(x, mem, mem)[0])
    h = blk.norm3(h + blk.linear2(torch.nn.functional.gelu(blk.linear1(h))))
    h = blk.norm1(h + blk.self_attn(h, h, h)[0])
    assert torch.allclose(blk(x, mem), h, atol=1e-5)
    # the same weights in PyTorch's self -> cross -> FFN order give something else
    ref = nn.TransformerDecoderLayer(16, 4, 32, 0.0, activation="gelu", batch_first=True,
                                     layer_norm_eps=1e-6).eval()
    ref.load_state_dict(blk.state_dict())
    assert not torch.allclose(ref(x, mem), h, atol=1e-3)
    blk.train()  # dropout 0.1 is active in training
    assert not torch.equal(blk(x, mem), blk(x, mem))


def test_official_key_names_and_parameter_counts():
    model = C.build_model(C.Args())
    keys = set(model.state_dict())
    for k in ["patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.11.attn.qkv.weight",
              "blocks.0.mlp.fc2.bias", "norm.weight", "decoder_embed.weight", "mask_token",
              "decoder_pos_embed", "decoder_blocks.3.self_attn.in_proj_weight",
              "decoder_blocks.0.multihead_attn.out_proj.weight", "decoder_blocks.2.linear1.bias",
              "decoder_blocks.1.norm3.weight", "decoder_norm.bias", "decoder_pred.weight"]:
        assert k in keys, k
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    enc = sum(v for n, v in trainable.items() if not n.startswith(("decoder", "mask_token")))
    assert enc == 21_590_016 and sum(trainable.values()) == 28_201_728  # spec §1 arithmetic
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.equal(model.pos_embed[0, 0], torch.zeros(384))  # CLS row
    assert model.decoder_pred.out_features == 768


def test_eval_features_equal_the_training_features_at_the_training_size():
    torch.manual_seed(0)
    model = C.build_model(tiny_args()).eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)[:, 1:]  # (2, 16, D)
    feats = C.patch_features(model, x)  # (2, D, 4, 4)
    assert torch.allclose(feats.flatten(2).transpose(1, 2), tokens, atol=1e-6)
    assert C.patch_features(model, torch.randn(1, 3, 48, 80)).shape == (1, 192, 6, 10)


# ---- whole runs ----
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return str(synthetic.images(tmp_path_factory.mktemp("img"), size=32, per_class_train=6,
                                per_class_val=1))


@pytest.fixture(scope="module")
def tiny_davis(tmp_path_factory):
    return str(synthetic.davis(tmp_path_factory.mktemp("davis"), size=(48, 64), sequences=2,
                               frames=6))


def run_args(data, out, **kw) -> C.Args:
    return tiny_args(**{"data": data, "output_dir": str(out), "epochs": 6, "log_every": 3,
                        "ckpt_every": 1000, **kw})


def test_tiny_run_learns(tiny_data, tiny_davis, tmp_path):
    """The same run with lr = 0 is the control."""
    summary = C.main(run_args(tiny_data, tmp_path / "a", blr=2e-2, davis=tiny_davis,
                              davis_size=(48, 64), eval_random_init=True, random_init_seeds=2,
                              trained_spread=0.01))
    C.main(run_args(tiny_data, tmp_path / "b", blr=0.0, eval_random_init=True))
    loss = {r: [x["train/loss"] for x in log.read_jsonl(str(tmp_path / r / "log.jsonl"))
                if "train/loss" in x] for r in "ab"}
    assert sum(loss["a"][-2:]) < sum(loss["b"][-2:]) - 0.1, loss
    # level 1 (issue 11): the loss on the 8 held-out val images, same pairs and masks for all
    held = {r: json.load(open(tmp_path / r / "summary.json"))["metrics"] for r in "ab"}
    a, b = held["a"]["heldout_loss"], held["b"]["heldout_loss"]
    assert held["a"]["heldout_images"] == {"trained": 8, "random_init": 8, "random_init_2": 8}
    jf = summary["metrics"]["davis_jf"]  # the verdict (DESIGN §3) from the J&F printed
    assert summary["verdict"] == evaluate.verdict(
        "DAVIS J&F", [summary["verdict"]["random_init"][0], summary["verdict"]["random_init"][1]],
        [summary["verdict"]["trained"][0]], trained_spread=0.01, decimals=3)
    assert summary["verdict"]["random_init"] == pytest.approx(
        [jf["random_init"], jf["random_init_2"]], abs=5e-5)
    assert summary["verdict"]["trained"] == pytest.approx([jf["trained"]], abs=5e-5)
    assert a["random_init"] == b["random_init"] == b["trained"]  # lr 0 changes nothing
    se = held["a"]["heldout_loss_se"]
    assert a["trained"] + 3 * se["trained"] < b["trained"] - 3 * se["random_init"], held
    assert summary["steps"] == 6 * 6 and 0 <= summary["metrics"]["davis_jf"]["trained"] <= 1
    assert json.load(open(tmp_path / "a" / "summary.json"))["metrics"] == summary["metrics"]
    assert (tmp_path / "a" / "reconstructions.png").is_file()
    assert (tmp_path / "a" / "propagation.png").is_file()
    assert len(list((tmp_path / "a" / "davis_pred").rglob("*.png"))) == 2 * 6


def heldout_by_hand(args: C.Args, model: C.CropMAE, pred: np.ndarray) -> np.ndarray:
    """Per-image held-out losses of a model that predicts `pred` (p*p*3,) for every patch,
    drawn as documented: pair and mask from (seed + 1, 0, index), the views from the
    pretraining pipeline, the mask noise from `data.sample_rng`; the loss is the mean over
    masked patches of the squared error to the normalised target (per-patch unbiased
    variance, eps 1e-6)."""
    files = sorted(str(p) for p in (Path(args.data) / "val").rglob("*.png"))
    make, L = C.make_views(args), model.num_patches
    keep = int(L * (1 - args.mask_ratio))
    out = []
    for i, f in enumerate(files):
        rng = data.sample_np_rng(args.seed + 1, 0, i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2 ** 62)))
            v2_ = make([Image.open(f).convert("RGB")])[1]
        hidden = torch.rand(L, generator=data.sample_rng(args.seed + 1, 0, i)).argsort()[keep:]
        t = vit.patchify(v2_[None], args.patch_size)[0].numpy().astype(np.float64)[hidden]
        norm = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
        out.append(((pred - norm) ** 2).mean())
    return np.array(out)


def test_pretext_eval_of_a_zero_decoder_is_the_normalised_target_energy(tiny_data):
    args = tiny_args(data=tiny_data, seed=3)
    torch.manual_seed(0)
    model = C.build_model(args)
    nn.init.zeros_(model.decoder_pred.weight)
    nn.init.zeros_(model.decoder_pred.bias)
    out = C.pretext_eval(model, args, "cpu")
    want = heldout_by_hand(args, model, np.zeros(192))  # the mean over masked patches of t^2
    assert out["heldout_images"] == len(want) == 8
    assert out["heldout_loss"] == pytest.approx(want.mean(), rel=1e-5)
    assert out["heldout_loss_se"] == pytest.approx(want.std(ddof=1) / 8 ** 0.5, abs=1e-6)
    assert out["heldout_loss_mean_predictor"] == pytest.approx(out["heldout_loss"], rel=1e-6)
    # the same prediction for every patch, not 0: the loss varies between images, so the SE
    # (std of the 8 per-image losses / sqrt(8)) is far from 0
    bias = torch.randn(192, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.decoder_pred.bias.copy_(bias)
    out = C.pretext_eval(model, args, "cpu")
    want = heldout_by_hand(args, model, bias.numpy().astype(np.float64))
    assert out["heldout_loss"] == pytest.approx(want.mean(), rel=1e-5)
    assert out["heldout_loss_se"] == pytest.approx(want.std(ddof=1) / 8 ** 0.5, rel=1e-3)
    assert out["heldout_loss_se"] > 1e-3


def test_pretext_eval_is_deterministic_and_leaves_the_global_rng_alone(tiny_data, tmp_path):
    args = tiny_args(data=tiny_data)
    torch.manual_seed(0)
    model = C.build_model(args).train()  # decoder dropout 0.1: pretext_eval turns it off
    state = torch.get_rng_state()
    first = C.pretext_eval(model, args, "cpu")
    assert torch.equal(torch.get_rng_state(), state) and model.training
    assert C.pretext_eval(model, args, "cpu") == first
    assert C.pretext_eval(model, dataclasses.replace(args, num_workers=2), "cpu") == first
    assert first["heldout_loss"] > first["heldout_loss_mean_predictor"]  # a random decoder
    assert C.pretext_eval(model, dataclasses.replace(args, seed=1), "cpu") != first
    # skipped: --heldout-images 0, a folder without val/, a video list
    assert C.pretext_eval(model, dataclasses.replace(args, heldout_images=0), "cpu") == {}
    assert C.pretext_eval(model, dataclasses.replace(args, data=str(tmp_path)), "cpu") == {}
    (tmp_path / "list.txt").write_text("video.mp4 0\n")
    assert C.pretext_eval(model, dataclasses.replace(args, data=str(tmp_path / "list.txt")),
                          "cpu") == {}


def test_resume_is_bit_identical(tiny_data, tmp_path):
    C.main(run_args(tiny_data, tmp_path / "straight", max_steps=8))
    C.main(run_args(tiny_data, tmp_path / "resumed", max_steps=4))
    C.main(run_args(tiny_data, tmp_path / "resumed", max_steps=8))  # resumes last.pt
    # masks, views and decoder dropout (0.1) are all random: model, AdamW moments, RNG states
    a = checks.assert_same_checkpoints(tmp_path / "straight" / "last.pt",
                                       tmp_path / "resumed" / "last.pt")
    assert a["step"] == 8


def test_run_killed_with_sigkill_resumes_to_the_uninterrupted_run(tiny_data, tmp_path):
    flags = ["--data", tiny_data, "--model", "tiny", "--depth", "2", "--patch-size", "8",
             "--img-size", "32", "--mask-ratio", "0.75", "--decoder-dim", "32",
             "--decoder-depth", "1", "--decoder-heads", "4", "--decoder-ffn", "64",
             "--batch-size", "8", "--num-workers", "0", "--amp", "none", "--epochs", "3",
             "--warmup-epochs", "1", "--log-every", "100", "--ckpt-every", "1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(checks.python("cropmae.py") + flags + ["--output-dir", str(straight)],
                   check=True, capture_output=True, timeout=300, cwd=ROOT, env=checks.ENV)
    checks.kill_and_resume(checks.python("cropmae.py") + flags + ["--output-dir", str(killed)],
                           str(killed / "last.pt"), 3 * 6)
    checks.assert_same_checkpoints(straight / "last.pt", killed / "last.pt")


def test_eval_only_loads_an_official_style_checkpoint(tiny_davis, tmp_path):
    torch.manual_seed(5)
    model = C.build_model(tiny_args())
    official = {"model": model.state_dict(), "epoch": 399, "args": argparse.Namespace(blr=1e-4)}
    torch.save(official, tmp_path / "checkpoint-399.pth")
    kw = dict(output_dir=str(tmp_path / "e"), eval_only=True, davis=tiny_davis,
              davis_size=(48, 64), data="unused")
    out = C.main(tiny_args(init_from=str(tmp_path / "checkpoint-399.pth"), **kw))
    direct, _ = C.evaluate(model, tiny_args(**kw), "cpu")
    assert out["steps"] == 0 and out["metrics"]["davis_jf"]["trained"] == round(direct["davis_jf"], 4)
    enc_only = {k: v for k, v in model.state_dict().items() if not k.startswith("blocks.1.")}
    torch.save({"model": enc_only}, tmp_path / "broken.pth")
    with pytest.raises(checkpoint.CheckpointError, match="encoder weights missing"):
        C.load_weights(C.build_model(tiny_args()), str(tmp_path / "broken.pth"))


def test_ddp_two_processes_stay_identical(tiny_data, tiny_davis, tmp_path):
    """2 processes stay identical, then both evaluate DAVIS, one sequence each: rank 0's
    summary holds the scores of the final weights evaluated in one process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", os.path.join(ROOT, "cropmae.py"),
           "--data", tiny_data, "--output-dir", str(tmp_path), "--model", "tiny", "--depth", "2",
           "--patch-size", "8", "--img-size", "32", "--mask-ratio", "0.75", "--decoder-dim", "32",
           "--decoder-depth", "1", "--decoder-heads", "4", "--decoder-ffn", "64",
           "--batch-size", "4", "--num-workers", "0", "--amp", "none", "--epochs", "1",
           "--warmup-epochs", "0", "--log-every", "2", "--davis", tiny_davis,
           "--davis-size", "48", "64"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = log.read_jsonl(str(tmp_path / "log.jsonl"))
    steps = [r["step"] for r in recs if "train/loss" in r]
    assert steps[-1] == 48 // 8  # 48 images, global batch 2 x 4
    (diff,) = [r["ddp/max_replica_diff"] for r in recs if "ddp/max_replica_diff" in r]
    assert diff == 0.0
    summary = json.load(open(tmp_path / "summary.json"))
    args = C.cli.parse(C.Args, C.PRESETS, cmd[cmd.index(os.path.join(ROOT, "cropmae.py")) + 1:])
    model = C.build_model(args)
    C.load_weights(model, str(tmp_path / "last.pt"))
    one, preds = C.evaluate(model, args, "cpu")
    for k in ("davis_jf", "davis_j", "davis_f"):
        assert summary["metrics"][k]["trained"] == pytest.approx(one[k], abs=1e-4), k
    assert 0 < one["davis_jf"] < 1
    assert proc.stdout.count("davis_jf") == 1  # the table, printed by rank 0 only
    assert (tmp_path / "propagation.png").is_file()
    for name, _, pred in preds:  # each rank wrote its own sequence's label maps
        for t in range(len(pred)):
            png = C.propagation.read_label_png(tmp_path / "davis_pred" / name / f"{t:05d}.png")
            assert np.array_equal(png, pred[t].numpy()), (name, t)


def test_bench_runs_the_training_step_as_pretraining_does(tiny_data, tmp_path, monkeypatch):
    """--bench calls `train_step` on the model main built, with pretraining's optimiser (the
    same AdamW groups, weight decays, betas), micro-batches as --accum-iter makes them, and
    the peak lr; it reports samples per optimiser step."""
    real, seen = C.train_step, []

    def recording(model, imgs, opt, amp, ratio, noise=None):
        trainable = {id(p) for p in checkpoint.unwrap(model).parameters() if p.requires_grad}
        groups = [(len(g["params"]), g["weight_decay"], g["betas"], g["fused"])
                  for g in opt.param_groups]
        assert {id(p) for g in opt.param_groups for p in g["params"]} == trainable
        seen.append((tuple(imgs.shape), ratio, amp.accum, groups,
                     [g["lr"] for g in opt.param_groups]))
        return real(model, imgs, opt, amp, ratio, noise)
    monkeypatch.setattr(C, "train_step", recording)
    bench = log.bench  # 1 warm-up and 2 timed steps instead of 5 and 20
    monkeypatch.setattr(C.log, "bench", lambda *a, **k: bench(*a, **k, steps=2, warmup=1))
    kw = dict(accum_iter=2, batch_size=4, blr=0.0256)
    C.main(run_args(tiny_data, tmp_path / "train", max_steps=2, warmup_epochs=0, **kw))
    trained, seen[:] = list(seen), []
    out = C.main(run_args(tiny_data, tmp_path / "bench", bench=True, **kw))
    assert [s[2] for s in trained] == [(0, 2), (1, 2)] * 2
    assert [s[2] for s in seen] == [(0, 2), (1, 2)] * 4  # 1 + 1 FLOP count + 2, 2 micro-batches
    assert {s[:2] + (repr(s[3]),) for s in seen} == {s[:2] + (repr(s[3]),) for s in trained}
    assert trained[0][3][0][1] == 0.05 and trained[0][3][1][1] == 0.0  # decayed, not decayed
    assert {lr for s in seen for lr in s[4]} == {0.0256 * (4 * 2) / 256}  # the peak lr
    assert out["batch_per_process"] == 8 and out["accum_iter"] == 2


def test_cli_help_presets_and_unknown_flag():
    out = subprocess.run([sys.executable, "cropmae.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split()).replace("- ", "-")  # argparse wraps after hyphens
    for f in dataclasses.fields(C.Args):
        doc = C.cli.field_docs(C.Args)[f.name]
        assert doc and (f.name == "preset" or " ".join(doc.split()).replace("- ", "-") in text), f.name
    bad = subprocess.run([sys.executable, "cropmae.py", "--mask-ratioo", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unrecognized arguments: --mask-ratioo" in bad.stderr
    siam = C.cli.parse(C.Args, C.PRESETS, ["--preset", "siammae-k400", "--data", "x.txt"])
    assert (siam.views, siam.mask_ratio, siam.frames_scale) == ("frames", 0.95, (0.5, 1.0))
    k400 = C.cli.parse(C.Args, C.PRESETS, ["--preset", "k400-vits", "--data", "x.txt"])
    assert k400.global_scale == (0.5, 1.0) and k400.local_scale == (0.3, 0.6)
    assert C.Args().blr * 2048 / 256 == pytest.approx(8e-4)  # spec §3: lr 8e-4 at batch 2048


def test_warmup_is_five_percent_of_the_epochs(tiny_data, tmp_path):
    """spec §3: warmup int(0.05 x epochs) unless --warmup-epochs is given."""
    for epochs, want in [(400, 20), (800, 40), (100, 5), (30, 1), (10, 0)]:
        assert C.warmup_epochs(C.Args(epochs=epochs)) == want, epochs
    assert C.warmup_epochs(C.Args(epochs=400, warmup_epochs=7)) == 7
    assert C.warmup_epochs(C.Args(epochs=400, warmup_epochs=0)) == 0
    parse = lambda *a: C.cli.parse(C.Args, C.PRESETS, ["--data", "x", *a])  # noqa: E731
    assert C.warmup_epochs(parse("--preset", "in1k-vits", "--epochs", "800")) == 40
    assert C.warmup_epochs(parse("--preset", "in1k-vits", "--warmup-epochs", "3")) == 3
    # the loop uses it: 20 epochs -> 1 warmup epoch = 6 steps; step k logs the lr it ran at
    C.main(run_args(tiny_data, tmp_path, epochs=20, warmup_epochs=-1, max_steps=3, log_every=1,
                    blr=3.2e-2))
    lrs = [r["train/lr"] for r in log.read_jsonl(str(tmp_path / "log.jsonl")) if "train/lr" in r]
    peak = 3.2e-2 * 8 / 256
    assert lrs == pytest.approx([0.0, peak / 6, 2 * peak / 6])


def docstring_commands() -> list:
    """The shell commands of cropmae.py's docstring, continuation lines joined, comments cut."""
    cmds, cur = [], None
    for line in C.__doc__.splitlines():
        code = line.split("#")[0].strip()
        if cur is None and not code.startswith(("python cropmae.py", "torchrun")):
            continue
        cur = (cur or "") + " " + code.rstrip("\\")
        if not code.endswith("\\"):
            cmds.append(shlex.split(cur))
            cur = None
    return cmds


def test_in1k_presets_and_docstring_commands_are_tab1():
    """Tab. 1 (IN-Sub rows, K400): 400 epochs, mask 0.985, global batch 2048 and lr 8e-4
    (blr 1e-4, spec §3), IN Subset of 239,787 images (Sec. 4.1), decoder 256 / 4 / 8."""
    for name, model in [("in1k-vits", "small"), ("in1k-vitb", "base")]:
        a = C.cli.parse(C.Args, C.PRESETS, ["--preset", name, "--data", "x"])
        assert (a.subset, a.model, a.epochs, a.mask_ratio) == (239787, model, 400, 0.985)
        assert (a.views, a.global_scale, a.local_scale) == ("global-to-local", (0.1, 1.0),
                                                            (0.3, 0.6))
        assert (a.decoder_dim, a.decoder_depth, a.decoder_heads, a.decoder_ffn) == \
            (256, 4, 8, 2048)
        assert a.norm_pix_loss and a.blr == 1e-4 and C.warmup_epochs(a) == 20
    trained = set()
    for cmd in docstring_commands():
        i = cmd.index("cropmae.py")
        if i + 1 == len(cmd):
            continue  # the demo
        launcher = dict(t[2:].split("=", 1) for t in cmd[1:i] if "=" in t)
        world = int(launcher.get("nnodes", 1)) * int(launcher.get("nproc_per_node", 1))
        a = C.cli.parse(C.Args, C.PRESETS, cmd[i + 1:])
        assert a.davis and a.jhmdb and a.vip, cmd  # every Tab. 1 column
        if a.eval_only:
            assert a.init_from, cmd
            continue
        trained.add(a.preset)
        assert world * a.batch_size * a.accum_iter == 2048 and a.epochs == 400, cmd
        assert a.blr * world * a.batch_size * a.accum_iter / 256 == pytest.approx(8e-4)
        assert a.subset == (239787 if a.preset.startswith("in1k") else 0), cmd
        assert a.global_scale == ((0.1, 1.0) if a.preset.startswith("in1k") else (0.5, 1.0))
    assert trained == {"in1k-vits", "in1k-vitb", "k400-vits"}


def test_non_finite_loss_stops_before_its_update(tiny_data, tmp_path, monkeypatch):
    """NaN pixels at step 4 make the real loss NaN: no update from it, last.pt of step 2."""
    seen = checks.nan_input_at_step(monkeypatch, C, 4)
    checks.assert_stopped_before_update(
        seen, lambda: C.main(run_args(tiny_data, tmp_path, ckpt_every=2, log_every=5)),
        tmp_path / "last.pt", step=4, kept=2)


# ---- GPU acceptance (run with -m gpu) ----
@pytest.mark.gpu
def test_gpu_step_agrees_with_the_cpu_step():
    """A tiny CropMAE step on CUDA in bf16 and in fp16 (GradScaler) gives the fp32 CPU step's
    loss and gradient; the masks come with the batch and the decoder dropout is off, so both
    devices compute the same thing."""
    args = tiny_args(decoder_dropout=0.0)
    torch.manual_seed(0)
    model = C.build_model(args)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(8, 2, 3, 32, 32, generator=g), torch.rand(8, 16, generator=g))

    def step(m, b, opt, amp):
        return C.train_step(m, b[0], opt, amp, args.mask_ratio, noise=b[1])
    report = checks.assert_gpu_step_agrees(model, batch, step)
    print("cropmae GPU step vs fp32 CPU (loss rel. error, grad cosine, grad norm ratio):", report)


def test_eval_only_vos_on_synthetic_sets(tmp_path, capsys):
    """--eval-only --vos-davis/--vos-ytvos (SIGMA Tab. 4 protocol, common/vos.py): per-frame
    patch tokens of the ViT, its position table resized to 224; summary.json's metrics equal
    common/vos.py called directly; the picture; a bad root is one line on the command line."""
    torch.manual_seed(0)
    model = C.build_model(tiny_args())
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pt")
    yt = str(synthetic.ytvos(tmp_path / "yt", size=(48, 64), videos=2, frames=4))
    out = C.main(tiny_args(output_dir=str(tmp_path / "e"), eval_only=True, data="unused",
                           init_from=str(tmp_path / "ckpt.pt"), vos_ytvos=yt))
    direct = C.vos.vos_metrics(
        lambda x: C.patch_features(model.eval(), x).permute(0, 2, 3, 1), ytvos=yt)
    assert set(out["metrics"]) == set(direct)
    for name, value in direct.items():
        assert out["metrics"][name]["trained"] == round(value, 4), name
    assert (tmp_path / "e" / "vos_ytvos.png").is_file()
    assert checks.cli_error(C, ["--eval-only", "--preset", "demo", "--data", "unused",
                                "--no-eval-random-init", "--vos-davis", str(tmp_path / "nope"),
                                "--output-dir", str(tmp_path / "x")], capsys) == \
        f"error: {tmp_path / 'nope' / 'ImageSets' / '2017' / 'val.txt'}: DAVIS split list " \
        "not found (expected the DAVIS-2017 layout JPEGImages/480p, Annotations/480p, " \
        "ImageSets/2017)"
