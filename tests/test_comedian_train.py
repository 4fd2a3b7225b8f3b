"""comedian.py (training side): the mixup BCE and stage-1 loss against closed forms, the ViViT
(Tab. C.1 parameter counts, official key names, tubelet masking by hand, eval without masking),
the stage-1 -> ViViT mapping, the window samplers, the streamed PCA against an SVD, the teacher
rows, the stage-3 window labels, and whole runs on the synthetic SoccerNet set: each stage
lowers its loss against an lr-0 control, every checkpointing loop resumes bitwise, 2-process
gloo DDP (all stages, and spotting equal to one process), the CLI and a NaN loss."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import comedian as C
from common import checkpoint, cli, log, optim, soccernet, synthetic
from tests import checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster than two fighting over a busy machine, and runs
    compared bitwise (here, or with a torchrun child at OMP_NUM_THREADS=1) must use the same
    thread count. Module scope: the module's run fixtures are made under it too."""
    before, mp = torch.get_num_threads(), pytest.MonkeyPatch()
    torch.set_num_threads(1)
    mp.setenv("CI", "true")  # no progress bars on stderr
    yield
    mp.undo()
    torch.set_num_threads(before)


def tiny(**kw) -> C.Args:
    """A ViViT 32 wide, 2 + 1 blocks, 4 patches of 8 px per 16-px frame, 4-s windows."""
    base = dict(embed_dim=32, depth=2, num_heads=2, temporal_depth=1, temporal_heads=2,
                img_size=16, patch_size=8, window=4.0, drop_path=0.0, proj_hidden=32,
                proj_dim=16, amp="none", num_workers=0)
    return C.Args(**{**base, **kw})


# ---- stage 3: mixup and its BCE ----
def test_mixup_bce_is_bce_against_mixed_labels_and_a_hand_loop():
    g = torch.Generator().manual_seed(0)
    B, T, K = 3, 4, 5
    logits = torch.randn(B, T, K, generator=g) * 3
    y = (torch.rand(B, T, K, generator=g) < 0.3).float()
    y_perm = y[torch.tensor([2, 0, 1])]
    lam = torch.tensor([0.9, 0.2, 0.5])
    got = C.mixup_bce(logits, y, y_perm, lam)
    soft = lam[:, None, None] * y + (1 - lam[:, None, None]) * y_perm
    assert got.item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, soft).item(), rel=1e-6)
    total = 0.0  # written out: sum_b lam_b BCE(b, y_b) + (1 - lam_b) BCE(b, y_perm_b), / BTC
    for b in range(B):
        for t in range(T):
            for c in range(K):
                p = 1 / (1 + math.exp(-logits[b, t, c].item()))

                def bce(target):
                    return -(target * math.log(p) + (1 - target) * math.log(1 - p))
                total += lam[b].item() * bce(y[b, t, c].item()) \
                    + (1 - lam[b].item()) * bce(y_perm[b, t, c].item())
    assert got.item() == pytest.approx(total / (B * T * K), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert C.mixup_bce(logits.bfloat16(), y, y_perm, lam).dtype == torch.float32


def test_mixup_mixes_inputs_with_its_lambda_and_permutation():
    torch.manual_seed(0)
    B = 4
    x = torch.randn(B, 3, 4, 2, 2)
    y = torch.arange(B, dtype=torch.float32)[:, None, None].expand(B, 2, 1)  # row b says b
    lam, perm = torch.tensor([0.9, 0.0, 1.0, 0.25]), torch.tensor([2, 0, 3, 1])
    xm, y_perm = C.mixup(x, y, lam, perm)
    assert y_perm[:, 0, 0].tolist() == [2, 0, 3, 1]
    for b in range(B):  # by hand
        assert torch.allclose(xm[b], lam[b] * x[b] + (1 - lam[b]) * x[perm[b]], atol=1e-6)
    assert torch.equal(xm[2], x[2]) and torch.equal(xm[1], x[0])


def test_the_loader_draws_masks_lambdas_and_a_uniform_permutation():
    """`sample_draws`, the per-window draws of a step: the mask keeps the stated count, in
    order; Beta(0.1, 0.1) is U-shaped (mean 1/2); the argsort of the batch's keys is a uniform
    permutation (each of the 6 of 3 windows about 1/6 of 3,000 batches)."""
    torch.manual_seed(0)
    draws = [C.sample_draws(8, 0.25, 0.1) for _ in range(3000)]
    keep = torch.stack([d[0] for d in draws])
    assert keep.shape == (3000, 6) and (keep.diff(dim=1) > 0).all()
    lams = torch.stack([d[1] for d in draws])
    assert ((lams < 0.1) | (lams > 0.9)).float().mean() > 0.6
    assert abs(lams.mean().item() - 0.5) < 0.03
    keys = torch.stack([d[2] for d in draws]).view(1000, 3)
    counts = torch.unique(keys.argsort(1), dim=0, return_counts=True)[1]
    assert len(counts) == 6 and counts.min() > 120 and counts.max() < 215, counts
    assert C.sample_draws(8, 0.25, 0.0)[1].item() == 1.0  # no mixup: lambda 1


# ---- stage 1: MoCo loss ----
def test_sce_loss_lambda_one_is_moco_cross_entropy():
    g = torch.Generator().manual_seed(1)
    q, k = F.normalize(torch.randn(5, 8, generator=g), dim=1), \
        F.normalize(torch.randn(5, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.1
    want = F.cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    assert C.sce_loss(q, k, queue, 1.0, 0.1).item() == pytest.approx(want.item(), rel=1e-6)
    # and the symmetric SpatialMoCo loss is the mean of the two directions against the queue
    torch.manual_seed(0)
    m = C.SpatialMoCo(tiny(queue_size=8)).eval()
    v1, v2 = torch.randn(2, 3, 2, 16, 16), torch.randn(2, 3, 2, 16, 16)
    with torch.no_grad():
        loss, keys = m(v1, v2)
        q1 = F.normalize(m.predictor(m.projector(m.trunk(v1))), dim=1)
        q2 = F.normalize(m.predictor(m.projector(m.trunk(v2))), dim=1)
        k1 = F.normalize(m.projector_m(m.trunk_m(v1)), dim=1)
        k2 = F.normalize(m.projector_m(m.trunk_m(v2)), dim=1)
    Q = m.memory.queue
    ce = lambda q_, k_: F.cross_entropy(  # noqa: E731
        torch.cat([(q_ * k_).sum(1, keepdim=True), q_ @ Q.T], 1) / 0.1, torch.zeros(2).long())
    assert loss.item() == pytest.approx(((ce(q2, k1) + ce(q1, k2)) / 2).item(), rel=1e-5)
    assert torch.allclose(keys, torch.cat([k1, k2]), atol=1e-6)


# ---- the ViViT ----
def block_params(D: int) -> int:
    """One timm block: qkv 3D^2+3D, proj D^2+D, fc1 4D^2+4D, fc2 4D^2+D, two norms 4D."""
    return 12 * D * D + 13 * D


def vivit_counts(a: C.Args) -> tuple:
    v = C.ViViT(a)
    n = lambda *mods: sum(p.numel() for m in mods for p in (  # noqa: E731
        m.parameters() if isinstance(m, torch.nn.Module) else [m]))
    spatial = n(v.patch_embed, v.spatial_cls_token, v.pos_embed, v.spatial_transformer)
    temporal = n(v.time_embed, v.temporal_mask_token, v.temporal_transformer)
    assert spatial + temporal == n(v)
    return spatial, temporal


@pytest.mark.parametrize("preset,depth,want", [
    ("vivit-t", 4, (5.7, 1.8, 7.5)), ("vivit-s", 4, (22.0, 7.1, 29.1)),
    ("vivit-t", 6, (None, None, 8.3)), ("vivit-t", 8, (None, None, 9.2))])
def test_vivit_parameter_counts_follow_table_c1(preset, depth, want):
    """Tab. C.1 (32-s clip, depth 4), rounded to 0.1 M; depth 6 -> 8.3 M, 8 -> 9.2 M."""
    a = cli.parse(C.Args, C.PRESETS, ["--data", "x", "--preset", preset, "--temporal-depth",
                                      str(depth), "--window", "32"])
    spatial, temporal = vivit_counts(a)
    D, N = a.embed_dim, (224 // 16) ** 2
    assert spatial == (3 * 2 * 16 * 16 * D + D) + D + (1 + N) * D + 12 * block_params(D) + 2 * D
    assert temporal == 32 * D + D + depth * block_params(D) + 2 * D
    for got, ref in zip((spatial, temporal, spatial + temporal), want):
        if ref is not None:
            assert round(got / 1e6, 1) == ref, (got, ref)


def test_official_parameter_names():
    sd = C.ViViT(tiny(temporal_depth=2)).state_dict()
    for k in ["patch_embed.proj.weight", "patch_embed.proj.bias", "spatial_cls_token",
              "pos_embed", "time_embed", "temporal_mask_token",
              "spatial_transformer.blocks.0.norm1.weight",
              "spatial_transformer.blocks.0.attn.qkv.weight",
              "spatial_transformer.blocks.1.attn.proj.bias",
              "spatial_transformer.blocks.0.norm2.bias",
              "spatial_transformer.blocks.0.mlp.fc1.weight",
              "spatial_transformer.norm.weight", "temporal_transformer.blocks.0.mlp.fc2.bias",
              "temporal_transformer.blocks.1.attn.qkv.bias", "temporal_transformer.norm.bias"]:
        assert k in sd, k
    assert sd["pos_embed"].shape == (1, 5, 32) and sd["time_embed"].shape == (1, 4, 32)
    assert sd["temporal_mask_token"].shape == (1, 1, 32) and (sd["temporal_mask_token"] == 0).all()
    assert sd["patch_embed.proj.weight"].shape == (32, 3, 2, 8, 8)
    # eztorch's PatchEmbed.init_weights: Kaiming fan-in weight, bias 0 (ViViT and stage 1)
    assert (sd["patch_embed.proj.bias"] == 0).all()
    assert sd["patch_embed.proj.weight"].std().item() == pytest.approx(
        math.sqrt(2 / (3 * 2 * 8 * 8)), rel=0.1)
    spotter = C.Spotter(tiny()).state_dict()
    assert spotter["head_class.layers.0.weight"].shape == (17, 32)
    assert (spotter["head_class.layers.0.bias"] == 0).all()
    assert "trunk.spatial_transformer.blocks.0.attn.qkv.weight" in spotter
    moco = C.SpatialMoCo(tiny(queue_size=8)).state_dict()  # stage 1: timm names, unwrapped
    for k in ["trunk.cls_token", "trunk.blocks.0.attn.qkv.weight", "trunk.norm.weight",
              "trunk.patch_embed.proj.weight", "trunk_m.blocks.1.mlp.fc2.bias"]:
        assert k in moco, k
    assert "predictor.2.bias" not in moco and "predictor.2.weight" in moco  # no last bias
    assert (moco["trunk.patch_embed.proj.bias"] == 0).all()
    assert "projector.4.bias" in moco


def test_weight_decay_skips_norms_biases_embeddings_and_tokens():
    m = C.Spotter(tiny())
    groups = C.optimizer_for(m, tiny()).param_groups
    wd = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert len(wd) == len(list(m.parameters()))
    for n, v in wd.items():
        no = (n.endswith(".bias") or ".norm" in n or n.split(".")[-1] in (
            "pos_embed", "time_embed", "spatial_cls_token", "temporal_mask_token"))
        assert v == (0.0 if no else 0.05), n


def test_masked_tubelets_skip_the_encoder_and_take_the_mask_token():
    torch.manual_seed(0)
    v = C.ViViT(tiny(), mask_ratio=0.5).eval()
    with torch.no_grad():
        v.temporal_mask_token.normal_()  # (zero at init) a visible value
    x = torch.randn(2, 3, 8, 16, 16)
    keep = torch.tensor([[0, 2, 3], [1, 2, 3]])  # clip 0 drops token 1, clip 1 token 0
    x2 = x.clone()
    x2[0, :, 2:4] = 7.0  # the frames of the dropped tubelets
    x2[1, :, 0:2] = -3.0
    with torch.no_grad():
        out = v(x, keep)
        assert torch.equal(v(x2, keep), out)  # their pixels never reach the model
        h = v.spatial(x)  # (B, T, D), every tubelet
        h[0, 1], h[1, 0] = v.temporal_mask_token[0, 0], v.temporal_mask_token[0, 0]
        want = v.temporal_transformer(h + v.time_embed)
        full = v(x)
    assert out.shape == (2, 4, 32)
    assert torch.allclose(out, want, atol=1e-5)
    assert not torch.allclose(out, full, atol=1e-3)


def test_eval_never_masks_and_train_encodes_only_the_kept_tokens():
    torch.manual_seed(0)
    v = C.ViViT(tiny(window=8.0), mask_ratio=0.25)
    x = torch.randn(3, 3, 16, 16, 16)
    with torch.no_grad():
        v.temporal_mask_token.normal_()
        plain = v.temporal_transformer(v.spatial(x) + v.time_embed)
        v.eval()
        assert torch.allclose(v(x), plain, atol=1e-6) and torch.equal(v(x), v(x))
    seen = []
    v.spatial_transformer.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    v.train()  # drop_path 0: the mask is the only draw
    for ratio, kept in ((0.25, 6), (0.2, 7), (0.3, 6), (0.5, 4), (0.0, 8)):
        v.mask_ratio = ratio  # floor(ratio x 16 frames) // 2 tokens dropped
        seen.clear()
        torch.manual_seed(3)
        with torch.no_grad():
            out = v(x)
        assert seen == [3 * kept], ratio
        torch.manual_seed(3)
        keep = C.temporal_mask(3, 8, ratio)
        with torch.no_grad():
            v.eval()
            assert torch.allclose(out, v(x, keep), atol=1e-6)  # the mask drawn in train mode
            v.train()
    with pytest.raises(ValueError, match="expected 16 frames"):
        v(torch.randn(1, 3, 8, 16, 16))


# ---- training steps ----
def test_spatial_step_ema_queue_and_no_gradient_to_the_ema_branch():
    a = tiny(queue_size=16)
    torch.manual_seed(0)
    m = C.SpatialMoCo(a).train()
    v1, v2 = torch.randn(2, 3, 2, 16, 16), torch.randn(2, 3, 2, 16, 16)
    loss, _ = m(v1, v2)
    loss.backward()
    assert all(p.grad is None for p in [*m.trunk_m.parameters(), *m.projector_m.parameters()])
    assert all(p.grad is not None for p in [*m.trunk.parameters(), *m.predictor.parameters()])
    m.zero_grad(set_to_none=True)
    opt, amp = C.optimizer_for(m, a), optim.Amp("none", "cpu")
    optim.set_lr_wd(opt, 1e-2)
    C.train_step("spatial", m, [v1, v2], opt, amp, a, 0.5)  # online and EMA now differ
    ema0 = {k: v.clone() for k, v in m.trunk_m.state_dict().items()}
    queue0 = m.memory.queue.clone()
    with torch.no_grad():
        want_loss, want_keys = m(v1, v2)  # EMA keys before this step's update
    out = C.train_step("spatial", m, [v1, v2], opt, amp, a, 0.75)
    assert out["loss"].item() == pytest.approx(want_loss.item(), rel=1e-6)
    online = m.trunk.state_dict()
    for k, v in m.trunk_m.state_dict().items():  # Eq.: m x EMA + (1 - m) x online (new)
        assert torch.allclose(v, 0.75 * ema0[k] + 0.25 * online[k], atol=1e-6), k
    assert int(m.memory.queue_ptr) == 8  # 2 steps x both views' 2 keys
    assert torch.allclose(m.memory.queue[4:8], want_keys, atol=1e-6)
    assert torch.equal(m.memory.queue[8:], queue0[8:])


def test_distill_step_masked_frames_get_no_gradient_and_the_queue_takes_the_teacher():
    a = tiny(distill_queue_size=16)
    torch.manual_seed(0)
    d = C.Distiller(a, 8).train()
    x = torch.randn(2, 3, 8, 16, 16, requires_grad=True)
    p = torch.randn(2, 4, 8)
    torch.manual_seed(5)
    d(x, F.normalize(p, dim=-1)).backward()
    torch.manual_seed(5)
    keep = C.temporal_mask(2, 4, 0.25)  # the draw inside the forward: 1 token of 4 dropped
    for b in range(2):
        for t in range(4):
            g = x.grad[b, :, 2 * t:2 * t + 2].abs().sum()
            assert (g > 0) == (t in keep[b].tolist()), (b, t)
    assert d.trunk.temporal_mask_token.grad.abs().sum() > 0  # it learns (loss on all tokens)
    d.zero_grad(set_to_none=True)
    opt, amp = C.optimizer_for(d, a), optim.Amp("none", "cpu")
    C.train_step("distill", d, [x.detach(), p, keep], opt, amp, a)
    assert int(d.memory.queue_ptr) == 8
    assert torch.allclose(d.memory.queue[:8], F.normalize(p, dim=-1).flatten(0, 1), atol=1e-6)


def test_finetune_step_is_mixup_then_its_bce():
    """The step mixes with the batch's lambdas and argsort(u), masks with its kept tokens
    (train mode) and takes `mixup_bce`; it draws nothing itself (drop-path 0)."""
    a = tiny(ft_mask_ratio=0.25)
    torch.manual_seed(0)
    s = C.Spotter(a).train()
    x = torch.randn(4, 3, 8, 16, 16)
    y = (torch.rand(4, 4, 17) < 0.2).float()
    keep = torch.tensor([[0, 1, 3], [1, 2, 3], [0, 2, 3], [0, 1, 2]])
    lam, u = torch.tensor([0.9, 0.02, 0.5, 1.0]), torch.tensor([0.3, 0.1, 0.9, 0.5])
    with torch.no_grad():
        xm = torch.stack([lam[b] * x[b] + (1 - lam[b]) * x[[1, 0, 3, 2][b]] for b in range(4)])
        want = C.mixup_bce(s(xm, keep), y, y[[1, 0, 3, 2]], lam)
    out = C.train_step("finetune", s, [x, y, keep, lam, u], C.optimizer_for(s, a),
                       optim.Amp("none", "cpu"), a)
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)


def test_a_training_step_makes_one_host_sync():
    """Each stage's step (and both fine-tuning phases), with drop-path, masks and mixup on and
    the optimiser as on CUDA (fused AdamW): the non-finite check is its only host sync."""
    a = tiny(drop_path=0.1, queue_size=16, distill_queue_size=16, mask_ratio=0.25,
             ft_mask_ratio=0.25)
    amp = optim.Amp("none", "cpu")
    torch.manual_seed(0)
    draws = [C.sample_draws(4, 0.25, 0.1) for _ in range(2)]
    keep, lam, u = (torch.stack(d) for d in zip(*draws))
    x, views = torch.randn(2, 3, 8, 16, 16), [torch.randn(2, 3, 2, 16, 16) for _ in range(2)]
    y = (torch.rand(2, 4, 17) < 0.2).float()
    steps = {}
    m = C.SpatialMoCo(a)
    steps["spatial"] = (m, C.optimizer_for(m, a, fused=True), None, views)
    m = C.Distiller(a, 8)
    steps["distill"] = (m, C.optimizer_for(m, a, fused=True), None,
                        [x, torch.randn(2, 4, 8), keep])
    for phase in "AB":
        m = C.Spotter(a)
        name = {"A": "head", "B": "finetune"}[phase]
        steps[f"finetune {phase}"] = (m, *C.loop_optimizer(name, m, a, fused=True),
                                      [x, y, keep, lam, u])
    for name, (model, opt, before_step, batch) in steps.items():
        def step():  # as run_loop runs it
            model.train()
            if before_step:
                before_step()
            return C.train_step(name.split()[0], model, batch, opt, amp, a, 0.99)
        step()  # the optimiser's state is created at the first step
        assert checks.count_host_syncs(step) == {"_local_scalar_dense": 1}, name
    assert not steps["finetune A"][0].trunk.training


# ---- stage 1 -> stage 2 ----
def test_vivit_from_spatial_copies_blocks_and_the_encoder_is_the_same(tmp_path):
    a = tiny(temporal_depth=1)
    torch.manual_seed(0)
    sp = C.SpatialViT(a).eval()
    mapped = C.vivit_from_spatial(sp.state_dict(), a.temporal_depth)
    v = C.ViViT(a).eval()
    missing, unexpected = checkpoint.load_model(v, mapped, strict=False)
    assert sorted(missing) == ["temporal_mask_token", "time_embed"] and unexpected == []
    sd = v.state_dict()
    for k, t in sp.state_dict().items():
        if k.startswith("blocks.0.") or k.startswith("norm."):
            assert torch.equal(sd["temporal_transformer." + k], t), k
        if k.startswith("blocks."):
            assert torch.equal(sd["spatial_transformer." + k], t), k
    assert not any(k.startswith("temporal_transformer.blocks.1.") for k in mapped)
    assert torch.equal(sd["spatial_cls_token"], sp.cls_token)
    x = torch.randn(2, 3, 8, 16, 16)
    with torch.no_grad():  # each tubelet's CLS = the stage-1 ViT on that 1-s clip
        h = v.spatial(x)
        for k in range(4):
            assert torch.allclose(h[:, k], sp(x[:, :, 2 * k:2 * k + 2]), atol=1e-5)
    # load_trunk takes the online trunk of a spatial.pt, not its EMA copy
    moco = C.SpatialMoCo(dataclasses.replace(a, queue_size=8))
    with torch.no_grad():
        for p in moco.trunk_m.parameters():
            p.add_(1.0)
    torch.save({"model": moco.state_dict()}, tmp_path / "spatial.pt")
    got = C.load_trunk(str(tmp_path / "spatial.pt"), a)
    want = C.vivit_from_spatial(moco.trunk.state_dict(), a.temporal_depth)
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_2d_patch_kernel_is_repeated_over_the_tubelet_and_halved():
    a = tiny()
    torch.manual_seed(0)
    sd = C.SpatialViT(a).state_dict()
    w2 = torch.randn(32, 3, 8, 8)
    sd["patch_embed.proj.weight"] = w2
    v = C.ViViT(a)
    checkpoint.load_model(v, C.vivit_from_spatial(sd, 1), strict=False)
    w3 = v.patch_embed.proj.weight
    assert w3.shape == (32, 3, 2, 8, 8)
    assert torch.equal(w3[:, :, 0], w2 / 2) and torch.equal(w3[:, :, 1], w2 / 2)
    img = torch.randn(2, 3, 16, 16)
    tube = img[:, :, None].expand(-1, -1, 2, -1, -1)  # a still image as a 2-frame tubelet
    with torch.no_grad():
        got = v.patch_embed.proj(tube)[:, :, 0]
    want = F.conv2d(img, w2, sd["patch_embed.proj.bias"], stride=8)
    assert torch.allclose(got, want, atol=1e-5)


# ---- released checkpoints: every eztorch layout ----
def lightning(path, sd: dict) -> str:
    """Save `sd` as a Lightning checkpoint (what eztorch's runs write)."""
    torch.save({"state_dict": sd, "epoch": 99, "global_step": 1234,
                "pytorch-lightning_version": "2.0.0"}, path)
    return str(path)


def under(prefix: str, sd: dict) -> dict:
    return {prefix + k: v for k, v in sd.items()}


def test_every_eztorch_layout_loads_unchanged_with_init_from(tmp_path):
    """Stage-1 files (eztorch's SCE `trunk.*` next to `momentum_trunk.*`, `trunk.model.*`,
    an extracted bare ViT) start stage 2 as the mapped ViT; stage-2 files
    (`trunk.transformer.*`, `trunk.model.*`, `trunk.*`, an extracted `transformer.*`) start
    stage 3 with every ViViT weight; fine-tuned files (each trunk layout with `head_class.*`)
    spot with every weight. Each is a Lightning file written here."""
    a = tiny(temporal_depth=1)
    torch.manual_seed(0)
    vit, vivit, spotter = C.SpatialViT(a), C.ViViT(a), C.Spotter(a)
    with torch.no_grad():  # visible values where the init is 0
        for m in (vit, vivit, spotter):
            for p in m.parameters():
                p.add_(torch.randn_like(p))
    vit, vivit, spotter = vit.state_dict(), vivit.state_dict(), spotter.state_dict()
    ema = {k: v + 1.0 for k, v in vit.items()}  # the EMA copy must not be what loads
    extra = {"projector.layers.0.weight": torch.randn(4, 32), "queue": torch.randn(8, 16)}
    stage1 = {"eztorch SCE": {**under("trunk.", vit), **under("momentum_trunk.", ema), **extra},
              "trunk.model": {**under("trunk.model.", vit),
                              **under("momentum_trunk.model.", ema)},
              "extracted": dict(vit)}
    want = C.vivit_from_spatial(vit, a.temporal_depth)
    for name, sd in stage1.items():
        torch.manual_seed(1)
        v = C.ViViT(a)
        fresh = {k: t.clone() for k, t in v.state_dict().items()}
        C.initial_trunk(lightning(tmp_path / f"s1-{name}.ckpt", sd), "stage-1", a, v)
        got = v.state_dict()
        for k, t in got.items():  # the mapped ViT; the time embedding and mask token fresh
            assert torch.equal(t, want[k] if k in want else fresh[k]), (name, k)
        assert sorted(set(got) - set(want)) == ["temporal_mask_token", "time_embed"]
    stage2 = {"eztorch stage 2": {**under("trunk.transformer.", vivit), **extra},
              "trunk.model": under("trunk.model.", vivit), "trunk": under("trunk.", vivit),
              "extracted": under("transformer.", vivit)}
    for name, sd in stage2.items():
        v = C.ViViT(a)
        C.initial_trunk(lightning(tmp_path / f"s2-{name}.ckpt", sd), "stage-2", a, v)
        checks.assert_same(v.state_dict(), vivit, name)
    head = {k: t for k, t in spotter.items() if k.startswith("head_class.")}
    trunk = {k[len("trunk."):]: t for k, t in spotter.items() if k.startswith("trunk.")}
    for prefix in ("trunk.transformer.", "trunk.model.", "trunk."):
        s = C.Spotter(a)
        C.load_spotter(s, lightning(tmp_path / f"s3-{prefix}ckpt", {**under(prefix, trunk),
                                                                  **head}))
        checks.assert_same(s.state_dict(), spotter, prefix)
    # a file in none of them: one line naming what it holds
    other = lightning(tmp_path / "other.ckpt", {"encoder.blocks.0.weight": torch.zeros(2),
                                                "head.fc.bias": torch.zeros(2)})
    for load in (lambda: C.initial_trunk(other, "stage-2", a, C.ViViT(a)),
                 lambda: C.load_spotter(C.Spotter(a), other)):
        with pytest.raises(checkpoint.CheckpointError) as e:
            load()
        assert "\n" not in str(e.value)
        assert str(e.value).endswith("key prefixes in the file (2): encoder.blocks., head.fc."), e
    with pytest.raises(checkpoint.CheckpointError, match=r"key prefixes in the file \(3\): "
                       "projector.layers., queue., trunk.transformer."):  # stage 2: no head
        C.load_spotter(C.Spotter(a), tmp_path / "s2-eztorch stage 2.ckpt")
    with pytest.raises(checkpoint.CheckpointError, match="shape") as e:  # another width
        C.initial_trunk(tmp_path / "s2-trunk.ckpt", "stage-2", tiny(embed_dim=16), C.ViViT(
            tiny(embed_dim=16)))
    assert "\n" not in str(e.value)


# ---- samplers ----
def test_finetune_starts_are_free_of_overlap_and_cover_the_range():
    D, W = 45.25, 8.0
    seen = set()
    for seed in range(200):
        s = C.finetune_starts(D, W, 5, np.random.default_rng(seed))
        assert len(s) == 5 and s[0] == 0.0 and s[1] == math.floor((D - W) / 0.5) * 0.5 == 37.0
        free = sorted(s[2:])
        assert all(2 * t == int(2 * t) for t in free)  # on the 0.5-s grid
        assert all(W / 2 <= t < D - 1.5 * W for t in free), free
        assert all(b - a >= W for a, b in zip(free, free[1:])), free  # no overlap
        seen.update(free)
    assert min(seen) == 4.0 and max(seen) >= D - 1.5 * W - 1.0  # the whole range is reached
    assert len(seen) > 40
    # just fitting: 3 windows of 8 s with starts in [4, 20.5) can only be 4, 12, 20
    for seed in range(20):
        assert C.finetune_starts(32.5, 8.0, 5, np.random.default_rng(seed))[2:] == [4, 12, 20]
    with pytest.raises(cli.InputError, match="do not fit"):  # [4, 20): they do not fit
        C.finetune_starts(32.0, 8.0, 5, np.random.default_rng(0))
    assert C.finetune_starts(40.0, 8.0, 2, np.random.default_rng(0)) == [0.0, 32.0]


def test_distill_starts_one_per_segment():
    D, W, n = 45.75, 8.0, 6
    room = D - W
    for seed in range(50):
        s = C.distill_starts(D, W, n, np.random.default_rng(seed))
        u = np.random.default_rng(seed).random(n)
        assert s == [math.floor(room * (k + u[k]) / n / 0.5) * 0.5 for k in range(n)]
        for k, t in enumerate(s):
            assert 2 * t == int(2 * t) and 0 <= t <= room
            assert room * k / n - 0.5 < t < room * (k + 1) / n  # inside segment k (floored)
    assert C.distill_starts(3.0, 8.0, 4, np.random.default_rng(0)) == [0.0] * 4


# ---- teacher bank ----
def test_fit_pca_matches_an_svd_of_zscored_data(tmp_path):
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(6, 6)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.2])[:, None]
    xs = [rng.normal(size=(n, 6)) @ mix + rng.normal(size=6) * 10 for n in (50, 70)]
    xs[0][:, 4], xs[1][:, 4] = 2.5, 2.5  # a constant feature: StandardScaler keeps std 1
    paths = []
    for i, x in enumerate(xs):
        np.save(tmp_path / f"{i}.npy", x.astype(np.float32))
        paths.append(tmp_path / f"{i}.npy")
    pca = C.fit_pca(paths, 4)
    X = torch.from_numpy(np.concatenate(xs).astype(np.float32).astype(np.float64))
    std = X.std(0, unbiased=False)
    assert torch.allclose(pca["mean"], X.mean(0), atol=1e-9)
    assert torch.allclose(pca["std"][[0, 1, 2, 3, 5]], std[[0, 1, 2, 3, 5]], atol=1e-9)
    assert pca["std"][4] == 1.0
    Z = (X - X.mean(0)) / torch.where(std > 1e-12, std, torch.ones_like(std))
    U, S, Vh = torch.linalg.svd(Z, full_matrices=False)
    ref = (Z @ Vh[:4].T)
    got = ((X - pca["mean"]) / pca["std"]) @ pca["components"]
    assert pca["components"].shape == (6, 4)
    sign = torch.sign((ref * got).sum(0))
    assert torch.allclose(got, ref * sign, atol=1e-8)
    comps = pca["components"]
    assert torch.allclose(comps.T @ comps, torch.eye(4, dtype=comps.dtype), atol=1e-10)
    var = got.var(0)
    assert (var[:-1] > var[1:]).all()
    np.save(tmp_path / "bad.npy", np.zeros(5))
    with pytest.raises(cli.InputError, match="must be \\(T, F\\)"):
        C.fit_pca([tmp_path / "bad.npy"], 2)


def test_pca_sums_of_two_shards_add_up_to_the_one_pass_sums(tmp_path):
    """How ranks share the PCA: the float64 sums of two shards of the files (a rank may have
    none), added, equal the one-pass sums, and give fit_pca's PCA."""
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(5, 5)) * np.array([4.0, 2.0, 1.0, 0.5, 0.1])[:, None]
    paths = []
    for i, n in enumerate((40, 7, 55, 23, 1)):
        np.save(tmp_path / f"{i}.npy", (rng.normal(size=(n, 5)) @ mix + 3.0).astype(np.float32))
        paths.append(tmp_path / f"{i}.npy")
    one = C.pca_sums(paths, 5)
    shards = [C.pca_sums(paths[0::2], 5), C.pca_sums(paths[1::2], width=5)]
    summed = [a + b for a, b in zip(*shards)]
    assert summed[0].item() == one[0].item() == 126
    assert torch.allclose(summed[1], one[1], rtol=1e-13, atol=0)
    assert torch.allclose(summed[2], one[2], rtol=1e-13, atol=0)
    empty = C.pca_sums([], width=5)  # a rank with no file of its own
    assert empty[0].item() == 0 and not empty[1].any() and empty[2].shape == (5, 5)
    got, want = C.pca_from_sums(*summed, 3), C.fit_pca(paths, 3)
    assert torch.allclose(got["mean"], want["mean"], rtol=1e-12)
    assert torch.allclose(got["std"], want["std"], rtol=1e-12)
    sign = torch.sign((got["components"] * want["components"]).sum(0))
    assert torch.allclose(got["components"] * sign, want["components"], atol=1e-10)
    with pytest.raises(cli.InputError, match="no teacher features"):
        C.fit_pca([], 3)


def test_teacher_bank_rows_follow_the_first_frame_and_clamp(tmp_path):
    feats = np.stack([np.arange(20.0), np.arange(20.0) * 2 + 1, -np.arange(20.0)], 1)
    (tmp_path / "g").mkdir()
    np.save(tmp_path / "g" / "2_t.npy", feats)
    h = soccernet.Half("g", 2, "unused", 20.0, [])
    ident = {"mean": torch.zeros(3, dtype=torch.float64), "std": torch.ones(3, dtype=torch.float64),
             "components": torch.eye(3, dtype=torch.float64)}
    bank = C.TeacherBank(tmp_path, "t", 1.0, ident)
    assert bank.window(h, 10.5, 4)[:, 0].tolist() == [10, 11, 12, 13]  # floor(start + j)
    assert bank.window(h, 17.5, 5)[:, 0].tolist() == [17, 18, 19, 19, 19]  # clamped
    assert C.TeacherBank(tmp_path, "t", 0.5, ident).window(h, 3.0, 3)[:, 0].tolist() == [1, 2, 2]
    pca = {"mean": torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64),
           "std": torch.tensor([2.0, 4.0, 1.0], dtype=torch.float64),
           "components": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)}
    out = C.TeacherBank(tmp_path, "t", 1.0, pca).window(h, 4.0, 2)
    assert out.dtype == torch.float32
    for j, r in enumerate((4, 5)):
        z = [(r - 1) / 2, (2 * r + 1 - 2) / 4, -r]
        assert out[j].tolist() == pytest.approx([z[0] + z[2], z[1] + z[2]])


# ---- stage-3 window labels ----
def test_finetune_window_labels_are_the_token_labels_of_its_frames():
    root = synthetic.soccernet()
    a = tiny(window=8.0)
    games = soccernet.read_split(root, "train")[:2]
    halves = soccernet.read_halves(root, games, a.video_name)
    ds = C.Windows(halves, a, "finetune", 6, seed=0)
    assert len(ds) == 12
    events = 0
    for i in range(len(ds)):
        h, start = halves[i // 3], ds.start(1, i)
        x, y, keep, lam, u, index = ds[(1, i)]
        assert index == i and x.shape == (3, 16, 16, 16) and y.shape == (8, 17)
        assert keep.shape == (6,) and lam.shape == u.shape == ()  # alpha_2 0.25: 2 of 8 out
        again = ds[(1, i)]  # the draws are the sample's: (seed, epoch, index)
        assert torch.equal(again[0], x) and all(torch.equal(a_, b_) for a_, b_ in
                                                zip(again[2:5], (keep, lam, u)))
        assert not torch.equal(ds[(2, i)][4], u)
        first = round(2 * start)
        fy = soccernet.frame_labels(h.annotations, h.half, math.floor(2 * h.duration))
        assert torch.equal(y, soccernet.token_labels(fy[first:first + 16]))
        want = torch.zeros(8, 17)  # by hand, in ms: frame t is positive within 500 ms
        for an in h.annotations:
            for f in range(16):
                t_ms = round(1000 * start) + 500 * f
                if an.half == h.half and abs(an.position_ms - t_ms) <= 500:
                    want[f // 2, an.label] = 1
            p = an.position_ms / 1000 - start
            if an.half == h.half and an.visible and 0 <= p < 8:
                assert y[math.floor(p), an.label] == 1  # the token holding the event
                events += 1
        assert torch.equal(y, want)
    assert events >= 3
    assert ds.start(1, 3) == 0.0 and ds.start(1, 4) == math.floor((halves[1].duration - 8) * 2) / 2


# ---- whole runs ----
@pytest.fixture(scope="module")
def sn_root(tmp_path_factory) -> str:
    """The cached synthetic SoccerNet set with shorter lists: 3 training games and 3
    validation games (odd, so 2 processes predict unequal shares)."""
    src = synthetic.soccernet()
    root = tmp_path_factory.mktemp("sn")
    (root / "synth_league").symlink_to(src / "synth_league", target_is_directory=True)
    train = (src / "train.txt").read_text().split("\n")
    valid = (src / "valid.txt").read_text().split("\n") + (src / "test.txt").read_text().split("\n")
    (root / "train.txt").write_text("\n".join([g for g in train if g][:3]) + "\n")
    (root / "valid.txt").write_text("\n".join([g for g in valid if g][:3]) + "\n")
    return str(root)


TINY_RUN = dict(embed_dim=32, depth=2, num_heads=2, temporal_depth=1, temporal_heads=2,
                img_size=16, patch_size=8, window=8.0, drop_path=0.1, proj_hidden=32,
                proj_dim=16, pca_dim=16, teacher_name="stage1", num_workers=0, amp="none",
                spatial_batch_size=4, queue_size=64, spatial_epochs=1, spatial_warmup_epochs=0,
                distill_batch_size=2, distill_windows=4, distill_queue_size=64,
                distill_epochs=1, distill_warmup_epochs=0, ft_batch_size=2, ft_windows=6,
                head_epochs=1, ft_epochs=1, mask_ratio=0.25, ft_mask_ratio=0.25,
                mixup_alpha=0.1, remove_s=1.0, nms_window=4, eval_random_init=False,
                log_every=1, ckpt_every=2, max_steps=4)


def argv(data: str, out, **kw) -> list:
    """Flags for `comedian.py`: the tiny run with `kw` on top (no preset: --data is given)."""
    out_flags = ["--data", data, "--output-dir", str(out)]
    for k, v in {**TINY_RUN, **kw}.items():
        flag = "--" + k.replace("_", "-")
        out_flags += ([flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else
                      [flag, *map(str, v)] if isinstance(v, tuple) else [flag, str(v)])
    return out_flags


def run(data, out, **kw) -> dict:
    return C.main(cli.parse(C.Args, C.PRESETS, argv(data, out, **kw)))


def losses(out, prefix: str) -> list:
    return [r[f"{prefix}/loss"] for r in log.read_jsonl(str(Path(out) / "log.jsonl"))
            if f"{prefix}/loss" in r]


def predictions(out) -> dict:
    return {str(p.relative_to(out)): json.loads(p.read_text())
            for p in sorted(Path(out).rglob("results_spotting.json"))}


def load_stage(args: C.Args, stage: str, path) -> torch.nn.Module:
    m = C.build_model(args, stage, args.pca_dim)
    checkpoint.load_model(m, checkpoint.load(str(path))["model"])
    return m.eval()


def test_each_stage_lowers_its_loss_against_an_lr0_control(sn_root, tmp_path):
    """Each stage run alone (fresh seeds) and its lr-0 control share the init, windows,
    augmentations, masks and mixup (step 1, before any update, logs the same loss); the
    control's checkpoint holds the initial weights. The loss of a fixed batch (eval mode,
    fixed queue) must drop: stage 1, stage 2, phase A (head), then phase B below phase A."""
    a, b = tmp_path / "a", tmp_path / "b"
    kw = dict(max_steps=12, spatial_batch_size=8, distill_epochs=4, head_epochs=3,
              ft_epochs=3, spatial_base_lr=0.1, distill_base_lr=0.5, head_base_lr=1.0,
              ft_base_lr=1.0)
    for stage in ("spatial", "features", "distill", "finetune"):
        run(sn_root, a, stage=stage, **kw)
    run(sn_root, b / "s", stage="spatial", **{**kw, "spatial_base_lr": 0.0})
    run(sn_root, b / "d", stage="distill", init_from=str(a / "spatial.pt"),
        teacher_dir=str(a / "teacher"), **{**kw, "distill_base_lr": 0.0})
    run(sn_root, b / "f", stage="finetune", init_from=str(a / "distill.pt"),
        **{**kw, "head_base_lr": 0.0, "ft_base_lr": 0.0})
    for prefix, control in (("spatial", b / "s"), ("distill", b / "d"), ("head", b / "f")):
        la, lb = losses(a, prefix), losses(control, prefix)
        assert len(la) == len(lb) == 12 and la[0] == lb[0], (prefix, la, lb)
    args = cli.parse(C.Args, C.PRESETS, argv(sn_root, a))
    halves = C.split_halves(sn_root, ["train"], args)
    with torch.no_grad():
        clips = C.SpatialClips(halves, args, 0)
        items = [clips[(0, 7 * i)] for i in range(16)]
        v1, v2 = torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])
        got = {}
        for name, path in (("trained", a / "spatial.pt"), ("init", b / "s" / "spatial.pt")):
            m = load_stage(args, "spatial", path)
            m.memory.queue.copy_(C.Queue(64, 16, args.seed).queue)  # the initial queue
            got[name] = m(v1, v2)[0].item()
        assert got["trained"] < got["init"] - 1.0, got
        bank = C.TeacherBank(a / "teacher", "stage1", 1.0, checkpoint.load(a / "teacher_pca.pt"))
        wins = C.Windows(halves, args, "distill", 4, 0, bank)
        items = [wins[(0, i)] for i in range(len(wins))]
        x, p = torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])
        trained = load_stage(args, "distill", a / "distill.pt")
        init = load_stage(args, "distill", b / "d" / "distill.pt")
        assert torch.equal(trained.memory.queue, init.memory.queue)  # teacher features only
        got = {"trained": trained(x, F.normalize(p, dim=-1)).item(),
               "init": init(x, F.normalize(p, dim=-1)).item()}
        assert got["trained"] < got["init"] - 0.5, got
        wins = C.Windows(halves, args, "finetune", 6, 0)
        items = [wins[(0, i)] for i in range(len(wins))]
        x, y = torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])
        bce = {name: F.binary_cross_entropy_with_logits(
            load_stage(args, "finetune", path)(x), y).item()
            for name, path in (("init", b / "f" / "finetune.pt"), ("head", a / "head.pt"),
                               ("all", a / "finetune.pt"))}
    assert bce["head"] < bce["init"] - 0.3 and bce["all"] < bce["head"] - 0.02, bce


@pytest.fixture(scope="module")
def straight(sn_root, tmp_path_factory) -> Path:
    """All stages in one run, 4 steps per loop, checkpoints every 2, drop-path, masks (both
    stages), mixup and augmentations on."""
    out = tmp_path_factory.mktemp("straight")
    run(sn_root, out, stage="all")
    return out


@pytest.fixture(scope="module")
def ft_straight(sn_root, straight, tmp_path_factory) -> Path:
    """Stage 3 alone (fresh seeds) from the straight run's distill.pt, uninterrupted."""
    out = tmp_path_factory.mktemp("ft_straight")
    run(sn_root, out, stage="finetune", init_from=str(straight / "distill.pt"))
    return out


def stop_and_resume(monkeypatch, sn_root, out, names, **kw) -> None:
    """Run, stopping after step 2 of each loop of `names` in turn, then run to the end."""
    for name in names:
        checks.stop_after_step(monkeypatch, 2, name)
        with pytest.raises(checks.Stop):
            run(sn_root, out, **kw)
        assert checkpoint.load(out / name)["step"] == 2
    run(sn_root, out, **kw)


def test_every_loop_resumes_bitwise(sn_root, straight, ft_straight, tmp_path, monkeypatch):
    """Each loop (spatial.pt, distill.pt, head.pt, finetune.pt) stopped after step 2 and
    restarted in the same folder ends bitwise as the uninterrupted run: weights, EMA copies,
    queues, optimiser, RNG states. Stage 1 is the first loop of `--stage all`, so the straight
    run's spatial.pt is its reference; stages 2 and 3 run alone against runs alone."""
    stop_and_resume(monkeypatch, sn_root, tmp_path / "s", ["spatial.pt"], stage="spatial")
    checks.assert_same_checkpoints(straight / "spatial.pt", tmp_path / "s" / "spatial.pt")
    kw = dict(stage="distill", init_from=str(straight / "spatial.pt"),
              teacher_dir=str(straight / "teacher"))
    run(sn_root, tmp_path / "d0", **kw)
    stop_and_resume(monkeypatch, sn_root, tmp_path / "d1", ["distill.pt"], **kw)
    assert checks.assert_same_checkpoints(tmp_path / "d0" / "distill.pt",
                                          tmp_path / "d1" / "distill.pt")["step"] == 4
    kw = dict(stage="finetune", init_from=str(straight / "distill.pt"))
    stop_and_resume(monkeypatch, sn_root, tmp_path / "f", ["head.pt", "finetune.pt"], **kw)
    for name in ("head.pt", "finetune.pt"):
        assert checks.assert_same_checkpoints(ft_straight / name,
                                              tmp_path / "f" / name)["step"] == 4, name


def test_phase_a_trains_the_head_only_and_phase_b_everything(sn_root, straight):
    a = cli.parse(C.Args, C.PRESETS, argv(sn_root, straight))
    start = C.load_trunk(str(straight / "distill.pt"), a)  # stage 2's trunk
    head = checkpoint.load(straight / "head.pt")["model"]
    full = checkpoint.load(straight / "finetune.pt")["model"]
    assert sorted(start) == sorted(k[6:] for k in head if k.startswith("trunk."))
    for k, v in start.items():
        assert torch.equal(head["trunk." + k], v), k  # frozen in phase A
    assert not torch.equal(head["head_class.layers.0.weight"], full["head_class.layers.0.weight"])
    moved = [k for k in start if not torch.equal(full["trunk." + k], start[k])]
    assert "temporal_mask_token" in moved and "patch_embed.proj.weight" in moved
    assert "spatial_transformer.blocks.0.attn.qkv.weight" in moved
    # stage 2 started its temporal block 0 as a copy of spatial block 0; each moved alone
    d = checkpoint.load(straight / "distill.pt")["model"]
    assert not torch.equal(d["trunk.temporal_transformer.blocks.0.attn.qkv.weight"],
                           d["trunk.spatial_transformer.blocks.0.attn.qkv.weight"])


def test_a_released_lightning_checkpoint_spots_like_ours(sn_root, straight, tmp_path):
    """eztorch's fine-tuned Lightning file (`state_dict`, `trunk.transformer.*`,
    `head_class.*`) predicts exactly what our finetune.pt predicts."""
    sd = checkpoint.load(straight / "finetune.pt")["model"]
    released = {"state_dict": {k.replace("trunk.", "trunk.transformer.", 1): v
                               for k, v in sd.items()}, "epoch": 19}
    torch.save(released, tmp_path / "released.ckpt")
    out = run(sn_root, tmp_path / "spot", stage="spot", init_from=str(tmp_path / "released.ckpt"))
    assert predictions(tmp_path / "spot") == predictions(straight)
    assert len(predictions(straight)) == 3
    assert out["metrics"] == json.loads((straight / "summary.json").read_text())["metrics"]
    assert out["steps"] == 0


def test_explicit_resume_of_the_finetune_stage(sn_root, straight, ft_straight, tmp_path,
                                               monkeypatch):
    """`--stage finetune --resume <dir>/finetune.pt` after a stop in phase B must finish as
    the uninterrupted run: the file is phase B's, phase A is already complete."""
    kw = dict(stage="finetune", init_from=str(straight / "distill.pt"))
    out = tmp_path / "b"
    checks.stop_after_step(monkeypatch, 2, "finetune.pt")
    with pytest.raises(checks.Stop):
        run(sn_root, out, **kw)
    run(sn_root, out, resume=str(out / "finetune.pt"), **kw)
    checks.assert_same_checkpoints(ft_straight / "finetune.pt", out / "finetune.pt")


# ---- DDP ----
def torchrun(args: list) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
           os.path.join(ROOT, "comedian.py"), *args]
    return subprocess.run(cmd, env={**checks.ENV, "CI": "true"}, capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_ddp_two_processes_stay_identical_and_spot_as_one_process(sn_root, tmp_path):
    """All stages on 2 gloo processes: the replicas of every loop stay equal; the 3
    validation games (shares 2 and 1) are predicted and scored as one process predicts and
    scores them from the same finetune.pt."""
    two = tmp_path / "two"
    proc = torchrun(argv(sn_root, two, stage="all", max_steps=3))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = log.read_jsonl(str(two / "log.jsonl"))
    for prefix in ("spatial", "distill", "head", "finetune"):
        assert [r["step"] for r in recs if f"{prefix}/loss" in r] == [1, 2, 3], prefix
    diffs = [r["ddp/max_replica_diff"] for r in recs if "ddp/max_replica_diff" in r]
    assert diffs == [0.0] * 4
    # the teacher-bank PCA, shared by the 2 ranks (3 of the 6 halves each, float64 sums
    # all-reduced over gloo), is the one-process PCA of the same files
    shared = checkpoint.load(two / "teacher_pca.pt")
    alone = C.fit_pca(shared["files"][:-1], 16)
    assert len(shared["files"]) == 7 and "PCA of 6 files, shared by 2" in proc.stdout
    for k in ("mean", "std"):
        assert torch.allclose(shared[k], alone[k], rtol=1e-10), k
    sign = torch.sign((shared["components"] * alone["components"]).sum(0))
    assert torch.allclose(shared["components"] * sign, alone["components"], atol=1e-8)
    one = run(sn_root, tmp_path / "one", stage="spot", init_from=str(two / "finetune.pt"),
              max_steps=3)
    assert predictions(two) == predictions(tmp_path / "one") and len(predictions(two)) == 3
    assert json.loads((two / "summary.json").read_text())["metrics"] == one["metrics"]


def test_ddp_trains_without_masking(sn_root, tmp_path):
    """alpha_2 = 0 (the vivit-t-32s preset, Tab. 6.x masking rows): the mask token gets no
    gradient, and DDP must still run."""
    proc = torchrun(argv(sn_root, tmp_path, stage="finetune", init_from="random",
                         ft_mask_ratio=0.0, max_steps=2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    diffs = [r["ddp/max_replica_diff"] for r in log.read_jsonl(str(tmp_path / "log.jsonl"))
             if "ddp/max_replica_diff" in r]
    assert diffs == [0.0, 0.0]


# ---- --bench ----
def test_bench_times_each_stage_and_phase_as_its_loop_runs_it(monkeypatch):
    """--bench calls the loops' own step (`loop_step`) with each stage's and phase's AdamW,
    its parameter groups and peak lr, phase A's trunk frozen and in eval mode, and batches
    holding the loader's draws at the configured shapes; the steps move the weights."""
    a = cli.parse(C.Args, C.PRESETS, argv(str(synthetic.soccernet()), "unused"))
    seen, real = {}, C.loop_step

    def spy(stage, net, batch, opt, amp, args, momentum, before_step=None):
        model = checkpoint.unwrap(net)
        if id(opt) not in seen:
            seen[id(opt)] = dict(stage=stage, model=model, opt=opt, batch=batch,
                                 start={k: v.clone() for k, v in model.state_dict().items()})
        out = real(stage, net, batch, opt, amp, args, momentum, before_step)
        seen[id(opt)]["trunk_training"] = model.trunk.training
        return out
    monkeypatch.setattr(C, "loop_step", spy)
    out = C.bench(a, torch.device("cpu"), optim.Amp("none", "cpu"))
    assert list(out) == ["spatial", "distill", "head", "finetune"]
    runs = dict(zip(out, seen.values()))
    assert [r["stage"] for r in runs.values()] == ["spatial", "distill", "finetune", "finetune"]

    def groups(opt):
        return [(sorted(g["param_names"]), g["weight_decay"], g["lr"]) for g in opt.param_groups]
    for name, r in runs.items():
        model, b = r["model"], r["batch"][0].shape[0]
        lr = {"spatial": a.spatial_base_lr, "distill": a.distill_base_lr}.get(
            name, a.ft_base_lr) * b / 256
        want = C.optimizer_for(model.head_class if name == "head" else model, a)
        optim.set_lr_wd(want, lr)
        assert groups(r["opt"]) == groups(want), name  # the training AdamW and its groups
        moved = {k for k, v in model.state_dict().items() if not torch.equal(v, r["start"][k])}
        if name == "head":
            assert not r["trunk_training"] and moved == {"head_class.layers.0.weight",
                                                         "head_class.layers.0.bias"}
        else:
            assert r["trunk_training"] and "trunk.patch_embed.proj.weight" in moved, name
    T = int(a.window)  # 8 tokens; alpha 0.25 of 16 frames: 2 tokens dropped
    assert [tuple(t.shape) for t in runs["distill"]["batch"]] == [
        (2, 3, 16, 16, 16), (2, T, a.pca_dim), (2, 6)]
    assert [tuple(t.shape) for t in runs["finetune"]["batch"]] == [
        (2, 3, 16, 16, 16), (2, T, 17), (2, 6), (2,), (2,)]


# ---- GPU acceptance (run with -m gpu on a CUDA machine; skipped here) ----
def gpu_case(phase: str) -> tuple:
    """A tiny ViViT step of `phase` with its randomness in the batch (masks, mixup; drop-path
    0), and `step(model, batch, opt, amp)` as the loops run it, without clipping (so that the
    gradient norms compare)."""
    a = tiny(window=8.0, queue_size=16, distill_queue_size=64, mask_ratio=0.25,
             ft_mask_ratio=0.25, clip_grad=1e6)
    stage, T = phase.split()[0], 8
    torch.manual_seed(0)
    keep, lam, u = (torch.stack(d) for d in zip(*[C.sample_draws(T, 0.25, 0.1)
                                                  for _ in range(4)]))
    x = torch.randn(4, 3, 2 * T, 16, 16)

    def unit_heads(*heads):  # 32 wide at their .02 init, the heads shrink the features to
        with torch.no_grad():  # norm ~1e-3 and the first step's fp16 gradients (~1e3-1e4)
            for layer in (m for h in heads for m in h):  # overflow the 2^10 loss scale:
                if isinstance(layer, torch.nn.Linear):  # unit-norm outputs instead
                    layer.weight.normal_(0, layer.in_features ** -0.5)
    if stage == "spatial":
        model, batch = C.SpatialMoCo(a), [torch.randn(4, 3, 2, 16, 16) for _ in range(2)]
        unit_heads(model.projector, model.predictor)
        model.projector_m.load_state_dict(model.projector.state_dict())
    elif stage == "distill":
        model, batch = C.Distiller(a, 16), [x, torch.randn(4, T, 16), keep]
        unit_heads(model.projector)
    else:
        model, batch = C.Spotter(a), [x, (torch.rand(4, T, 17) < 0.1).float(), keep, lam, u]
        name = {"A": "head", "B": "finetune"}[phase.split()[1]]
        C.loop_optimizer(name, model, a)  # A (head): the trunk frozen

    def step(m, b, opt, amp):
        m.train()
        if phase == "finetune A":
            m.trunk.eval()
        return C.train_step(stage, m, b, opt, amp, a, 0.99)
    return model, batch, step


@pytest.mark.gpu
@pytest.mark.parametrize("phase", ["spatial", "distill", "finetune A", "finetune B"])
def test_gpu_step_agrees_with_the_fp32_cpu_step(phase):
    """The CUDA step in bf16 and in fp16 (GradScaler) gives the fp32 CPU step's loss and
    gradient within the precision's tolerance: stage 1 (MoCo, EMA, queue), stage 2 (masked,
    token SCE loss, queue) and both fine-tuning phases (mixup, phase B masked)."""
    model, batch, step = gpu_case(phase)
    report = checks.assert_gpu_step_agrees(model, batch, step)
    print(phase, report)


# ---- CLI and failures ----
def test_cli_help_unknown_flag_and_user_errors(sn_root, tmp_path, capsys):
    out = subprocess.run([sys.executable, "comedian.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split()).replace("- ", "-")
    for f in dataclasses.fields(C.Args):
        doc = cli.field_docs(C.Args)[f.name]
        assert doc and (f.name == "preset" or doc.replace("- ", "-") in text), f.name
        assert f.name == "preset" or "--" + f.name.replace("_", "-") in text, f.name
    with pytest.raises(SystemExit) as exit_:
        cli.parse(C.Args, C.PRESETS, ["--mask-ration", "0.1"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --mask-ration" in capsys.readouterr().err
    missing = str(tmp_path / "nowhere" / "finetune.pt")
    for kw, msg in ((dict(stage="spot", init_from=missing), missing),
                    (dict(stage="finetune"), "distill.pt"),
                    (dict(stage="finetune", ft_windows=7), "must be even"),
                    (dict(stage="spatial", queue_size=60), "--queue-size 60 must be a multiple")):
        with pytest.raises(SystemExit) as exit_:
            cli.run(C.main, C.Args, C.PRESETS, argv(sn_root, tmp_path / "o", **kw))
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
        assert msg in err[0] and "Traceback" not in err[0]


def test_presets():
    t = cli.parse(C.Args, C.PRESETS, ["--data", "x"])
    assert (t.embed_dim, t.depth, t.temporal_depth, t.window, t.mask_ratio, t.ft_mask_ratio,
            t.tau, t.tau_m, t.lam, t.queue_size, t.distill_queue_size) == (
        192, 12, 6, 64.0, 0.25, 0.25, 0.1, 0.05, 0.5, 65536, 65536)
    assert t.spatial_base_lr * 1024 / 256 == pytest.approx(2e-3)  # spec §4 peaks at B_global
    assert t.distill_base_lr * 32 / 256 == pytest.approx(5e-4)
    assert t.ft_base_lr * 64 / 256 == pytest.approx(2.5e-4)
    assert t.distill_queue_size % (2 * t.distill_batch_size * int(t.window)) == 0
    assert t.queue_size % (2 * 2 * t.spatial_batch_size) == 0
    s = cli.parse(C.Args, C.PRESETS, ["--data", "x", "--preset", "vivit-t-32s"])
    assert (s.window, s.temporal_depth, s.mask_ratio, s.ft_mask_ratio) == (32.0, 4, 0.0, 0.0)
    v = cli.parse(C.Args, C.PRESETS, ["--data", "x", "--preset", "vivit-s"])  # Tab. 6.2 row
    assert (v.embed_dim, v.num_heads, v.temporal_heads, v.window, v.temporal_depth) == (
        384, 6, 6, 32.0, 4)


def nan_batch_at_step(monkeypatch, step: int) -> dict:
    """`checks.nan_input_at_step` for comedian's `train_step(stage, model, batch, ...)`:
    at call `step` the frames of the batch are multiplied by NaN (the real forward then
    gives a NaN loss); records the unwrapped model and its state just before."""
    real, seen = C.train_step, {"calls": 0}

    def wrapped(stage, model, batch, *a, **kw):
        seen["calls"] += 1
        if seen["calls"] == step:
            seen["model"] = checkpoint.unwrap(model)
            seen["before"] = {k: v.clone() for k, v in seen["model"].state_dict().items()}
            batch = [batch[0] * float("nan"), *batch[1:]]  # the frames
        return real(stage, model, batch, *a, **kw)
    monkeypatch.setattr(C, "train_step", wrapped)
    return seen


def test_non_finite_loss_stops_before_its_update(sn_root, tmp_path, monkeypatch):
    """NaN frames at step 3: the weights, the EMA copies and the queue are as before the step
    (stage 1), the head too (phase A); the checkpoint of step 2 is kept."""
    seen = nan_batch_at_step(monkeypatch, 3)
    checks.assert_stopped_before_update(
        seen, lambda: run(sn_root, tmp_path / "s", stage="spatial"),
        tmp_path / "s" / "spatial.pt", step=3, kept=2)
    seen = nan_batch_at_step(monkeypatch, 3)
    checks.assert_stopped_before_update(
        seen, lambda: run(sn_root, tmp_path / "f", stage="finetune", init_from="random"),
        tmp_path / "f" / "head.pt", step=3, kept=2)


def test_bad_inputs_are_refused_before_any_training(sn_root, tmp_path, capsys):
    """The teacher bank (widths, coverage), the splits and a checkpoint of the wrong kind are
    checked before stage 1 trains: one `error:` line, exit 2, no checkpoint written."""
    root = Path(sn_root)
    halves = C.split_halves(root, ["train"], C.Args())

    def bank(name: str, width=lambda k: 8, rows=lambda h: math.ceil(h.duration)) -> Path:
        for k, h in enumerate(halves):
            p = tmp_path / name / h.game / f"{h.half}_feats.npy"
            p.parent.mkdir(parents=True, exist_ok=True)
            np.save(p, np.zeros((rows(h), width(k)), np.float32))
        return tmp_path / name

    cases = [(dict(teacher_dir=str(bank("w", width=lambda k: 6 if k == 3 else 8))),
              "differ in width: [6, 8]"),
             (dict(teacher_dir=str(bank("r", rows=lambda h: 3))), "do not cover"),
             (dict(teacher_dir=str(tmp_path / "none")), "teacher features missing"),
             (dict(eval_split="test"), "test.txt: no game list")]
    for kw, msg in cases:
        out = tmp_path / "o"
        with pytest.raises(SystemExit) as exit_:
            cli.run(C.main, C.Args, C.PRESETS,
                    argv(sn_root, out, stage="all", teacher_name="feats", **kw))
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(err) == 1 and msg in err[0], (kw, err)
        assert not (out / "spatial.pt").exists()
    # a file that holds no ViViT (here a stage-2 PCA file) is not a trunk to start from
    pca = tmp_path / "pca.pt"
    checkpoint.save(pca, {"mean": torch.zeros(3), "std": torch.ones(3)})
    with pytest.raises(SystemExit):
        cli.run(C.main, C.Args, C.PRESETS,
                argv(sn_root, tmp_path / "o2", stage="finetune", init_from=str(pca)))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no stage-2 ViViT weights in a known layout" in err[0], err
    assert err[0].endswith("key prefixes in the file (2): mean., std."), err


def test_random_init_baseline_needs_a_random_trunk():
    """--eval-random-init with no random trunk would leave the verdict's columns empty: a
    one-line error before any work."""
    with pytest.raises(cli.InputError, match="random-init-seeds"):
        C.main(C.Args(eval_random_init=True, random_init_seeds=0))
