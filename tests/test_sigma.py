"""sigma.py: Sinkhorn against a reference loop and closed forms, the tube mask and the pixel-tube
targets against direct computations, the stop-gradients of Eq. 7, the official key names, the
data sampling, and whole runs (learning, resume, 2-process DDP with Sinkhorn's all-reduce,
evaluation, CLI)."""
import copy
import dataclasses
import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sigma as S
from common import checkpoint, log, optim, synthetic
from tests import checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cosines(m, k, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(m, d, generator=g), dim=1)
    return x @ F.normalize(torch.randn(k, d, generator=g), dim=1).T


def sinkhorn_reference(scores, eps, iters):
    """The spec's §1.6 loop written out in float64, one entry at a time."""
    s = scores.double().tolist()
    M, K = len(s), len(s[0])
    Q = [[math.exp(s[m][k] / eps) for m in range(M)] for k in range(K)]  # (K, M)
    total = sum(map(sum, Q))
    Q = [[v / total for v in row] for row in Q]
    for _ in range(iters):
        Q = [[v / sum(row) / K for v in row] for row in Q]
        cols = [sum(Q[k][m] for k in range(K)) for m in range(M)]
        Q = [[Q[k][m] / cols[m] / M for m in range(M)] for k in range(K)]
    cols = [sum(Q[k][m] for k in range(K)) for m in range(M)]
    out = [[Q[k][m] / cols[m] for k in range(K)] for m in range(M)]
    return torch.tensor(out, dtype=torch.float64)


# ---- Sinkhorn ----
def test_sinkhorn_matches_a_reference_loop():
    s = cosines(30, 7)
    q = S.sinkhorn(s, eps=0.05, iters=10)
    assert q.shape == (30, 7) and q.dtype == torch.float32
    assert torch.allclose(q.double(), sinkhorn_reference(s, 0.05, 10), atol=1e-5)


def test_sinkhorn_marginals():
    s = cosines(60, 6, seed=1)
    q = S.sinkhorn(s, eps=0.05, iters=300)
    assert torch.allclose(q.sum(1), torch.ones(60), atol=1e-5)  # each token: a distribution
    assert torch.allclose(q.sum(0), torch.full((6,), 10.0), atol=1e-3)  # equipartition M / K
    # Without Sinkhorn the same scores are far from equipartitioned (the test can fail).
    assert (F.softmax(s / 0.05, 1).sum(0) - 10).abs().max() > 1


def test_sinkhorn_closed_form_symmetric_2x2():
    # Rows and columns already balanced by symmetry: q is the plain softmax of S / eps.
    s = torch.tensor([[0.9, 0.2], [0.2, 0.9]])
    expected = F.softmax(s / 0.1, 1)
    assert torch.allclose(S.sinkhorn(s, eps=0.1, iters=3), expected, atol=1e-6)


def test_sinkhorn_stable_at_eps_003_in_fp32():
    s = cosines(500, 50, seed=2)
    s[0], s[1] = 1.0, -1.0  # extremes of the cosine range: exp(1/0.03) ~ 3e14, exp(-33)
    for inp in (s, s.bfloat16()):
        q = S.sinkhorn(inp, eps=0.03, iters=10)
        assert q.dtype == torch.float32 and torch.isfinite(q).all()
        assert torch.allclose(q.sum(1), torch.ones(500), atol=1e-4)
    assert torch.allclose(S.sinkhorn(s, 0.03, 10).double(), sinkhorn_reference(s, 0.03, 10),
                          atol=1e-5)  # fp32 agrees with the float64 loop


# ---- the loss ----
def features(m=24, k=6, d=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    C = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return torch.randn(m, d, generator=g), torch.randn(m, d, generator=g), C


def test_loss_is_the_symmetric_cross_prediction_of_eq_7():
    x_phi, x_psi, C = features()
    loss, stats = S.sigma_loss(x_phi, x_psi, C, eps=0.05, iters=10, tau=0.1)
    s_phi, s_psi = F.normalize(x_phi, dim=1) @ C.T, F.normalize(x_psi, dim=1) @ C.T
    y_phi, y_psi = S.sinkhorn(s_phi).argmax(1), S.sinkhorn(s_psi).argmax(1)
    p_phi, p_psi = F.softmax(s_phi / 0.1, 1), F.softmax(s_psi / 0.1, 1)  # Eq. 6
    ce = lambda p, y: -p[torch.arange(len(y)), y].log().mean()  # noqa: E731  Eq. 5, one-hot q
    assert loss.item() == pytest.approx((ce(p_phi, y_psi) + ce(p_psi, y_phi)).item(), rel=1e-5)
    # Symmetric in its two inputs (the value; the gradients differ through C.detach()).
    assert S.sigma_loss(x_psi, x_phi, C)[0].item() == pytest.approx(loss.item(), rel=1e-6)
    assert int(stats["codes_phi"]) == len(set(y_phi.tolist()))


def test_soft_targets_tend_to_hard_ones_at_small_eps():
    # Each feature sits on a prototype, classes balanced: q is nearly one-hot.
    C = F.normalize(torch.eye(4, 6), dim=1)
    x = C.repeat(5, 1) + 0.01 * torch.randn(20, 6, generator=torch.Generator().manual_seed(0))
    y = x + 0.01 * torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
    hard = S.sigma_loss(x, y, C, eps=0.02)[0]
    soft = S.sigma_loss(x, y, C, eps=0.02, soft=True)[0]
    assert soft.item() == pytest.approx(hard.item(), rel=1e-3)
    assert S.sigma_loss(x, y, C, eps=1.0, soft=True)[0] > hard + 0.5  # blurred targets


def test_stop_gradients_prototypes_and_targets():
    x_phi, x_psi, C = features()
    for soft in (False, True):
        a, b, c = (t.clone().requires_grad_() for t in (x_phi, x_psi, C))
        S.sigma_loss(a, b, c, soft=soft)[0].backward()
        s_phi = F.normalize(x_phi, dim=1) @ C.T
        s_psi = F.normalize(x_psi, dim=1) @ C.T
        q_phi, q_psi = S.sinkhorn(s_phi), S.sinkhorn(s_psi)
        t_phi, t_psi = (q_phi, q_psi) if soft else (F.one_hot(q_phi.argmax(1), 6).float(),
                                                    F.one_hot(q_psi.argmax(1), 6).float())
        # Reference: targets are constants, and C enters only the phi term.
        c2, a2, b2 = (t.clone().requires_grad_() for t in (C, x_phi, x_psi))
        term_phi = -(t_psi * F.log_softmax(F.normalize(a2, dim=1) @ c2.T / 0.1, 1)).sum(1).mean()
        term_psi = -(t_phi * F.log_softmax(F.normalize(b2, dim=1) @ C.T / 0.1, 1)).sum(1).mean()
        (term_phi + term_psi).backward()
        assert torch.allclose(c.grad, c2.grad, atol=1e-6)
        assert torch.allclose(a.grad, a2.grad, atol=1e-6)
        assert torch.allclose(b.grad, b2.grad, atol=1e-6)


def test_loss_runs_in_fp32_under_bf16_autocast():
    x_phi, x_psi, C = features()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = S.sigma_loss(x_phi.bfloat16(), x_psi.bfloat16(), C)[0]
    assert out.dtype == torch.float32
    ref = S.sigma_loss(x_phi.bfloat16().float(), x_psi.bfloat16().float(), C)[0]
    assert out.item() == pytest.approx(ref.item(), rel=1e-5)


def test_l2_ablation_is_eq_2():
    x_phi, x_psi, C = features()
    assert S.sigma_loss(x_phi, x_psi, C, kind="l2")[0].item() == pytest.approx(
        ((x_phi - x_psi) ** 2).mean().item(), rel=1e-6)


# ---- masking, targets, model ----
def tiny_args(**kw) -> S.Args:
    base = dict(model="tiny", embed_dim=48, depth=2, num_heads=2, decoder_depth=1,
                decoder_dim=32, patch_size=8, num_frames=8, sampling_rate=2, input_size=32,
                proj_hidden=(64,), proj_dim=16, num_prototypes=12, batch_size=4, base_lr=0.05,
                warmup_epochs=1, num_workers=0, amp="none", knn_k=(5,), ft_batch_size=4,
                test_clips=2, test_crops=3, synthetic_per_class=(4, 2))
    return S.Args(**{**base, **kw})


def test_tube_mask_counts_and_constancy_over_time():
    a = S.Args()  # paper setting: 16 x 224^2, tubelet 2x16x16
    m = S.tube_mask(a, np.random.default_rng(0))
    assert m.dtype == torch.bool and m.shape == (1568,)
    assert int(m.sum()) == 1408 and int((~m).sum()) == 160  # spec §1.1
    per_t = m.view(8, 196)
    assert (per_t == per_t[0]).all() and int(per_t[0].sum()) == 176
    assert not torch.equal(m, S.tube_mask(a, np.random.default_rng(1)))


def test_pixel_tubes_against_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, 3, 4, 16, 16, generator=g)
    out = S.pixel_tubes(video, 2, 8)  # (2, 2*2*2, 2*8*8*3)
    assert out.shape == (2, 8, 384)
    raw = S.unnormalise(video)
    b, t, h, w = 1, 1, 0, 1  # token t*4 + h*2 + w = 5
    tube = raw[b, :, 2 * t:2 * t + 2, 8 * h:8 * h + 8, 8 * w:8 * w + 8]  # (3, 2, 8, 8)
    pix = tube.permute(1, 2, 3, 0).reshape(128, 3)  # (p0 p1 p2) c
    direct = (pix - pix.mean(0)) / (pix.std(0, unbiased=True) + 1e-6)
    assert torch.allclose(out[b, 5], direct.reshape(-1), atol=1e-5)  # channel-fastest
    assert torch.allclose(out[b, 5].view(128, 3).mean(0), torch.zeros(3), atol=1e-5)


def test_state_dict_uses_the_official_names_and_phi_has_3_28m_params():
    m = S.build_model(S.Args(model="small"))
    keys = set(m.state_dict())
    for k in ("encoder.patch_embed.proj.weight", "encoder.blocks.11.attn.q_bias",
              "encoder.blocks.0.attn.v_bias", "encoder.blocks.0.attn.qkv.weight",
              "encoder.blocks.0.mlp.fc2.bias", "encoder.norm.weight", "encoder_to_decoder.weight",
              "mask_token", "decoder.blocks.3.norm1.weight", "decoder.norm.weight",
              "decoder.head.weight", "prototypes", "head.0.weight", "head.6.bias"):
        assert k in keys, k
    assert "encoder.blocks.0.attn.qkv.bias" not in keys and "encoder_to_decoder.bias" not in keys
    assert not any("pos" in k for k in keys)  # fixed sin-cos tables are not stored
    assert "decoder.blocks.4.norm1.weight" not in keys  # depth 4
    assert m.decoder.head.weight.shape == (256, 192) and m.prototypes.shape == (3000, 256)
    assert sum(p.numel() for p in m.head.parameters()) == 3_279_616  # Tab. 7a "base 3M"
    assert m.mask_token.abs().max() <= 0.02


def test_encoder_sees_only_visible_tokens():
    torch.manual_seed(0)
    a = tiny_args()
    m = S.build_model(a).eval()
    mask = torch.stack([S.tube_mask(a, np.random.default_rng(i)) for i in range(2)])
    video = torch.randn(2, 3, 8, 32, 32)
    z = m.encoder(video, mask)
    assert z.shape == (2, int((~mask[0]).sum()), 48)
    # Changing the pixels of masked tubes leaves the visible tokens unchanged.
    noisy = video + 5 * torch.randn_like(video) * \
        mask.view(2, 4, 4, 4).repeat_interleave(2, 1).repeat_interleave(8, 2) \
        .repeat_interleave(8, 3)[:, None].float()
    assert torch.allclose(m.encoder(noisy, mask), z, atol=1e-5)
    assert not torch.allclose(m.encoder(noisy), m.encoder(video), atol=1e-3)


def test_encoder_embeds_only_visible_tubes_with_the_official_numbers():
    """The encoder embeds only the visible tubelets; the official order (embed all N tokens,
    add the table, drop the masked ones) gives the same outputs and gradients (float rounding:
    a matmul on the tubes instead of the convolution)."""
    torch.manual_seed(0)
    a = tiny_args()
    enc = S.build_model(a).encoder
    mask = torch.stack([S.tube_mask(a, np.random.default_rng(i)) for i in range(2)])
    video = torch.randn(2, 3, 8, 32, 32)
    g = torch.randn(2, int((~mask[0]).sum()), 48)

    def official(video, mask):
        x = enc.patch_embed(video) + enc.pos_embed  # all N tokens, conv3d
        x = x[~mask].reshape(2, -1, x.shape[-1])
        for blk in enc.blocks:
            x = blk(x)
        return enc.norm(x)

    outs, grads = [], []
    for f in (enc, official):
        enc.zero_grad()
        out = f(video, mask)
        (out * g).sum().backward()
        outs.append(out.detach())
        grads.append({k: p.grad.clone() for k, p in enc.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and "patch_embed.proj.weight" in grads[0]
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-5, msg=k)


def test_train_step_grads_prototypes_renormalised_teacher_untouched(tmp_path):
    torch.manual_seed(0)
    a = tiny_args()
    m = S.build_model(a)
    mask = torch.stack([S.tube_mask(a, np.random.default_rng(i)) for i in range(4)])
    video = torch.randn(4, 3, 8, 32, 32)
    tgt = S.target_input(video, mask, a)
    assert tgt.shape == (4, 64 - 4 * 2, 2 * 8 * 8 * 3) and not tgt.requires_grad
    loss, _ = m(video, mask, tgt)
    assert torch.allclose(m.prototypes.norm(dim=1), torch.ones(12), atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    # The teacher variant: phi is a frozen ViT; its weights never change.
    teacher = S.vit.VisionTransformer(32, 16, 3, 384, 1, 6, pos_embed="learned")
    torch.save(teacher.state_dict(), tmp_path / "dino.pth")
    with pytest.raises(RuntimeError, match="missing"):  # a ViT-S file is not a ViT-B teacher
        S.build_teacher(tiny_args(target="teacher", teacher_weights=str(tmp_path / "dino.pth")))
    full = S.vit.VisionTransformer(32, 16, 3, 384, 12, 6, pos_embed="learned")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in full.state_dict().items()}},
               tmp_path / "dino_full.pth")
    ta = tiny_args(target="teacher", teacher_model="small", patch_size=16,
                   teacher_weights=str(tmp_path / "dino_full.pth"))
    t = S.build_teacher(ta)
    before = {k: v.clone() for k, v in t.state_dict().items()}
    mt = S.build_model(ta)
    assert isinstance(mt.head, torch.nn.Identity) and mt.prototypes.shape == (12, 384)
    mask16 = torch.stack([S.tube_mask(ta, np.random.default_rng(i)) for i in range(2)])
    opt = torch.optim.AdamW(mt.parameters(), lr=1e-3)
    S.train_step(mt, video[:2], mask16, opt, optim.Amp("none", "cpu"), teacher=t)
    assert all(torch.equal(before[k], v) for k, v in t.state_dict().items())
    feats = S.teacher_tokens(t, video[:2])  # (B, 4 * 2 * 2, 384), per clip/channel standardised
    assert feats.shape == (2, 16, 384)
    assert torch.allclose(feats.mean(1), torch.zeros(2, 384), atol=1e-4)


def test_index_selection_equals_boolean_mask_selection():
    """`split_ids` + `select` (fixed-size gathers, no host sync) give the boolean-mask
    selection `x[~mask]` / `x[mask]` bit for bit, values and gradients, on tube masks and on
    random masks with a fixed count per row; a mask with another count is refused."""
    g = torch.Generator().manual_seed(0)
    a = tiny_args()
    n = S.num_masked(a)
    assert n == 4 * int(0.9 * 16) == 56 and S.num_masked(S.Args()) == 1408
    tube = torch.stack([S.tube_mask(a, np.random.default_rng(i)) for i in range(5)])
    scattered = torch.stack([torch.randperm(64, generator=g) < n for _ in range(5)])
    for mask in (tube, scattered):
        assert (mask.sum(1) == n).all()
        x = torch.randn(5, 64, 7, generator=g, requires_grad=True)
        vis, msk = S.split_ids(mask, n)
        assert vis.shape == (5, 8) and msk.shape == (5, 56)
        assert (vis.diff(dim=1) > 0).all() and (msk.diff(dim=1) > 0).all()  # ascending order
        got = [S.select(x, vis), S.select(x, msk)]
        want = [x[~mask].reshape(5, 8, 7), x[mask].reshape(5, 56, 7)]
        for u, v in zip(got, want):
            assert torch.equal(u, v)
        w = torch.randn(5, 64, 7, generator=g)
        grads = [torch.autograd.grad((sel[0] * S.select(w, vis)).sum()
                                     + (sel[1] * S.select(w, msk)).sum(), x)[0]
                 for sel in (got, want)]
        assert torch.equal(*grads) and torch.equal(grads[0], w)  # each row's own gradient
    S.check_mask(tube, n)
    bad = tube.clone()
    bad[2, int((~bad[2]).nonzero()[0])] = True  # one clip with 57 masked tokens
    with pytest.raises(RuntimeError, match="exactly 56 masked"):
        S.check_mask(bad, n)


def tiny_teacher(a: S.Args) -> torch.nn.Module:
    """A 1-block frozen ViT-S/16 standing in for the DINO teacher (random weights)."""
    torch.manual_seed(1)
    net = S.vit.VisionTransformer(a.input_size, 16, 3, S.TEACHER_DIMS[a.teacher_model], 1, 6,
                                  pos_embed="learned")
    for p in net.parameters():
        p.requires_grad = False
    return net.eval()


def step_setting(name: str) -> tuple:
    """(args, model, teacher or None, video, mask) at tiny shapes: the default SIGMA-MLP, or a
    *-dino preset's frozen-teacher target (a tiny teacher); masks as the loader draws them."""
    if name == "mlp":
        a = tiny_args()
    else:  # the *-dino presets: target teacher (patch 16 so the teacher's grid is the student's)
        a = tiny_args(**{**S._DINO, "teacher_model": "small", "patch_size": 16})
    torch.manual_seed(0)
    model = S.build_model(a)
    teacher = tiny_teacher(a) if a.target == "teacher" else None
    mask = torch.stack([S.tube_mask(a, S.data.sample_np_rng(0, 0, i)) for i in range(4)])
    video = torch.randn(4, 3, 8, 32, 32, generator=torch.Generator().manual_seed(2))
    return a, model, teacher, video, mask


@pytest.mark.parametrize("setting", ["mlp", "dino"])
def test_train_step_makes_one_host_sync(setting):
    """One training step with the optimiser pretraining builds on a GPU (`training_setup`:
    fused AdamW over the param groups) stalls the host once: the non-finite check. No
    boolean-mask indexing, no nonzero, no constant built from Python data."""
    a, model, teacher, video, mask = step_setting(setting)
    _, opt, _ = S.training_setup(model, a, torch.device("cuda"))  # fused: also runs on the CPU
    assert opt.defaults["fused"] and len(opt.param_groups) == 2
    amp = optim.Amp("none", "cpu")
    for _ in range(2):  # the first step and a later one (optimiser state already built)
        counts = checks.count_host_syncs(S.train_step, model, video, mask, opt, amp, teacher)
        assert counts == {"_local_scalar_dense": 1}, counts


def test_bench_times_the_training_step_with_its_optimiser(tiny_data, tmp_path, monkeypatch):
    """--bench hands `log.bench` the real step: `train_step` with pretraining's AdamW and param
    groups (no decay on biases, norms and the mask token) at the scaled lr, on tube masks with
    the training count per row, the teacher passed along."""
    seen = {}

    def fake_bench(step_fn, batch_size, device, **kw):
        step_fn()
        return {"batch": batch_size}

    def spy(model, video, mask, opt, amp, teacher=None, clip_grad=0.0):
        seen.update(model=model, video=video, mask=mask, opt=opt, teacher=teacher)
        return real(model, video, mask, opt, amp, teacher, clip_grad)
    real = S.train_step
    monkeypatch.setattr(S.log, "bench", fake_bench)
    monkeypatch.setattr(S, "train_step", spy)
    a = run_args(tiny_data, tmp_path, bench=True)
    assert S.main(a) == {"batch": 4}
    model, opt, mask = seen["model"], seen["opt"], seen["mask"]
    groups = optim.param_groups(model, a.weight_decay)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == \
        [[id(p) for p in g["params"]] for g in groups]
    assert id(model.mask_token) in map(id, opt.param_groups[1]["params"])  # not decayed
    assert id(model.prototypes) in map(id, opt.param_groups[0]["params"])  # decayed (spec §3)
    assert opt.param_groups[0]["lr"] == pytest.approx(a.base_lr * 4 / 256)
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert mask.dtype == torch.bool and mask.shape == (4, 64)
    assert (mask.sum(1) == S.num_masked(a)).all() and not (mask == mask[0]).all()
    assert seen["video"].shape == (4, 3, 8, 32, 32) and seen["teacher"] is None


def test_dinov2_teacher_with_registers_loads_timm_weights_and_resizes_tokens(tmp_path):
    """timm's vit_small_patch14_reg4_dinov2 layout (4 registers, layer scale, a 37 x 37
    position table for the patches only): the table is resized to the input grid, the 5
    prefix tokens are dropped and the patch grid is resized to the student's (spec §1.4)."""
    torch.manual_seed(0)
    src = S.vit.VisionTransformer(518, 14, 3, 384, 12, 6, pos_embed="learned", init_values=1e-5,
                                  reg_tokens=4, no_embed_class=True)
    sd = src.state_dict()
    assert sd["reg_token"].shape == (1, 4, 384) and sd["pos_embed"].shape == (1, 37 * 37, 384)
    assert "blocks.11.ls2.gamma" in sd
    torch.save(sd, tmp_path / "dinov2.pth")
    a = tiny_args(target="teacher", teacher_kind="dinov2", teacher_model="small", input_size=56,
                  teacher_weights=str(tmp_path / "dinov2.pth"))  # 56 px: teacher grid 4 x 4
    t = S.build_teacher(a)
    assert t.num_prefix == 5 and t.patch_embed.grid_size == (4, 4)
    assert torch.equal(t.pos_embed, S.vit.interpolate_pos_embed(sd["pos_embed"], (4, 4), 0,
                                                                antialias=True))
    video = torch.randn(2, 3, 8, 56, 56)
    got = S.teacher_tokens(t, video, grid=7)  # student grid 56 / 8 = 7
    frames = video[:, :, ::2].transpose(1, 2).flatten(0, 1)  # 4 frames per clip
    tok = t.forward_features(frames)[:, 5:].reshape(8, 4, 4, 384).permute(0, 3, 1, 2)
    tok = F.interpolate(tok, size=(7, 7), mode="bilinear", align_corners=False)
    tok = tok.permute(0, 2, 3, 1).reshape(2, 4 * 49, 384)
    want = (tok - tok.mean(1, keepdim=True)) / (tok.std(1, keepdim=True) + 1e-6)
    assert got.shape == (2, 196, 384) and torch.allclose(got, want, atol=1e-5)


# ---- data ----
def test_stride_sampling():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        idx = S.stride_indices(100, 16, 4, rng)
        assert np.all(np.diff(idx) == 4)
        starts.add(idx[0])
    assert min(starts) == 0 and max(starts) == 100 - 64  # start uniform in [0, len - 64]
    assert S.stride_indices(20, 8, 4, rng) == [0, 4, 8, 12, 16, 16, 16, 16]  # short: repeats


def test_multi_scale_crop_sizes_and_offsets():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        top, left, ch, cw = S.multi_scale_crop(240, 320, 224, rng)
        assert ch in (240, 210, 180, 158) and cw in (240, 210, 180, 158)  # 240 x {1,.875,.75,.66}
        assert 0 <= top <= 240 - ch and 0 <= left <= 320 - cw
        assert top % ((240 - ch) // 4 or 1) == 0 and left % ((320 - cw) // 4) == 0
        seen.add((ch, cw))
    sizes = [240, 210, 180, 158]
    assert all(abs(sizes.index(h) - sizes.index(w)) <= 1 for h, w in seen) and len(seen) == 10


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return str(synthetic.videos(tmp_path_factory.mktemp("vid"), size=32, frames=16,
                                per_class_train=4, per_class_val=2))


def pil_bilinear(frames: torch.Tensor, size: int) -> torch.Tensor:
    """The official resize: each uint8 (3, h, w) frame through PIL's bilinear to size^2."""
    from PIL import Image
    return torch.stack([torch.from_numpy(np.array(Image.fromarray(f.permute(1, 2, 0).numpy())
                                                  .resize((size, size), Image.BILINEAR)))
                        for f in frames]).permute(0, 3, 1, 2)


def test_uint8_resize_is_pil_bilinear_on_k400_crops():
    """Every multi-scale crop size of a 320 x 240 frame (158-240 px a side), resized to 224 by
    `PretrainClips`' call (uint8, one call for the clip), is PIL's bilinear within 1 LSB."""
    from torchvision.transforms import v2
    g = torch.Generator().manual_seed(0)
    smooth = F.interpolate(torch.rand(2, 3, 31, 41, generator=g) * 255, size=(240, 320),
                           mode="bicubic").round().clamp(0, 255).to(torch.uint8)
    noise = torch.randint(0, 256, (2, 3, 240, 320), dtype=torch.uint8, generator=g)
    frames = torch.cat([smooth, noise])
    for ch in (240, 210, 180, 158):
        for cw in (240, 210, 180, 158):
            crop = frames[..., 5:5 + ch, 7:7 + cw]
            ours = v2.functional.resize(crop, [224, 224], v2.InterpolationMode.BILINEAR,
                                        antialias=True)
            diff = (ours.int() - pil_bilinear(crop, 224).int()).abs()
            assert ours.dtype == torch.uint8 and diff.max() <= 1, (ch, cw, diff.max())
            assert diff.float().mean() < 0.3  # the two passes round in between (PIL too)


def test_pretrain_clip_draws_and_pixels(tiny_data):
    """A pretraining sample is the official recipe on the draws of (seed, epoch, index), made
    here step by step: stride frames, multi-scale crop box, PIL bilinear resize of the uint8
    crop (within 1 LSB), ImageNet normalisation, then the tube mask from the same generator."""
    from common import data, video
    for size in (32, 24):  # 32 x 32 videos: crops upscaled, or downscaled
        a = tiny_args(data=tiny_data, input_size=size)
        recs = S.read_split(a, True)
        for epoch, index in ((0, 3), (2, 5)):
            clip, mask = S.PretrainClips(recs, a)[(epoch, index)]
            rng = data.sample_np_rng(a.seed, epoch, index)
            path = recs[index].path
            idx = S.stride_indices(video.video_length(path), a.num_frames, a.sampling_rate, rng)
            frames = video.read_clip(path, idx).permute(0, 3, 1, 2)
            top, left, ch, cw = S.multi_scale_crop(*frames.shape[-2:], size, rng)
            want = pil_bilinear(frames[..., top:top + ch, left:left + cw], size)
            assert torch.equal(mask, S.tube_mask(a, rng))  # drawn after the crop, as before
            std = torch.tensor(S.STD)[:, None, None, None]
            err = ((clip - S.to_input(want)) * std * 255).abs()
            assert clip.shape == (3, a.num_frames, size, size) and err.max() <= 1 + 1e-3


def test_to_input_is_normalise_then_transpose():
    """`to_input` transposes first; the numbers are those of the plain formula, bit for bit,
    on uint8 and float frames, and a float input is left as it was."""
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (4, 3, 6, 5), dtype=torch.uint8, generator=g)
    mean = torch.tensor(S.MEAN)[:, None, None]
    std = torch.tensor(S.STD)[:, None, None]
    for frames in (u8, u8.float() + torch.rand(u8.shape, generator=g),
                   u8.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):  # channels-last
        before = frames.clone()
        want = ((frames.float().div(255) - mean) / std).permute(1, 0, 2, 3)
        got = S.to_input(frames)
        assert torch.equal(got, want) and got.is_contiguous() and torch.equal(frames, before)
    x = torch.rand(3, 2, 4, 4, generator=g) * 255  # already (3, T, H, W)-contiguous once
    y = x.transpose(0, 1)
    S.to_input(y)
    assert torch.equal(y.transpose(0, 1), x)


def test_clip_datasets(tiny_data):
    a = tiny_args(data=tiny_data)
    recs = S.read_split(a, True)
    clip, mask = S.PretrainClips(recs, a)[(0, 3)]
    assert clip.shape == (3, 8, 32, 32) and mask.shape == (64,) and int(mask.sum()) == 4 * 14
    again, mask2 = S.PretrainClips(recs, a)[(0, 3)]
    assert torch.equal(clip, again) and torch.equal(mask, mask2)  # from (seed, epoch, index)
    views, label, i = S.ClipViews(recs, a, "test")[5]
    assert views.shape == (2 * 3, 3, 8, 32, 32) and label == recs[5].label and i == 5
    ds = S.ClipViews(recs, a, "test")
    assert ds.windows(16, None) == [[0, 2, 4, 6, 8, 10, 12, 14]] * 2  # 16-frame video: 1 window
    # every 2nd frame: 20 of them; windows of 8 at int(k * (20 - 8) / 1): frames 0 and 24 on
    assert ds.windows(40, None) == [list(range(0, 16, 2)), list(range(24, 40, 2))]
    x, y, _ = S.ClipViews(recs, a, "train")[(1, 2)]
    assert x.shape == (3, 8, 32, 32) and torch.isfinite(x).all()
    two, _, _ = S.ClipViews(recs, tiny_args(data=tiny_data, num_sample=2), "train")[(1, 2)]
    assert two.shape == (2, 3, 8, 32, 32) and not torch.equal(two[0], two[1])  # 2 augmentations


class FixedEnd:
    """A generator whose `integers` returns a chosen value (the official random end)."""

    def __init__(self, end):
        self.end = end

    def integers(self, lo, hi):
        assert lo <= self.end < hi
        return self.end


def test_training_windows_are_the_official_formula():
    # 250 frames, 16 x rate 4 = 64, end 100: linspace(36, 100, 16) = 36 + 64 k / 15, truncated,
    # the last (100) clipped to 99
    assert S.train_window(250, 16, 4, FixedEnd(100)) == [36, 40, 44, 48, 53, 57, 61, 65, 70, 74,
                                                         78, 82, 87, 91, 95, 99]
    # 40 frames <= 64: linspace(0, 40, 10) = 0, 4.44, 8.89, ..., 40 then 40 x 6, clipped to 39
    assert S.train_window(40, 16, 4, None) == [0, 4, 8, 13, 17, 22, 26, 31, 35] + [39] * 7
    # 64 frames (= 16 x 4, the short branch): linspace(0, 64, 16) = 64 k / 15, the last -> 63
    assert S.train_window(64, 16, 4, None) == [0, 4, 8, 12, 17, 21, 25, 29, 34, 38, 42, 46, 51,
                                               55, 59, 63]


class Highest:
    """A generator whose `integers(lo, hi, size)` returns its largest values (hi - 1)."""

    def integers(self, lo, hi, size=None):
        return np.full(size, hi - 1) if size is not None else hi - 1


def test_ssv2_training_frames_are_the_official_tsn():
    # 40 frames, 16 segments: avg 2, frame 2 i + 1 at most: never past 31
    assert S.tsn_train_indices(40, 16, Highest()) == list(range(1, 32, 2))
    assert S.tsn_train_indices(50, 16, Highest()) == [3 * i + 2 for i in range(16)]  # ends at 47
    assert S.tsn_train_indices(12, 16, Highest()) == [0] * 16


def test_test_windows_are_the_official_placement():
    # 250 frames at rate 4: 63 frames 0..248; step (63 - 16) / 4 = 11.75: 0, 11, 23, 35, 47
    wins = S.test_windows(250, 16, 4, 5)
    assert [w[0] for w in wins] == [0, 44, 92, 140, 188]
    assert all(w == list(range(w[0], w[0] + 64, 4)) for w in wins) and wins[-1][-1] == 248
    assert S.test_windows(30, 16, 4, 2) == [[0, 4, 8, 12, 16, 20, 24, 28] + [28] * 8] * 2
    assert S.test_windows(250, 16, 4, 1) == [list(range(92, 156, 4))]  # centre: (63 - 16) // 2


def test_test_crops_at_int_offsets_without_antialiasing(tiny_data, tmp_path):
    """A 48 x 80 video, views of 32: resized to 32 x 53 (int(32 * 80 / 48)), bilinear without
    antialiasing; 3 crops at int(k * 21 / 2) = 0, 10, 21 along the width."""
    frames = torch.arange(48 * 80, dtype=torch.float32).reshape(48, 80) % 251
    rgb = frames[None, :, :, None].expand(16, 48, 80, 3).to(torch.uint8)
    path = S.video.write_video(tmp_path / "v.mkv", rgb.numpy(), 25, "libx264", crf=0)
    a = tiny_args(data=tiny_data, test_clips=1, test_crops=3)
    views, _, _ = S.ClipViews([S.data.VideoRecord(str(path), 0)], a, "test")[0]
    decoded = S.video.read_clip(str(path), [0]).permute(0, 3, 1, 2).float()
    small = F.interpolate(decoded, size=(32, 53), mode="bilinear", align_corners=False)
    for k, off in enumerate((0, 10, 21)):
        want = S.to_input(small[..., :, off:off + 32])[:, 0]
        assert torch.allclose(views[k][:, 0], want, atol=1e-5), off


def test_synthetic_plain_and_scaled_videos():
    """The demo's video options in common/synthetic.py: flat backgrounds, larger objects, and
    the same random draws otherwise."""
    def clip(scale, plain):
        return synthetic._clip(np.random.default_rng([0, 2, 5]), "move_right", 64, 4, scale, plain)
    tex, flat, big = clip(1.0, False), clip(1.0, True), clip(1.5, True)
    bg = flat[0, 0, 0]
    assert (flat == bg).all(-1).mean() > 0.8 and tex.std((1, 2)).mean() > flat.std((1, 2)).mean()
    obj = ~(flat == bg).all(-1)
    assert (flat[obj] == tex[obj]).all(-1).mean() > 0.8  # same object, same colours
    ratio = (~(big == bg).all(-1)).sum() / obj.sum()
    assert 1.8 < ratio < 2.7  # area x 1.5^2


class PixelOracle(torch.nn.Module):
    """Token features = (object share, background share) of each tube, from the pixels."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x):
        pix = S.unnormalise(x)
        bg = pix.flatten(2).median(2).values[:, :, None, None, None]
        fg = ((pix - bg).abs().amax(1, keepdim=True) > 0.1).float()
        k = (self.a.tubelet, self.a.patch_size, self.a.patch_size)
        share = (F.avg_pool3d(fg, k, k).flatten(1) > 0.25).float()
        return torch.stack([share, 1 - share], -1) + 1e-3


def test_segmentation_eval_scores_an_oracle_100(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_REFS_CACHE", str(tmp_path))
    a = tiny_args(synthetic_plain=True, synthetic_scale=1.5, synthetic_per_class=(1, 2))
    amp = optim.Amp("none", "cpu")
    assert S.segmentation_eval(PixelOracle(a), a, torch.device("cpu"), amp)["seg_miou"] == \
        pytest.approx(100.0)
    # Position-only tokens (the sin-cos table) cut the clip by place, not by object.
    class PosOnly(torch.nn.Module):
        def forward(self, x):
            return S.vit.sincos_1d(64, 8)[None].expand(len(x), -1, -1)
    assert S.segmentation_eval(PosOnly(), a, torch.device("cpu"), amp)["seg_miou"] < 70


def test_segmentation_verdict_over_random_inits(tmp_path, monkeypatch):
    """The demo's second verdict: --random-init-seeds inits segmented (the first is the
    run's own start, the table's random-init column), the trained mIoU against them, and the
    one-run rule only with a measured trained spread."""
    monkeypatch.setenv("SSL_REFS_CACHE", str(tmp_path / "cache"))
    kw = dict(output_dir=str(tmp_path / "run"), synthetic_plain=True, synthetic_scale=1.5,
              synthetic_per_class=(1, 2), max_steps=1, eval_random_init=True,
              random_init_seeds=3, quick_probe=False)
    summary = S.main(tiny_args(**kw))
    ver, seg = summary["verdict_segmentation"], summary["metrics"]["seg_miou"]
    assert len(ver["random_init"]) == 3 and len(set(ver["random_init"])) == 3
    assert round(ver["random_init"][0], 2) == seg["random_init"]
    assert round(ver["trained"][0], 2) == seg["trained"]
    assert ver["rule"].startswith("needs") and not ver["helps"]
    with open(tmp_path / "run" / "summary.json") as fh:
        assert json.load(fh)["verdict_segmentation"] == ver
    again = S.main(tiny_args(**{**kw, "output_dir": str(tmp_path / "b"),
                                "seg_trained_spread": 5.0}))["verdict_segmentation"]
    assert again["random_init"] == ver["random_init"] and again["spread"][1] == 5.0
    assert again["rule"].startswith("trained - random > 2 x larger spread")


def test_mix_targets():
    torch.manual_seed(0)
    a = tiny_args()
    x, y = torch.randn(4, 3, 8, 32, 32), torch.tensor([0, 1, 2, 3])
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        xm, t = S.mix(x, y, dataclasses.replace(a, mixup=mixup, cutmix=cutmix), 5)
        assert torch.allclose(t.sum(1), torch.ones(4)) and t.min() >= 0.1 / 5 - 1e-6
        lam = t[0, 0] - t[0, 3]  # target = lam * s(y) + (1 - lam) * s(flip y)
        lam = float((lam / 0.9 + 1) / 2)
        if cutmix:  # the pixels of sample 0 that come from sample 3 are a 1 - lam share
            frac = (xm[0] != x[0]).float().mean().item()
            assert frac == pytest.approx(1 - lam, abs=1e-6)
            per_frame = (xm[0] != x[0]).float().mean((0, 2, 3))
            assert (per_frame == frac).all()  # the same box in every frame
        else:
            assert torch.allclose(xm[0], lam * x[0] + (1 - lam) * x[3], atol=1e-5)


# ---- the held-out pretext (issue 11, level 1) ----
def one_hot_codes(labels, k=8, d=16):
    """Features sitting exactly on orthonormal prototypes eye(k, d): (..., d)."""
    return torch.eye(k, d)[labels]


def test_code_agreement_closed_forms():
    """Balanced one-hot features on orthonormal prototypes are a fixed point of Sinkhorn, so
    phi's codes are the labels: identical branches agree on every tube; psi always naming
    prototype 3 agrees on that prototype's share, 2 of 16 tubes; psi right on the first
    k_b tubes of clip b (wrong on the rest) scores k_b / 16."""
    labels = torch.arange(16).remainder(8).expand(3, 16)  # 3 clips, 16 masked tubes, K = 8
    x_phi, C = one_hot_codes(labels), 5 * torch.eye(8, 16)  # prototypes normalised inside
    before = C.clone()
    agree, codes = S.code_agreement(x_phi, x_phi.clone(), C, eps=0.05, iters=10)
    assert torch.equal(codes, labels) and torch.equal(agree, torch.ones(3))
    agree, _ = S.code_agreement(x_phi, one_hot_codes(torch.full((3, 16), 3)), C)
    assert torch.equal(agree, torch.full((3,), 2 / 16))
    right = torch.tensor([4, 8, 16])[:, None] > torch.arange(16)  # first k_b tubes right
    psi = one_hot_codes(torch.where(right, labels, (labels + 1) % 8))
    agree, _ = S.code_agreement(x_phi, psi, C)
    assert torch.equal(agree, torch.tensor([4 / 16, 8 / 16, 1.0])) and torch.equal(C, before)


class ForcedBranches:
    """model.branches replaced: phi = one-hot on prototype (tube index mod 8) of each clip's
    56 masked tubes (7 per prototype), psi = phi or a constant prototype."""

    def __init__(self, model, psi_code=None):
        self.model, self.psi_code, self.calls = model, psi_code, 0

    def __call__(self, video, mask, tgt):
        self.calls += 1
        B, n_m = mask.shape[0], int(mask[0].sum())
        assert n_m == 56 and (mask.sum(1) == n_m).all() and tgt.shape == (B, n_m, 384)
        x_phi = one_hot_codes(torch.arange(n_m).remainder(8)).expand(B, -1, -1)
        psi = x_phi if self.psi_code is None else one_hot_codes(torch.full((B, n_m),
                                                                           self.psi_code))
        return x_phi, psi


def test_pretext_eval_agreement_100_and_constant_guess_is_chance(tiny_data, monkeypatch):
    a = tiny_args(data=tiny_data, num_prototypes=8)
    torch.manual_seed(0)
    model = S.build_model(a)
    with torch.no_grad():
        model.prototypes.copy_(3 * torch.eye(8, 16))  # not unit rows: normalised out of place
    dev, amp = torch.device("cpu"), optim.Amp("none", "cpu")
    forced = ForcedBranches(model)
    monkeypatch.setattr(model, "branches", forced)
    out = S.pretext_eval(model, a, dev, amp)
    assert forced.calls == 4  # 16 validation clips in batches of 4
    assert out == {"code_agreement": 100.0, "code_agreement_se": 0.0, "code_majority": 12.5}
    monkeypatch.setattr(model, "branches", ForcedBranches(model, psi_code=5))
    out = S.pretext_eval(model, a, dev, amp)  # balanced codes: a constant scores 1 / K
    assert out == {"code_agreement": 12.5, "code_agreement_se": 0.0, "code_majority": 12.5}
    assert torch.equal(model.prototypes, 3 * torch.eye(8, 16))


def test_pretext_eval_deterministic_leaves_rng_weights_and_mode(tiny_data):
    a = tiny_args(data=tiny_data)
    torch.manual_seed(0)
    model = S.build_model(a)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    dev, amp = torch.device("cpu"), optim.Amp("none", "cpu")
    rng = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    first = S.pretext_eval(model.train(), a, dev, amp)
    assert model.training and model.encoder.training
    second = S.pretext_eval(model.eval(), a, dev, amp)
    assert not model.training and first == second
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert np.array_equal(np.random.get_state()[1], rng[1])
    assert random.getstate() == rng[2]
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert not torch.allclose(model.prototypes.norm(dim=1), torch.ones(12))  # not renormalised
    assert set(first) == {"code_agreement", "code_agreement_se", "code_majority"}
    assert 0 <= first["code_agreement"] <= 100 and first["code_agreement_se"] > 0
    assert 100 / 12 <= first["code_majority"] <= 100  # the top code holds at least 1 / K


@pytest.mark.parametrize("kw", [dict(target="pixel"), dict(loss="l2")])
def test_pretext_eval_mse_is_the_loss_on_the_held_out_clips(tiny_data, kw):
    """VideoMAE and the L2 ablation: the mean of the per-clip MSEs is the batch loss of all
    validation clips at once, drawn as pretraining clips with seed + 1 at epoch 0."""
    a = tiny_args(data=tiny_data, **kw)
    torch.manual_seed(0)
    model = S.build_model(a).eval()
    out = S.pretext_eval(model, a, torch.device("cpu"), optim.Amp("none", "cpu"))
    assert set(out) == {"heldout_mse", "heldout_mse_se"}
    ds = S.PretrainClips(S.read_split(a, False), dataclasses.replace(a, seed=1))
    video, mask = map(torch.stack, zip(*[ds[i] for i in range(len(ds))]))
    with torch.no_grad():
        x_phi, x_psi = model.branches(video, mask, S.target_input(video, mask, a))
        per_clip = ((x_psi - x_phi) ** 2).flatten(1).mean(1).double()
        if kw.get("target") == "pixel":
            assert model(video, mask, S.target_input(video, mask, a))[0].item() == \
                pytest.approx(out["heldout_mse"], rel=1e-5)
    assert out["heldout_mse"] == pytest.approx(per_clip.mean().item(), rel=1e-5)
    assert out["heldout_mse_se"] == pytest.approx(
        (per_clip.std() / len(per_clip) ** 0.5).item(), rel=1e-4)


# ---- whole runs ----
def run_args(data, out, **kw) -> S.Args:
    base = dict(data=data, output_dir=str(out), epochs=3, log_every=2, ckpt_every=1000,
                quick_probe=False)
    return tiny_args(**{**base, **kw})


def losses(out):
    recs = log.read_jsonl(os.path.join(out, "log.jsonl"))
    return [r["train/loss"] for r in recs if "train/loss" in r]


def test_tiny_run_lowers_the_loss_against_an_lr0_control(tiny_data, tmp_path):
    kw = dict(epochs=5, batch_size=8, log_every=4)
    summary = S.main(run_args(tiny_data, tmp_path / "a", **kw))
    S.main(run_args(tiny_data, tmp_path / "b", base_lr=0.0, **kw))
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert len(la) == len(lb) == 5 and la[-1] < lb[-1] - 0.3, (la, lb)
    assert summary["steps"] == 5 * 4 and "knn_top1@5" in summary["metrics"]
    # The held-out pretext is reported (20 steps are too few for it to beat the lr = 0
    # control reliably on 16 clips: issue 11's level 1 is checked on the demo).
    got = json.load(open(tmp_path / "a" / "summary.json"))
    assert {"code_agreement", "code_agreement_se", "code_majority"} <= set(got["metrics"])
    assert got["code_agreement_chance"] == pytest.approx(100 / 12, abs=1e-4)
    n_val = len(S.read_split(run_args(tiny_data, tmp_path / "a", **kw), False))
    for name in ("knn_top1@5",):  # binomial standard error over the validation clips
        acc, se = got["metrics"][name]["trained"] / 100, got["metrics"][f"{name}_se"]["trained"]
        assert se == pytest.approx(100 * (acc * (1 - acc) / n_val) ** 0.5, abs=0.01)
    assert json.load(open(tmp_path / "a" / "summary.json"))["method"] == "sigma"
    assert os.path.getsize(tmp_path / "a" / "clusters.png") > 1000
    rec = log.read_jsonl(str(tmp_path / "a" / "log.jsonl"))[-1]
    assert 1 <= rec["train/codes_psi"] <= 12
    assert 0 <= rec["train/code_entropy_phi"] <= math.log(12) + 1e-6


def test_resume_is_bit_identical(tiny_data, tmp_path):
    """Drop path 0.3 draws from the global RNG every step (the bug report's case)."""
    S.main(run_args(tiny_data, tmp_path / "straight", max_steps=10, drop_path=0.3))
    S.main(run_args(tiny_data, tmp_path / "resumed", max_steps=5, drop_path=0.3))
    S.main(run_args(tiny_data, tmp_path / "resumed", max_steps=10, drop_path=0.3))
    a = checks.assert_same_checkpoints(tmp_path / "straight" / "last.pt",
                                       tmp_path / "resumed" / "last.pt")
    assert a["step"] == 10


@pytest.mark.parametrize("mode", ["finetune", "linear"])
def test_finetune_and_probe_resume_bitwise(tiny_data, tmp_path, monkeypatch, mode):
    """Mixup/cutmix, random erasing, drop path, RandAugment, 2 copies per clip and 2 accumulated
    micro-batches per step all on; stopped after step 3 of 2 epochs x 4 steps and resumed: the
    checkpoint and the test scores are the uninterrupted run's. A checkpoint started from
    other weights is refused, even at the same path."""
    S.main(run_args(tiny_data, tmp_path / "pre", max_steps=2))
    kw = dict(eval=mode, init_from=str(tmp_path / "pre" / "last.pt"), ft_epochs=2,
              ft_base_lr=0.05, test_clips=1, test_crops=1, ckpt_every=1, mixup=0.8, cutmix=1.0,
              reprob=0.25, ft_drop_path=0.2, num_sample=2, accum_iter=2)
    straight = S.main(run_args(tiny_data, tmp_path / "straight", **kw))
    checks.stop_after_step(monkeypatch, 3, f"{mode}.pt")
    with pytest.raises(checks.Stop):
        S.main(run_args(tiny_data, tmp_path / "resumed", **kw))
    resumed = S.main(run_args(tiny_data, tmp_path / "resumed", **kw))
    a = checks.assert_same_checkpoints(tmp_path / "straight" / f"{mode}.pt",
                                       tmp_path / "resumed" / f"{mode}.pt")
    assert a["step"] == 2 * 32 // (4 * 2) and straight["metrics"] == resumed["metrics"]
    S.main(run_args(tiny_data, tmp_path / "pre", max_steps=4))  # same file, new weights
    with pytest.raises(checkpoint.CheckpointError, match="new --output-dir.* or pass --resume"):
        S.main(run_args(tiny_data, tmp_path / "resumed", **kw))


def test_non_finite_loss_stops_before_its_update(tiny_data, tmp_path, monkeypatch):
    """NaN pixels at step 3: no update of the encoder, decoder or prototypes; last.pt of 2."""
    seen = checks.nan_input_at_step(monkeypatch, S, 3)
    checks.assert_stopped_before_update(
        seen, lambda: S.main(run_args(tiny_data, tmp_path, ckpt_every=2, log_every=5)),
        tmp_path / "last.pt", step=3, kept=2,
        forward_changes={"prototypes": lambda w: F.normalize(w, dim=1)})  # spec §1.5


def test_data_may_name_the_list_file(tiny_data, tmp_path):
    a = tiny_args(data=os.path.join(tiny_data, "train.csv"))
    assert S.read_split(a, False) == S.read_split(tiny_args(data=tiny_data), False)
    with pytest.raises(FileNotFoundError, match="train.csv and val.csv"):
        S.read_split(tiny_args(data=str(tmp_path)), True)


def test_knn_linear_and_finetune_from_a_checkpoint(tiny_data, tmp_path):
    S.main(run_args(tiny_data, tmp_path / "pre", max_steps=2))
    ckpt = str(tmp_path / "pre" / "last.pt")
    pre = checkpoint.load(ckpt)["model"]
    knn = S.main(run_args(tiny_data, tmp_path / "knn", eval="knn", init_from=ckpt))
    assert knn["steps"] == 0 and 0 <= knn["metrics"]["knn_top1@5"]["trained"] <= 100
    ft_kw = dict(init_from=ckpt, ft_epochs=1, ft_base_lr=0.5, test_clips=1, test_crops=1)
    for mode in ("linear", "finetune"):
        out = S.main(run_args(tiny_data, tmp_path / mode, eval=mode, **ft_kw))
        assert 0 <= out["metrics"][f"{mode}_top1"]["trained"] <= 100
        sd = checkpoint.load(tmp_path / mode / f"{mode}.pt")["model"]
        same = torch.equal(sd["blocks.0.mlp.fc1.weight"], pre["encoder.blocks.0.mlp.fc1.weight"])
        assert same == (mode == "linear")  # the probe leaves the backbone frozen
        assert not torch.equal(sd["head.weight"], S.Classifier(tiny_args(), 8).head.weight)


def test_head_init_scale_multiplies_only_the_head():
    """--ft-head-init-scale (official 0.001, the demo 1) scales the head's trunc-normal(0.02)
    draw and nothing else: the same seed gives the same trunk and a head 1,000x larger."""
    nets = []
    for scale in (0.001, 1.0):
        torch.manual_seed(0)
        nets.append(S.Classifier(tiny_args(ft_head_init_scale=scale), 8).state_dict())
    official, demo = nets
    assert S.Args().ft_head_init_scale == 0.001
    torch.testing.assert_close(demo["head.weight"], official["head.weight"] * 1000)
    assert 0.015 < float(demo["head.weight"].std()) < 0.025  # std 0.02
    assert all(torch.equal(v, official[k]) for k, v in demo.items() if k != "head.weight")


def test_low_shot_split_k_per_class_deterministic_and_disjoint_from_validation(tiny_data):
    a = run_args(tiny_data, "unused")
    train, val = S.read_split(a, True), S.read_split(a, False)
    picked = S.low_shot(train, 2)
    labels = [r.label for r in picked]
    assert sorted(labels) == sorted(list(range(8)) * 2)  # exactly 2 clips of each class
    assert set(picked) <= set(train) and not {r.path for r in picked} & {r.path for r in val}
    assert picked == S.low_shot(train, 2)  # the same draw every time (and for every model)
    others = [S.low_shot(train, 2, seed=s) for s in range(1, 6)]
    assert any(o != picked for o in others)  # the seed decides it
    assert S.low_shot(train, 9) == train  # a class with fewer keeps all, in order


def test_synthetic_bright_clips_and_unchanged_default():
    """`synthetic.videos(bright=True)`: a flat dark background and a one-colour object brighter
    in every channel, in every frame; without it the clips are the bytes they always were."""
    import hashlib
    for plain, digest in ((False, "8bfc88be9dcefd93"), (True, "e217289a2c1536a5")):
        c = synthetic._clip(np.random.default_rng([0, 2, 0]), "move_right", 32, 4, 1.5, plain)
        assert hashlib.sha256(c.tobytes()).hexdigest()[:16] == digest
    for n in range(4):
        c = synthetic._clip(np.random.default_rng([0, n, 1]), synthetic.MOTIONS[2 * n], 32, 4,
                            1.5, True, bright=True).astype(int)  # (T, H, W, 3)
        bg = c[0, 0, 0]
        assert (bg < 80).all()
        flat = (c == bg).all(-1)  # background pixels
        assert flat.mean() > 0.5 and (flat.sum((1, 2)) < 32 * 32).all()  # an object per frame
        far = np.abs(c - bg).sum(-1)
        colour = c.reshape(-1, 3)[far.argmax()]  # a pixel fully inside the object
        assert (colour >= 160).all()
        # every pixel mixes the two colours (the edges' coverage): one-colour object, no stripes
        a = ((c - bg) * (colour - bg)).sum(-1) / ((colour - bg) ** 2).sum()
        assert np.abs(bg + a[..., None] * (colour - bg) - c).max() <= 1.5
        assert ((a > 0.99).sum((1, 2)) > 20).all()  # the object inside, in every frame


def test_trajectory_features_by_hand():
    # a 4 x 4 white square on grey, 16 x 16 frames: moving right 2 px a frame, and one whose
    # side doubles (area x 4) around a fixed centre while it moves up 1 px a frame
    clips = torch.full((2, 4, 3, 16, 16), 100.0)  # (B, T, 3, H, W) in [0, 255]
    for t in range(4):
        clips[0, t, :, 4:8, 2 + 2 * t:6 + 2 * t] = 255
        side = 4 if t < 2 else 8
        top = 8 - t - side // 2
        clips[1, t, :, top:top + side, 8 - side // 2:8 + side // 2] = 255
    x = torch.stack([S.to_input(c) for c in clips])  # (B, 3, T, H, W) normalised
    f = S.trajectory_features(x).view(2, 3, 4)  # (B, [x, y, log area], T)
    assert torch.allclose(f[0], torch.tensor([[0., 2, 4, 6], [0, 0, 0, 0], [0, 0, 0, 0]]),
                          atol=1e-5)
    assert torch.allclose(f[1], torch.tensor([[0., 0, 0, 0], [0, -1, -2, -3],
                                              [0, 0, math.log(4), math.log(4)]]), atol=1e-5)


def test_finetune_verdict_recorded_with_every_run(tiny_data, tmp_path):
    out = tmp_path / "run"
    summary = S.main(run_args(tiny_data, out, max_steps=2, eval_random_init=True,
                              finetune_verdict=True, random_init_seeds=2, ft_shots=2,
                              ft_epochs=1, ft_batch_size=4, ft_base_lr=0.5, test_clips=1,
                              test_crops=1))
    ver = summary["verdict"]
    assert len(ver["random_init"]) == 2 and len(ver["trained"]) == 1
    assert summary["finetune"]["top1"]["trained"] == ver["trained"][0]
    assert [summary["finetune"]["top1"][f"random_init_{i}"] for i in (1, 2)] == ver["random_init"]
    assert summary["finetune"]["n_eval"] == 16 and summary["finetune"]["shots"] == 2
    # no measured trained spread: the verdict cannot conclude, whatever the numbers
    assert not ver["helps"] and ver["rule"].startswith("needs") and ver["line"].startswith(
        "pretraining does not help clearly: fine-tune top-1")
    m = summary["metrics"]["finetune_top1"]
    assert m["random_init"] == pytest.approx(sum(ver["random_init"]) / 2, abs=0.01)
    with open(out / "summary.json") as fh:
        assert json.load(fh)["verdict"] == ver
    pre = checkpoint.load(out / "last.pt")["model"]["encoder.blocks.0.mlp.fc1.weight"]
    for name in ("trained", "random_init_1", "random_init_2"):
        ckpt = checkpoint.load(out / f"finetune-{name}" / "finetune.pt")
        assert ckpt["step"] == 4  # 16 low-shot clips / batch 4, one epoch
    starts = {n: checkpoint.load(out / f"finetune-{n}" / "finetune.pt")["source"]
              for n in ("trained", "random_init_1", "random_init_2")}
    assert len(set(starts.values())) == 3  # three different starting weights
    assert not torch.equal(pre, checkpoint.load(out / "finetune-random_init_1" / "finetune.pt")
                           ["model"]["blocks.0.mlp.fc1.weight"])
    spread = S.main(run_args(tiny_data, out, max_steps=2, eval_random_init=True,
                             finetune_verdict=True, random_init_seeds=2, ft_shots=2,
                             ft_epochs=1, ft_batch_size=4, ft_base_lr=0.5, test_clips=1,
                             test_crops=1, trained_spread=0.5, ft_repeats=2))
    top1, spread = spread["finetune"]["top1"], spread["verdict"]  # random inits: resumed
    assert top1["trained_1"] == ver["trained"][0]  # the one run again: same seed, same weights
    assert spread["trained"] == [(top1["trained_1"] + top1["trained_2"]) / 2]  # their mean
    assert spread["random_init"] == ver["random_init"] and "mean of 2" in spread["metric"]
    assert spread["spread"][1] == 0.5 and spread["rule"].startswith("trained - random > 3 SE")


def test_ddp_two_processes_and_distributed_sinkhorn(tiny_data, tmp_path):
    script = tmp_path / "sk.py"
    script.write_text(
        "import sys, torch; sys.path.insert(0, %r)\n"
        "import sigma as S; from common import dist\n"
        "dist.init('cpu'); r = dist.rank()\n"
        "s = torch.randn(40, 5, generator=torch.Generator().manual_seed(0)).tanh()\n"
        "q = S.sinkhorn(s[r * 20:(r + 1) * 20], 0.05, 10)\n"
        "full = dist.all_gather(q)\n"
        "if r == 0: torch.save({'ddp': full, 'one': s}, %r)\n"
        "dist.cleanup()\n" % (ROOT, str(tmp_path / "sk.pt")))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]
    proc = subprocess.run(run + [str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(tmp_path / "sk.pt")
    # Equipartition over the global batch: 2 ranks x 20 tokens give the one-process answer.
    assert torch.allclose(res["ddp"], S.sinkhorn(res["one"], 0.05, 10), atol=1e-6)
    assert not torch.allclose(res["ddp"][:20], S.sinkhorn(res["one"][:20], 0.05, 10), atol=1e-3)

    cmd = [os.path.join(ROOT, "sigma.py"), "--data", tiny_data,
           "--output-dir", str(tmp_path / "run"),
           "--model", "tiny", "--embed-dim", "48", "--depth", "2", "--num-heads", "2",
           "--decoder-depth", "1", "--decoder-dim", "32", "--patch-size", "8", "--num-frames", "8",
           "--sampling-rate", "2", "--input-size", "32", "--proj-hidden", "64", "--proj-dim", "16",
           "--num-prototypes", "12", "--batch-size", "2", "--base-lr", "0.05", "--num-workers", "0",
           "--amp", "none", "--knn-k", "5", "--epochs", "1", "--log-every", "2",
           "--no-quick-probe", "--warmup-epochs", "0"]
    proc = subprocess.run(run + cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = log.read_jsonl(str(tmp_path / "run" / "log.jsonl"))
    assert [r["step"] for r in recs if "train/loss" in r][-1] == 32 // 4  # 32 clips, batch 2 x 2
    (diff,) = [r["ddp/max_replica_diff"] for r in recs if "ddp/max_replica_diff" in r]
    assert diff == 0.0


def test_cli_help_and_unknown_flag():
    out = subprocess.run([sys.executable, "sigma.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split()).replace("- ", "-")  # argparse wraps after hyphens
    for f in dataclasses.fields(S.Args):
        doc = S.cli.field_docs(S.Args)[f.name]
        assert doc and (f.name == "preset" or doc.replace("- ", "-") in text), f.name
    bad = subprocess.run([sys.executable, "sigma.py", "--sinkhorn-epss", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unrecognized arguments: --sinkhorn-epss" in bad.stderr


def test_videomae_baseline_is_mse_on_the_normalised_masked_tubes():
    a = tiny_args(target="pixel")
    torch.manual_seed(0)
    model = S.build_model(a)
    assert "prototypes" not in model.state_dict()
    assert model.decoder.head.out_features == 3 * 2 * 8 * 8
    video = torch.randn(2, 3, 8, 32, 32)
    mask = torch.stack([S.tube_mask(a, np.random.default_rng(i)) for i in range(2)])
    out = {}
    model.decoder.register_forward_hook(lambda m, i, o: out.update(psi=o))
    loss, stats = model(video, mask, S.target_input(video, mask, a))
    want = S.pixel_tubes(video, 2, 8)[mask].reshape(2, -1, 3 * 2 * 8 * 8)
    assert stats == {} and torch.allclose(loss, ((out["psi"] - want) ** 2).mean())


def test_presets_follow_the_release_scripts():
    def preset(name):
        return S.cli.parse(S.Args, S.PRESETS, ["--preset", name, "--data", "/x"])
    d = S.Args()
    assert (d.mask_ratio, d.num_prototypes, d.sinkhorn_eps, d.temperature, d.decoder_depth) == (
        0.9, 3000, 0.05, 0.1, 4)
    assert (d.base_lr, d.weight_decay, d.warmup_epochs, d.target) == (1.5e-4, 0.05, 40, "mlp")
    b = preset("ssv2-vitb")
    assert (b.sinkhorn_eps, b.sampling_rate, b.dataset, b.test_clips) == (0.03, 2, "ssv2", 2)
    assert b.base_lr * 16 * b.batch_size / 256 == pytest.approx(3e-4)  # 4x4 V100 x 32
    assert preset("k400-vits").model == "small" and preset("ssv2-vits").epochs == 2400
    assert preset("k400-vitb-dino").target == "teacher"
    k = preset("k400-vitb")  # 2 nodes x 8 GPUs x 40 = 640, lr 3.75e-4 (multi-node script)
    assert k.base_lr * 16 * k.batch_size * k.accum_iter / 256 == pytest.approx(3.75e-4)
    lin = preset("linear-ssv2")  # 8 GPUs x 24 x update_freq 2 (num_sample 2 not counted)
    assert (lin.eval, lin.num_sample, lin.accum_iter, lin.probe_train_mode) == ("linear", 2, 2,
                                                                                True)
    assert lin.ft_base_lr * 8 * lin.ft_batch_size * lin.accum_iter / 256 == pytest.approx(1.5e-3)
    mini = preset("ft-mini-ssv2-vits")  # 3 GPUs x 4 x update_freq 8 = 96: 3.75e-4, flips kept
    assert mini.ft_base_lr * 3 * mini.ft_batch_size * mini.accum_iter / 256 == pytest.approx(
        3.75e-4)
    assert (mini.layer_decay, mini.num_sample, mini.ft_flip, mini.dataset) == (0.7, 2, True,
                                                                               "ssv2")
    pre = preset("mini-ssv2-vits")  # 3 x 96 = 288: lr 1.69e-4, K 1024, rate 2
    assert pre.base_lr * 3 * pre.batch_size / 256 == pytest.approx(1.6875e-4)
    assert (pre.num_prototypes, pre.sampling_rate) == (1024, 2)
    assert preset("mini-ssv2-vits-videomae").target == "pixel"
    demo = S.cli.parse(S.Args, S.PRESETS, [])  # the verdict's protocol, DESIGN §3: low-shot
    assert demo.ft_shots < demo.synthetic_per_class[0] and demo.ft_val_per_class >= 100
    assert demo.random_init_seeds >= 3 and demo.ft_repeats >= 2 and demo.trained_spread > 0
    assert demo.ft_head_init_scale == 1.0  # no x 0.001 plateau for the random trunks
    # the README's table of draws applies to the demo's settings only (any draw, any worker count)
    assert S.demo_settings(demo) and S.demo_settings(S.cli.parse(
        S.Args, S.PRESETS, ["--synthetic-seed", "5", "--num-workers", "0"]))
    for other in (["--preset", "demo-long"], ["--ft-shots", "8"], ["--synthetic-scale", "2"],
                  ["--synthetic-per-class", "32", "17"], ["--no-synthetic-bright"],
                  ["--mask-ratio", "0.5"], ["--max-steps", "10"], ["--seed", "1"]):
        assert not S.demo_settings(S.cli.parse(S.Args, S.PRESETS, other)), other


# ---- GPU (tests marked gpu: skipped with "no CUDA device" without one) ----
@pytest.mark.gpu
@pytest.mark.parametrize("setting", ["mlp", "dino"])
def test_gpu_step_agrees_with_the_fp32_cpu_step(setting):
    """One training step on CUDA in bf16 and in fp16 (GradScaler) gives the fp32 CPU step's
    loss and gradient within the precision's tolerance (`checks.GPU_TOLERANCE`): SIGMA-MLP and
    the frozen-teacher target (the teacher in fp32 outside autocast, as the official code).
    Masks in the batch, drop path 0: the step draws no random numbers."""
    a, model, teacher, video, mask = step_setting(setting)
    assert a.drop_path == 0.0
    teachers = {}

    def step(m, batch, opt, amp):
        t = None
        if teacher is not None:  # the frozen teacher on the step's device (a copy per device)
            dev = str(batch[0].device)
            t = teachers.setdefault(dev, copy.deepcopy(teacher).to(dev))
        return S.train_step(m, batch[0], batch[1], opt, amp, t)
    report = checks.assert_gpu_step_agrees(model, (video, mask), step)
    print(setting, report)


# ---- unsupervised VOS (Tab. 4, common/vos.py) ----
def test_eval_vos_driver_on_synthetic_davis_and_ytvos(tmp_path, capsys):
    """--eval vos: tubelet tokens repeated to both frames, the 4 metrics in summary.json equal
    to common/vos.py called directly, one picture per dataset; bad inputs give one line."""
    a = tiny_args()
    torch.manual_seed(0)
    model = S.build_model(a)
    torch.save({"model": model.state_dict()}, tmp_path / "ckpt.pt")
    f = S.vos_tokens(model.encoder, torch.randn(4, 3, 40, 40), a)  # 5 x 5 grid, not 32 px
    assert f.shape == (4, 5, 5, 48) and torch.equal(f[0], f[1]) and torch.equal(f[2], f[3])
    assert not torch.equal(f[1], f[2])
    davis = str(synthetic.davis(tmp_path / "davis", size=(48, 64), sequences=1, frames=5))
    yt = str(synthetic.ytvos(tmp_path / "yt", size=(48, 64), videos=2, frames=4))
    out = tmp_path / "e"
    S.main(tiny_args(eval="vos", init_from=str(tmp_path / "ckpt.pt"), vos_davis=davis,
                     vos_ytvos=yt, output_dir=str(out)))
    m = json.load(open(out / "summary.json"))["metrics"]
    assert set(m) == {f"vos_{d}_{s}_miou{b}" for d in ("davis", "ytvos")
                      for s in ("clustering", "overclustering") for b in ("", "_batch16")}
    direct = S.vos.eval_vos(lambda x: S.vos_tokens(model.encoder, x, a), yt, "ytvos",
                            split_list=os.path.join(yt, "val.txt"))
    assert len(direct["videos"]) == 1  # val.txt holds all but the last video
    for s in ("clustering", "overclustering"):
        assert m[f"vos_ytvos_{s}_miou"]["trained"] == round(direct[s]["miou"], 4)
        assert 0 < m[f"vos_davis_{s}_miou"]["trained"] <= 1
    assert (out / "vos_davis.png").is_file() and (out / "vos_ytvos.png").is_file()
    with pytest.raises(S.cli.InputError, match="no VOS benchmark root"):
        S.main(tiny_args(eval="vos", init_from=str(tmp_path / "ckpt.pt"), output_dir=str(out)))
    demo = S.build_model(S.cli.parse(S.Args, S.PRESETS, []))  # the CLI's preset without --data
    torch.save({"model": demo.state_dict()}, tmp_path / "demo.pt")
    assert checks.cli_error(S, ["--eval", "vos", "--init-from", str(tmp_path / "demo.pt"),
                                "--preset", "demo",  # weights given: the demo only if asked
                                "--threads", "0", "--vos-davis", str(tmp_path / "nope"),
                                "--output-dir", str(tmp_path / "x")], capsys) == \
        f"error: {tmp_path / 'nope' / 'ImageSets' / '2017' / 'val.txt'}: DAVIS split list " \
        "not found (expected the DAVIS-2017 layout JPEGImages/480p, Annotations/480p, " \
        "ImageSets/2017)"
