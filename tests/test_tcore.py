"""tcore.py: sandwich indices, stratified block masks, the loss terms against hand-computed
values (DINO with crop swapping and /18, centering lag, KoLeo, masked-row patch losses), the
PMM's structure and official names, gradient flow, schedules and lr groups, checkpoints, and
whole runs (learning, bitwise resume, 2-process DDP, CLI)."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import tcore as C
from common import checkpoint, log, synthetic
from tests import checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_args(**kw) -> C.Args:
    base = dict(model="tiny", depth=2, patch_size=8, global_size=32, local_size=16,
                local_crops=2, head_hidden=32, head_bottleneck=16, head_prototypes=64,
                pmm_heads=4, batch_size=4, num_workers=0, amp="none", warmup_epochs=0,
                warmup_teacher_temp_epochs=0, freeze_last_layer_epochs=0, davis_size=(48, 64),
                epoch_length=0)
    return C.Args(**{**base, **kw})


# ---- sandwich sampling ----
def draws(T, n=3000, **kw):
    rng = np.random.default_rng(0)
    return np.array([C.sandwich_indices(T, rng, **kw) for _ in range(n)])


def test_sandwich_indices_inclusive_ranges():
    d = draws(20)  # spec §2: cur 6..13, past cur-5..cur-3, future cur+3..cur+5
    p, c, f = d.T
    assert set(c) == set(range(6, 14))
    assert set(c - p) == {3, 4, 5} and set(f - c) == {3, 4, 5}
    d = draws(100)
    p, c, f = d.T
    assert set(c) == set(range(30, 70)) and set(c - p) == set(range(15, 26))
    assert set(f - c) == set(range(15, 26)) and f.max() <= 99
    p, c, f = draws(4).T  # cur = 1 only; int(T/4) = 1, int(0.15 T) = 0
    assert set(c) == {1} and set(p) == {0, 1} and set(f) == {1, 2}


@pytest.mark.parametrize("T", [1, 2, 3])
def test_sandwich_short_clips_fall_back_to_one_frame(T):
    d = draws(T, 500)
    assert (d[:, 0] == d[:, 1]).all() and (d[:, 1] == d[:, 2]).all()
    assert set(d[:, 0]) == set(range(T))  # a uniformly random frame


# ---- masking ----
def test_block_mask_reaches_every_count_exactly():
    """The official T-CoRe generator draws rounds until the count is reached: every mask has
    exactly the requested number of patches (DINOv2's, which stops after a fruitless round,
    ends 1-3 short in 5-12 % of these draws)."""
    rng = np.random.default_rng(0)
    assert C.block_mask(14, 14, 0, rng).sum() == 0
    for count in range(19, 99):
        for _ in range(300 if count in (19, 58, 98) else 5):  # 1,195 masks in all
            m = C.block_mask(14, 14, count, rng)
            assert m.shape == (14, 14) and m.dtype == bool and int(m.sum()) == count, count
    for count in (1, 2, 3, 5, 150, 196):  # below one block's minimum area, past half the grid
        assert int(C.block_mask(14, 14, count, rng).sum()) == count
    assert int(C.block_mask(4, 4, 8, rng).sum()) == 8  # the tiny tests' 4 x 4 grid
    with pytest.raises(ValueError, match="outside"):
        C.block_mask(14, 14, 197, rng)
    with pytest.raises(ValueError, match="too small"):  # rounds could never end there
        C.block_mask(2, 2, 4, rng)


class Scripted:
    """A numpy-Generator stand-in: the listed values first (per method), then `rng`'s."""

    def __init__(self, rng, random=(), uniform=(), integers=()):
        self.rng, self.script = rng, {"random": list(random), "uniform": list(uniform),
                                      "integers": list(integers)}

    def _next(self, name, *a):
        return self.script[name].pop(0) if self.script[name] else getattr(self.rng, name)(*a)

    def random(self):
        return self._next("random")

    def uniform(self, a, b):
        return self._next("uniform", a, b)

    def integers(self, lo, hi):
        return self._next("integers", lo, hi)


def test_block_mask_rounds_and_block_budget():
    """The official rule, step by step. (1) A round of 10 tries that places nothing is
    followed by another: count 4 gives area 4; aspect 0.6 makes a 2 x 3 block at (0, 0) (6
    new > 4), ten times; the next round's aspect 1 places 2 x 2 at (top, left) = (3, 5),
    the draws in the official order (area, aspect, top, left). (2) A block
    may cover up to the whole remaining count, past half the grid (T-CoRe's max_num_patches
    is h w; DINOv2's is half): the first round of count 120 places a 10 x 10 block."""
    fallback = np.random.default_rng(0)
    r = Scripted(fallback, random=[0.0] * 11, uniform=[math.log(0.6)] * 10 + [0.0],
                 integers=[0, 0] * 10 + [3, 5])
    m = C.block_mask(14, 14, 4, r)
    assert m[3:5, 5:7].all() and m.sum() == 4
    assert not r.script["uniform"] and not r.script["integers"]  # the 11th try was used
    r = Scripted(fallback, random=[(100 - 4) / (120 - 4)], uniform=[0.0], integers=[2, 1])
    m = C.block_mask(14, 14, 120, r)
    assert m[2:12, 1:11].all() and m.sum() == 120


def test_masks_counts_and_stratification():
    rng = np.random.default_rng(0)
    for B in (4, 32):
        N, n = 196, int(2 * B * 0.5)
        r = np.linspace(0.1, 0.5, n + 1)
        seen = []
        for _ in range(5):
            m = C.sample_masks(2 * B, (14, 14), 0.5, (0.1, 0.5), rng)
            assert m.shape == (2 * B, N) and m.dtype == torch.bool
            counts = np.sort(m.sum(1).numpy())
            assert (counts[:2 * B - n] == 0).all()  # exactly 2B - n unmasked crops
            masked = counts[2 * B - n:]
            lo, hi = (N * r[:-1]).astype(int), (N * r[1:]).astype(int)
            assert ((masked >= lo) & (masked <= hi)).all(), (masked, lo, hi)  # per stratum
            seen.append(m.sum(1).numpy())
        assert not all((s == seen[0]).all() for s in seen)  # shuffled, not fixed positions
    # a block mask is made of blocks: most masked patches have a masked 4-neighbour
    m = C.block_mask(14, 14, 60, np.random.default_rng(1))
    nb = np.zeros_like(m)
    nb[1:] |= m[:-1]
    nb[:-1] |= m[1:]
    nb[:, 1:] |= m[:, :-1]
    nb[:, :-1] |= m[:, 1:]
    assert (m & nb).sum() >= 0.9 * m.sum()


def test_masking_collate_in_the_loader_and_index_selection():
    """The loader's collate draws the masks from (seed, epoch, the batch's indices): the same
    batch gives the same masks in any process and worker; its fixed-size index and weights
    select exactly what boolean-mask indexing selects (bit for bit)."""
    args = tiny_args()
    coll = C.MaskingCollate(args)

    def sample(epoch, index):
        g = torch.Generator().manual_seed(index)
        return (torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 16, 16, generator=g),
                torch.randn(2, 2, 3, 32, 32, generator=g), (epoch, index))
    batch = [sample(0, i) for i in (5, 2, 7, 0)]
    g, loc, aux, m = coll(batch)
    assert g.shape == (4, 2, 3, 32, 32) and aux.shape == (4, 2, 2, 3, 32, 32)
    masks = m["masks"]
    assert masks.shape == (8, 16) and int((masks.sum(1) > 0).sum()) == 4  # int(2B 0.5) crops
    assert all(torch.equal(a, b) for a, b in zip(coll(batch)[3].values(), m.values()))
    other = [coll([sample(e, i) for i in idx])[3]["masks"] for e, idx in
             [(1, (5, 2, 7, 0)), (0, (5, 2, 7, 1))]]
    assert not any(torch.equal(o, masks) for o in other)  # a new draw per epoch and batch
    crops, md = C.to_device((g, loc, aux, m), "cpu")
    assert torch.equal(crops[0][4 + 1], g[1, 1]) and torch.equal(crops[2][4 + 1], aux[1, 0, 1])
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        masks = torch.rand(8, 16, generator=gen) < 0.4 * (trial % 3)
        mi = C.mask_indices(masks)
        tokens = torch.randn(8, 16, 5, generator=gen)
        assert torch.equal(tokens.flatten(0, 1).index_select(0, mi["idx"]), tokens[masks])
        assert torch.equal(mi["weight"], (1 / masks.sum(1).clamp(min=1)).unsqueeze(1)
                           .expand_as(masks)[masks])
        assert mi["idx"].dtype == torch.int64 and len(mi["idx"]) == int(masks.sum())


# ---- losses ----
def ce(p, z, t=0.1):
    z = np.asarray(z, np.float64) / t
    return -(np.asarray(p) * (z - np.log(np.exp(z).sum()))).sum()


def test_dino_loss_crop_swap_and_normalisation():
    g = torch.Generator().manual_seed(0)
    B, K, L = 2, 5, 8
    zg, zl = torch.randn(2 * B, K, generator=g), torch.randn(L * B, K, generator=g)
    t_cls = torch.randn(2 * B, K, generator=g)  # teacher logits, crop-major
    P = F.softmax(torch.cat(t_cls.chunk(2)[::-1]) / 0.05, -1)  # swapped as TCoRe.forward does
    got = C.dino_loss(zg, zl.chunk(L), P).item()
    Pt = F.softmax(t_cls / 0.05, -1).numpy()  # unswapped: row g*B + b is teacher crop g
    want = 0.0
    for b in range(B):
        for g_ in range(2):
            want += ce(Pt[(1 - g_) * B + b], zg[g_ * B + b]) / B  # global g meets teacher 3-g
            for l_ in range(L):
                want += ce(Pt[g_ * B + b], zl[l_ * B + b]) / B
    assert got == pytest.approx(want / 18, rel=1e-5)
    # a uniform student costs log K per term whatever the targets
    assert C.dino_loss(torch.zeros(2 * B, K), torch.zeros(L * B, K).chunk(L), P).item() == \
        pytest.approx(math.log(K), rel=1e-6)


def test_centering_has_a_one_step_lag():
    g = torch.Generator().manual_seed(1)
    tt = C.TeacherTargets(4, momentum=0.9)
    z = [(torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)) for _ in range(3)]
    c_cls, c_pat = torch.zeros(1, 4), torch.zeros(1, 4)
    for i, (zc, zp) in enumerate(z):
        pc, pp = tt(zc, zp, 0.04)
        tt.commit()  # the training step commits once the loss is finite
        assert torch.allclose(pc, F.softmax((zc - c_cls) / 0.04, -1), atol=1e-6), i
        assert torch.allclose(pp, F.softmax((zp - c_pat) / 0.04, -1), atol=1e-6), i
        c_cls = 0.9 * c_cls + 0.1 * zc.mean(0, keepdim=True)  # used from the next step on
        c_pat = 0.9 * c_pat + 0.1 * zp.mean(0, keepdim=True)
    assert torch.allclose(tt.cls_center, 0.9 * 0.1 * z[0][0].mean(0) + 0.1 * z[1][0].mean(0))
    sk = C.TeacherTargets(4, mode="sinkhorn")(z[0][0], z[0][1], 0.1)[0]
    assert torch.allclose(sk, C.sinkhorn_knopp(z[0][0], 0.1, 3)) and torch.allclose(
        sk.sum(1), torch.ones(6), atol=1e-5)  # 3 iterations end on the row step
    many = C.sinkhorn_knopp(z[0][0], 0.1, 500)  # the fixed point: balanced prototypes
    assert torch.allclose(many.sum(0), torch.full((4,), 6 / 4), atol=1e-3)


def test_koleo_on_a_square():
    pts = torch.tensor([[1., 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0]])
    assert C.koleo_loss(pts).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    assert C.koleo_loss(3 * pts).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    pts2 = torch.tensor([[1., 0], [0.6, 0.8], [-1, 0]])  # nn: 0-1, 1-0, 2-1
    d01, d21 = math.dist((1, 0), (0.6, 0.8)), math.dist((-1, 0), (0.6, 0.8))
    assert C.koleo_loss(pts2).item() == pytest.approx(-(2 * math.log(d01) + math.log(d21)) / 3,
                                                      abs=1e-6)


def test_patch_loss_weights_and_squeeze():
    g = torch.Generator().manual_seed(2)
    masks = torch.zeros(4, 6, dtype=torch.bool)  # 2B = 4 crops, two masked
    masks[0, [1, 4]] = True
    masks[2, [0, 2, 5]] = True
    weight = (1 / masks.sum(1).clamp(min=1)).unsqueeze(1).expand_as(masks)[masks]
    y, P = torch.randn(5, 3, generator=g), F.softmax(torch.randn(5, 3, generator=g), -1)
    want = (ce(P[0], y[0]) + ce(P[1], y[1])) / 2 + (ce(P[2], y[2]) + ce(P[3], y[3])
                                                    + ce(P[4], y[4])) / 3
    assert C.patch_loss(y, P, weight, 4).item() == pytest.approx(want / 4, rel=1e-5)  # / 2B
    yf = torch.randn(5, 3, generator=g)
    assert C.squeeze_loss(y, yf).item() == pytest.approx(((y - yf) ** 2).mean().item())


# ---- model ----
def test_pmm_structure_names_and_formula():
    pmm = C.PatchMatching(384)
    sd = pmm.state_dict()
    for k in ["decoder.0.auxiliary_cross_attn.in_proj_weight",
              "decoder.0.auxiliary_cross_attn.out_proj.bias",
              "decoder.0.auxiliary_layer_norm1.weight",
              "decoder.0.auxiliary_self_attn.in_proj_bias", "decoder.0.auxiliary_layer_norm2.bias",
              "decoder.0.auxiliary_linear.weight", "decoder.0.auxiliary_layer_norm3.weight"]:
        assert k in sd, k
    assert len(sd) == 16 and sum(p.numel() for p in pmm.parameters()) == 9 * 384 ** 2 + 15 * 384
    blk = pmm.decoder[0]
    assert blk.auxiliary_cross_attn.num_heads == 16 and blk.auxiliary_layer_norm1.eps == 1e-5
    g = torch.Generator().manual_seed(0)
    aux, stu = torch.randn(2, 7, 384, generator=g), torch.randn(2, 5, 384, generator=g)
    out = pmm(aux, stu)
    assert out.shape == (2, 5, 384)
    h1 = blk.auxiliary_layer_norm1(4 * blk.auxiliary_cross_attn(stu, aux, aux)[0] + stu)
    h2 = blk.auxiliary_layer_norm2(blk.auxiliary_self_attn(h1, h1, h1)[0] + h1)
    want = blk.auxiliary_layer_norm3(blk.auxiliary_linear(h2) + h2)
    assert torch.allclose(out, want, atol=1e-5)
    _, (w,) = pmm(aux, stu, need_weights=True)
    assert w.shape == (2, 5, 7) and torch.allclose(w.sum(-1), torch.ones(2, 5), atol=1e-5)


@pytest.fixture(scope="module")
def vits():
    """A ViT-S/16 T-CoRe (a small head: K = 1024)."""
    a = C.Args(head_prototypes=1024)
    return a, C.build_model(a)


def test_backbone_keys_tokens_and_mask_token(vits):
    model = vits[1]
    keys = set(model.teacher.state_dict())
    for k in ["backbone.cls_token", "backbone.pos_embed", "backbone.register_tokens",
              "backbone.mask_token", "backbone.patch_embed.proj.weight",
              "backbone.blocks.11.ls1.gamma", "backbone.blocks.0.attn.qkv.bias",
              "backbone.blocks.3.mlp.fc2.weight", "backbone.norm.weight",
              "dino_head.mlp.4.weight", "dino_head.last_layer.weight_g",
              "dino_head.last_layer.weight_v"]:
        assert k in keys, k
    bb = model.student.backbone
    assert bb.pos_embed.shape == (1, 197, 384) and bb.register_tokens.shape == (1, 4, 384)
    assert bb.mask_token.shape == (1, 384)
    assert bb.blocks[0].ls1.gamma[0].item() == pytest.approx(1e-5)
    assert (model.student.dino_head.last_layer.weight_g == 1).all()
    assert all(b.drop_path.p == 0.1 for b in bb.blocks)  # uniform, every block
    torch.manual_seed(0)
    t = C.Backbone(tiny_args(), 0.0).eval()
    x = torch.randn(2, 3, 32, 32)
    m = torch.zeros(2, 16, dtype=torch.bool)
    m[0, 3] = True
    with torch.no_grad():
        t.mask_token.fill_(0.5)
        a, b = t(x, m), t(x)
        x2 = x.clone()
        x2[0, :, 0:8, 24:32] += 5  # patch 3's pixels do not matter when it is masked
        c = t(x2, m)
    assert torch.allclose(a[1][1], b[1][1]) and not torch.allclose(a[1][0], b[1][0])
    assert torch.allclose(a[1], c[1], atol=1e-6)
    assert t(torch.randn(1, 3, 48, 64))[1].shape == (1, 48, 192)


def test_subset_drop_path_keeps_exactly_int_09b():
    dp = C.SubsetDropPath(0.1).train()
    out = dp(torch.ones(20, 3, 2))
    kept = out[:, 0, 0] != 0
    assert kept.sum() == 18 and torch.allclose(out[kept], torch.full((18, 3, 2), 20 / 18))
    assert torch.equal(dp.eval()(torch.ones(4, 2)), torch.ones(4, 2))


def batch(args, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    G, L = args.global_size, args.local_size
    crops = [torch.randn(2 * B, 3, G, G, generator=g),
             torch.randn(args.local_crops * B, 3, L, L, generator=g),
             torch.randn(2 * B, 3, G, G, generator=g), torch.randn(2 * B, 3, G, G, generator=g)]
    masks = C.sample_masks(2 * B, (G // args.patch_size,) * 2, 0.5, (0.1, 0.5),
                           np.random.default_rng(seed))
    return crops, masks


def test_gradients_only_masked_rows_no_aux_no_teacher():
    args = tiny_args()
    torch.manual_seed(0)
    model = C.build_model(args).train()
    crops, masks = batch(args)
    seen = {}

    def hook(mod, inp, out):
        seen.setdefault("aux", []).append(inp[0])
        out.retain_grad()
        seen.setdefault("out", []).append(out)
    model.auxiliary_decoder.register_forward_hook(hook)
    out = model(crops, masks, 0.04)
    (out["past"] + out["future"] + out["squeeze"]).backward(retain_graph=True)
    for aux, pmm_out in zip(seen["aux"], seen["out"]):
        assert not aux.requires_grad  # the auxiliary branch: student under no_grad
        rows = pmm_out.grad.abs().sum(-1).flatten()  # (2B N)
        assert (rows[~masks.flatten()] == 0).all() and (rows[masks.flatten()] > 0).all()
    out["loss"].backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert model.student.backbone.mask_token.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.auxiliary_decoder.parameters())


def test_train_step_ema_and_clipping():
    args = tiny_args()
    torch.manual_seed(0)
    model = C.build_model(args).train()
    opt = torch.optim.AdamW(C.param_groups(model, args), lr=1e-3)
    teacher0 = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    crops, masks = batch(args)
    amp = C.optim.Amp("none", "cpu")
    C.train_step(model, crops, masks, opt, amp, 0.04, 1.0, 3.0)  # momentum 1: teacher frozen
    assert all(torch.equal(teacher0[k], v) for k, v in model.teacher.state_dict().items())
    s0 = {k: v.clone() for k, v in model.student.state_dict().items()}
    C.train_step(model, crops, masks, opt, amp, 0.04, 0.0, 3.0)  # momentum 0: a copy
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, model.student.state_dict()[k]) and not torch.equal(v, s0[k]), k


def test_train_step_makes_one_host_sync():
    """One step as training runs it on a GPU (fused AdamW, the loader's masks dict): the
    non-finite check is the only value read back; no nonzero, boolean-mask index or
    per-step torch.tensor."""
    args = tiny_args()
    torch.manual_seed(0)
    model = C.build_model(args).train()
    opt, _ = C.build_optimizer(model, args, "cuda")
    assert opt.defaults["fused"]
    crops, masks = batch(args)
    masks = C.mask_indices(masks)
    amp = C.optim.Amp("none", "cpu")
    for _ in range(2):  # the first step also creates the optimiser state
        counts = checks.count_host_syncs(C.train_step, model, crops, masks, opt, amp, 0.04,
                                         0.99, 3.0)
        assert counts == {"_local_scalar_dense": 1}, counts


def test_compile_runs_compiled_code_with_the_eager_loss():
    """--compile (`compile_model`): the step's backbone and PMM calls run compiled graphs
    (counted where the backend hands them out), forward and backward, and the loss is the
    eager loss. The backend is aot_eager (dynamo and AOT autograd, as inductor's front end,
    without its minutes of code generation on 2 CPU cores); the local crops' position-embedding
    resize has no backward for symbolic shapes, which `dynamic=False` avoids."""
    import torch._dynamo
    args = tiny_args(drop_path=0.0)  # no random draw inside the compiled graphs
    torch.manual_seed(0)
    eager = C.build_model(args).train()
    compiled = C.build_model(args).train()
    compiled.load_state_dict(eager.state_dict())
    crops, masks = batch(args)
    backend, runs = torch._dynamo.lookup_backend("aot_eager"), {"graphs": 0, "calls": 0}

    def counting(gm, example_inputs):
        fn = backend(gm, example_inputs)
        runs["graphs"] += 1

        def run(*a):
            runs["calls"] += 1
            return fn(*a)
        return run
    torch._dynamo.reset()
    C.compile_model(compiled, backend=counting)
    want = eager(crops, masks, 0.04)
    got = compiled(crops, masks, 0.04)
    torch._dynamo.reset()
    # 7 module calls, each one whole compiled graph (no graph break): the teacher, the
    # student x 4 (past, future, masked globals, locals), the PMM x 2
    assert runs["calls"] == 7 and runs["graphs"] >= 4, runs
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), (k, got[k], want[k])
    got["loss"].backward()
    assert compiled.student.backbone.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.gpu
def test_gpu_step_agrees_with_the_cpu_step():
    """One CUDA training step in bf16 and in fp16 (GradScaler) gives the fp32 CPU step's loss
    and gradient within the precision's tolerance: a tiny T-CoRe, drop-path 0, all the
    randomness in the batch (crops and the loader's masks dict). Two choices keep the
    comparison about the device and not about an ill-conditioned start: LayerScale 0.1 (at
    1e-5 the CLS outputs of a random model nearly coincide, KoLeo's nearest-neighbour
    distances are rounding noise and the gradient's direction follows it: cosine 0.96-0.99
    against fp32 even in fp16 on the CPU), and the head's MLP weights x6 (the tiny head's
    bottleneck output has norm ~0.004, against ~1 for the 2048-wide head, and the gradient
    through its L2 normalisation overflows fp16 at the harness's loss scale 2^10)."""
    args = tiny_args(drop_path=0.0, layerscale=0.1)
    torch.manual_seed(0)
    model = C.build_model(args).train()
    with torch.no_grad():
        for m in model.student.dino_head.mlp:
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(6)
        model.teacher.load_state_dict(model.student.state_dict())
    crops, masks = batch(args)

    def step(m, b, opt, amp):
        return C.train_step(m, b[0], b[1], opt, amp, 0.04, 0.992, 3.0)
    checks.assert_gpu_step_agrees(model, (crops, C.mask_indices(masks)), step)


# ---- schedules and optimiser groups ----
def test_dinov2_schedules():
    assert [C.dinov2_schedule(s, 10, 1.0, 0.1, warmup=5) for s in range(5)] == \
        pytest.approx([0, 0.25, 0.5, 0.75, 1.0])  # np.linspace(0, 1, 5): endpoint included
    assert C.dinov2_schedule(5, 10, 1.0, 0.1, warmup=5) == 1.0
    assert C.dinov2_schedule(7, 10, 1.0, 0.1, warmup=5) == pytest.approx(
        0.1 + 0.45 * (1 + math.cos(math.pi * 2 / 5)))
    assert C.dinov2_schedule(10, 10, 1.0, 0.1, warmup=5) == 0.1
    assert C.dinov2_schedule(0, 100, 0.992, 1.0) == 0.992
    assert C.dinov2_schedule(29, 30, 0.07, 0.07, 30, 0.04) == pytest.approx(0.07)


def cosine_scheduler(base, final, total, warmup=0, start=0.0):
    """DINOv2's CosineScheduler as an array (spec §3): linspace warm-up, then the cosine."""
    iters = np.arange(total - warmup)
    return np.concatenate([np.linspace(start, base, warmup), final + 0.5 * (base - final)
                           * (1 + np.cos(np.pi * iters / len(iters)))])


def test_k400_vitb_runs_the_official_187200_steps():
    """k400-vitb at 4 x 32 on K400 (239,789 videos: 1,873 batches per rank and pass): 200
    official epochs of 936 steps, warm-ups and freeze in those steps, every schedule equal to
    the official arrays at every step; `--epoch-length 0` is one pass over the data."""
    a = C.cli.parse(C.Args, C.PRESETS, ["--preset", "k400-vitb", "--data", "x"])
    per_pass = 239789 // 4 // 32
    assert per_pass == 1873
    ep, total = C.run_length(a, per_pass)
    assert (ep, total) == (936, 187200)
    lr = a.base_lr * math.sqrt(4 * 32 / 1024)
    want = {"lr": cosine_scheduler(lr, a.min_lr, total, 10 * 936),
            "pmm_lr": cosine_scheduler(0.1 * lr, a.min_lr, total, 10 * 936),
            "wd": cosine_scheduler(0.04, 0.4, total),
            "momentum": cosine_scheduler(0.992, 1.0, total),
            "teacher_temp": cosine_scheduler(0.07, 0.07, 30 * 936, 30 * 936, 0.04)}
    want["last_lr"] = want["lr"].copy()
    want["last_lr"][:936] = 0
    steps = np.r_[0:40, 930:940, 9350:9370, 28070:28090, 100000:100010, 187180:187200]
    for s in steps:
        got = C.schedules(a, int(s), total, ep, lr)
        for k, v in want.items():
            ref = v[s] if s < len(v) else v[-1] if k != "teacher_temp" else 0.07
            assert got[k] == pytest.approx(ref, rel=1e-9, abs=1e-15), (k, s)
    end = C.schedules(a, total, total, ep, lr)
    assert (end["lr"], end["wd"], end["momentum"]) == (a.min_lr, 0.4, 1.0)
    assert C.schedules(a, 9359, total, ep, lr)["lr"] == pytest.approx(lr)  # warm-up's end
    for preset in ("k400-vits", "k400-vitb"):  # the fixed epoch is the default of both
        assert C.cli.parse(C.Args, C.PRESETS, ["--preset", preset]).epoch_length == 936
    assert C.run_length(C.Args(), 239789 // 4 // 64) == (936, 374400)  # Tab. 1 ViT-S
    b = C.cli.parse(C.Args, C.PRESETS, ["--preset", "k400-vitb", "--epoch-length", "0"])
    assert C.run_length(b, per_pass) == (1873, 374600)
    demo = C.cli.parse(C.Args, C.PRESETS, ["--preset", "demo"])
    assert demo.epoch_length == 0 and C.run_length(demo, 5) == (5, 24 * 5)  # data-derived


def test_param_groups_layer_decay_wd_and_lr_bug_flag(vits):
    a, model = vits
    groups = C.param_groups(model, a)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert len(by_name) == sum(p.requires_grad for p in model.parameters())
    assert by_name["student.backbone.blocks.0.attn.qkv.weight"]["lr_mult"] == \
        pytest.approx(0.9 ** 12)
    assert by_name["student.backbone.blocks.11.mlp.fc1.weight"]["lr_mult"] == pytest.approx(0.9)
    assert by_name["student.backbone.cls_token"]["lr_mult"] == pytest.approx(0.9 ** 13)
    assert by_name["student.backbone.patch_embed.proj.weight"]["lr_mult"] == \
        pytest.approx(0.2 * 0.9 ** 13)
    assert by_name["student.backbone.norm.weight"]["lr_mult"] == 1.0
    for n, wd in [("student.backbone.blocks.0.norm1.weight", 0), ("student.backbone.cls_token", 1),
                  ("student.backbone.blocks.0.ls1.gamma", 0), ("student.dino_head.mlp.0.bias", 0),
                  ("student.dino_head.last_layer.weight_g", 1),
                  ("auxiliary_decoder.decoder.0.auxiliary_cross_attn.in_proj_bias", 1),
                  ("auxiliary_decoder.decoder.0.auxiliary_layer_norm1.weight", 0)]:
        assert by_name[n]["wd_mult"] == wd, n
    assert by_name["student.dino_head.last_layer.weight_v"]["last_layer"]
    assert by_name["auxiliary_decoder.decoder.0.auxiliary_linear.weight"]["pmm"]
    opt = torch.optim.AdamW(groups, lr=0.0)
    for mode in ("first-release", "fixed"):
        C.set_schedules(opt, dataclasses.replace(a, lr_groups=mode), 1.0, 0.1, 0.0, 0.04)
        lr = {n: g["lr"] for n, g in by_name.items()}
        pe, last = lr["student.backbone.patch_embed.proj.weight"], \
            lr["student.dino_head.last_layer.weight_v"]
        assert lr["auxiliary_decoder.decoder.0.auxiliary_linear.weight"] == 0.1
        assert (pe, last) == ((1.0, 1.0) if mode == "first-release"
                              else (pytest.approx(0.2 * 0.9 ** 13), 0.0)), mode
        assert by_name["student.backbone.blocks.0.norm1.weight"]["weight_decay"] == 0.0
        assert by_name["student.backbone.cls_token"]["weight_decay"] == 0.04


# ---- checkpoints ----
def test_released_teacher_checkpoint_loads(tmp_path):
    args = tiny_args()
    torch.manual_seed(3)
    src = C.build_model(args)
    sd = {f"{k}": v for k, v in src.teacher.state_dict().items()}  # backbone.*, dino_head.*
    torch.save({"teacher": sd}, tmp_path / "teacher_checkpoint.pth")
    torch.manual_seed(4)
    dst = C.build_model(args)
    C.load_weights(dst, str(tmp_path / "teacher_checkpoint.pth"))
    for k, v in src.teacher.state_dict().items():
        assert torch.equal(dst.teacher.state_dict()[k], v) and torch.equal(
            dst.student.state_dict()[k], v), k
    del sd["backbone.register_tokens"]
    torch.save({"teacher": sd}, tmp_path / "no_registers.pth")
    with pytest.raises(checkpoint.CheckpointError, match="register_tokens"):
        C.load_weights(dst, str(tmp_path / "no_registers.pth"))


# ---- data ----
@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory):
    return str(synthetic.videos(tmp_path_factory.mktemp("vid"), size=32, frames=12,
                                per_class_train=1, per_class_val=1) / "train.csv")


def test_kinetics_frame_folders_and_views(tmp_path, tiny_videos):
    root = tmp_path / "Kinetics-400"
    for c in ("abseiling", "zumba"):
        d = root / "frames" / "train" / c / f"{c}_vid"
        d.mkdir(parents=True)
        for t in range(10):
            Image.fromarray(np.full((30, 50, 3), 20 * t, np.uint8)).save(d / f"{t:05d}.jpg")
    vids = C.list_videos(str(root))
    assert [os.path.basename(v) for v in vids] == ["abseiling_vid", "zumba_vid"]
    args = tiny_args(data=str(root))
    ds = C.pretrain_dataset(args)
    g, loc, aux, key = ds[(0, 1)]
    assert g.shape == (2, 3, 32, 32) and loc.shape == (2, 3, 16, 16)
    assert aux.shape == (2, 2, 3, 32, 32) and key == (0, 1)
    assert all(torch.equal(a, b) for a, b in zip(ds[(0, 1)][:3], (g, loc, aux)))
    assert not torch.equal(ds[(1, 1)][0], g)  # a new draw every epoch
    ds2 = C.pretrain_dataset(dataclasses.replace(args, data=tiny_videos))
    assert len(ds2) == 8 and ds2[(0, 3)][2].shape == (2, 2, 3, 32, 32)
    assert C.centre_box(30, 50) == (0, 5, 30, 40) and C.centre_box(40, 30) == (0, 0, 40, 30)


def test_data_reads_the_kinetics_csv_layout_of_the_other_video_scripts(tmp_path, tiny_videos):
    """`--data ROOT` with ROOT/train.csv (`path label`, relative to ROOT) reads it with
    common.data.read_video_csv, as sigma.py and sce_video.py; so does the csv file itself; a
    malformed line is named by file:line; a folder of nothing names every layout."""
    src = os.path.dirname(tiny_videos)
    root = tmp_path / "k400"
    root.mkdir()
    lines = open(tiny_videos).read().split("\n")
    (root / "train.csv").write_text("\n".join(
        f"{os.path.join(src, ln.split()[0])} {ln.split()[1]}" for ln in lines if ln.strip()))
    (root / "train").mkdir()  # a train/ folder does not hide train.csv
    want = [r.path for r in C.data.read_video_csv(tiny_videos)]
    assert C.list_videos(str(root)) == want and C.list_videos(str(root / "train.csv")) == want
    assert len(C.pretrain_dataset(tiny_args(data=str(root)))) == len(want) == 8
    (root / "train.csv").write_text(f"{want[0]} 0\n\n{want[1]}\n")
    with pytest.raises(C.cli.InputError, match=rf"{root / 'train.csv'}:3: expected 'path label"):
        C.list_videos(str(root))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train.csv.*frames/train.*class folders"):
        C.list_videos(str(tmp_path / "empty"))


def test_cross_attention_picture_feeds_the_model_on_its_device(tiny_videos, tmp_path):
    """save_cross_attention (rank 0, end of pretraining) with the model on the `meta` device
    (standing in for CUDA): every tensor reaching any module is on that device; the first
    clip's three backbone passes and two PMM passes run, and only the copy of the attention
    maps back to the host for the picture fails (meta tensors hold no data)."""
    args = tiny_args(data=tiny_videos)
    model = C.build_model(args).to("meta")
    seen = []

    def pre_hook(mod, a, kw):
        seen.append((type(mod).__name__, {x.device.type for x in [*a, *kw.values()]
                                          if isinstance(x, torch.Tensor)}))
    for mod in model.modules():
        mod.register_forward_pre_hook(pre_hook, with_kwargs=True)
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        C.save_cross_attention(model, args, str(tmp_path / "x.png"), n=1)
    assert all(devices == {"meta"} for _, devices in seen), seen[:3]
    calls = [name for name, _ in seen]
    assert calls.count("Backbone") == 3 and calls.count("PatchMatching") == 2


# ---- whole runs ----
def run_args(data, out, **kw) -> C.Args:
    return tiny_args(**{"data": data, "output_dir": str(out), "epochs": 3, "log_every": 1,
                        "ckpt_every": 1000, **kw})


def test_tiny_run_lowers_the_loss(tiny_videos, tmp_path):
    """The same steps with lr = 0 are the control (same crops, masks, drop paths)."""
    C.main(run_args(tiny_videos, tmp_path / "a", base_lr=0.05, epochs=6))
    C.main(run_args(tiny_videos, tmp_path / "b", base_lr=0.0, epochs=6))
    loss = {r: [x["train/loss"] for x in log.read_jsonl(str(tmp_path / r / "log.jsonl"))]
            for r in "ab"}
    assert len(loss["a"]) == 12
    assert sum(loss["a"][-4:]) < sum(loss["b"][-4:]) - 1.0, loss


def test_resume_is_bit_identical_and_eval_summary(tiny_videos, tmp_path):
    davis = str(synthetic.davis(tmp_path / "davis", size=(48, 64), sequences=1, frames=4))
    C.main(run_args(tiny_videos, tmp_path / "straight", max_steps=4))
    C.main(run_args(tiny_videos, tmp_path / "resumed", max_steps=2))
    out = C.main(run_args(tiny_videos, tmp_path / "resumed", max_steps=4, davis=davis))
    a = checks.assert_same_checkpoints(tmp_path / "straight" / "last.pt",
                                       tmp_path / "resumed" / "last.pt")
    assert a["step"] == 4 and a["model"]["loss.cls_pending"].abs().sum() > 0  # lag state saved
    assert 0 <= out["metrics"]["davis_jf"]["trained"] <= 1
    assert (tmp_path / "resumed" / "cross_attention.png").is_file()
    assert (tmp_path / "resumed" / "propagation.png").is_file()
    # --eval-only on our checkpoint gives the same J&F
    ev = C.main(tiny_args(output_dir=str(tmp_path / "e"), eval_only=True, data="unused",
                          init_from=str(tmp_path / "resumed" / "last.pt"), davis=davis,
                          eval_random_init=True, random_init_seeds=2))
    jf = ev["metrics"]["davis_jf"]
    assert jf["trained"] == out["metrics"]["davis_jf"]["trained"]
    v = ev["verdict"]  # DESIGN §3 on the J&F printed; no trained spread given: no "helps"
    assert v["random_init"] == pytest.approx([jf["random_init"], jf["random_init_2"]], abs=5e-5)
    assert v["spread"][1] is None and not v["helps"] and v["rule"].startswith("needs")


def test_ddp_two_processes_stay_identical(tiny_videos, tmp_path):
    """Two processes: replicas identical after training; then the label propagation runs on
    both ranks (common.propagation shares the videos where it can) and rank 0 alone prints
    the table and writes summary.json and the pictures."""
    davis = str(synthetic.davis(tmp_path / "davis", size=(48, 64), sequences=2, frames=4))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0", os.path.join(ROOT, "tcore.py"),
           "--data", tiny_videos, "--output-dir", str(tmp_path), "--model", "tiny", "--depth",
           "1", "--patch-size", "8", "--global-size", "32", "--local-size", "16",
           "--local-crops", "2", "--head-hidden", "32", "--head-bottleneck", "16",
           "--head-prototypes", "64", "--pmm-heads", "4", "--batch-size", "2",
           "--num-workers", "0", "--amp", "none", "--epochs", "1", "--epoch-length", "0",
           "--warmup-epochs", "0", "--log-every", "1", "--davis", davis, "--davis-size", "48",
           "64"]
    proc = subprocess.run(cmd, env=checks.ENV, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("davis_jf") == 1  # the metric table, printed by rank 0 only
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= summary["metrics"]["davis_jf"]["trained"] <= 1
    assert (tmp_path / "propagation.png").is_file()
    assert (tmp_path / "cross_attention.png").is_file()
    assert sorted(os.listdir(tmp_path / "davis_pred")) == sorted(
        os.listdir(os.path.join(davis, "Annotations", "480p")))  # every sequence written
    recs = log.read_jsonl(str(tmp_path / "log.jsonl"))
    assert [r["step"] for r in recs if "train/loss" in r] == [1, 2]  # 8 videos / (2 x 2)
    (diff,) = [r["ddp/max_replica_diff"] for r in recs if "ddp/max_replica_diff" in r]
    assert diff == 0.0  # student, teacher, PMM and the centres


def test_cli_help_unknown_flag_and_user_error(tmp_path):
    out = subprocess.run([sys.executable, "tcore.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    text = " ".join(out.stdout.split()).replace("- ", "-")
    for f in dataclasses.fields(C.Args):
        doc = C.cli.field_docs(C.Args)[f.name]
        assert doc and (f.name == "preset" or " ".join(doc.split()).replace("- ", "-") in text), \
            f.name
    bad = subprocess.run([sys.executable, "tcore.py", "--mask-probb", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unrecognized arguments: --mask-probb" in bad.stderr
    err = subprocess.run([sys.executable, "tcore.py", "--data", "/nonexistent", "--output-dir",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert err.returncode == 2 and err.stderr.strip().split("\n")[-1].startswith(
        "error: --data /nonexistent: no such file or folder"), err.stderr[-2000:]
    assert "Traceback" not in err.stderr
    a = C.cli.parse(C.Args, C.PRESETS, ["--data", "x"])
    assert a.base_lr * math.sqrt(256 / 1024) == pytest.approx(1e-3)  # spec §3
    b = C.cli.parse(C.Args, C.PRESETS, ["--data", "x", "--preset", "k400-vitb"])
    assert (b.model, b.epochs, b.warmup_epochs) == ("base", 200, 10)


def test_non_finite_loss_stops_before_its_update(tiny_videos, tmp_path, monkeypatch):
    """NaN pixels in every crop at step 4 make the real loss NaN: the student, teacher, PMM,
    head and centre are as before that step, and last.pt of step 2 is kept."""
    seen = checks.nan_input_at_step(monkeypatch, C, 4)
    m = C.Args.center_momentum

    def lagged(name):  # the forward applies step 3's (finite) means, the one-step lag
        return lambda c: c.clone().mul_(m).add_(seen["before"][f"loss.{name}_pending"],
                                                alpha=1 - m)
    checks.assert_stopped_before_update(
        seen, lambda: C.main(run_args(tiny_videos, tmp_path, ckpt_every=2, log_every=5)),
        tmp_path / "last.pt", step=4, kept=2,
        forward_changes={"loss.cls_center": lagged("cls"), "loss.patch_center": lagged("patch")})
    # step 4's NaN means were never committed: the pending buffers are step 3's
    assert torch.isfinite(seen["model"].loss.cls_pending).all()


def test_eval_only_vos_on_synthetic_sets(tmp_path, capsys):
    """--eval-only --vos-davis/--vos-ytvos (SIGMA Tab. 4 protocol, common/vos.py): per-frame
    patch tokens; summary.json's metrics equal common/vos.py called directly; the picture;
    a bad root is one line on the command line."""
    torch.manual_seed(0)
    tc = C.build_model(tiny_args())
    torch.save({"model": tc.state_dict()}, tmp_path / "ckpt.pt")
    davis = str(synthetic.davis(tmp_path / "davis", size=(48, 64), sequences=1, frames=5))
    yt = str(synthetic.ytvos(tmp_path / "yt", size=(48, 64), videos=2, frames=4))
    out = C.main(tiny_args(output_dir=str(tmp_path / "e"), eval_only=True, data="unused",
                           init_from=str(tmp_path / "ckpt.pt"), vos_davis=davis, vos_ytvos=yt))
    bb = tc.teacher.backbone.eval()
    direct = C.vos.vos_metrics(lambda x: C.patch_features(bb, x).permute(0, 2, 3, 1), ytvos=yt)
    for name, value in direct.items():
        assert out["metrics"][name]["trained"] == round(value, 4), name
    assert 0 < out["metrics"]["vos_davis_overclustering_miou"]["trained"] <= 1
    assert "davis_jf" not in out["metrics"] and (tmp_path / "e" / "vos_davis.png").is_file()
    assert checks.cli_error(C, ["--eval-only", "--preset", "demo", "--data", "unused",
                                "--no-eval-random-init", "--vos-ytvos", str(tmp_path / "nope"),
                                "--output-dir", str(tmp_path / "x")], capsys) == \
        f"error: {tmp_path / 'nope' / 'meta.json'}: YouTube-VOS meta.json not found (expected " \
        "JPEGImages/<video>, Annotations/<video>, meta.json)"
