"""Tests for common/optim.py: schedules, groups, LARS, EMA, layer decay, AMP."""
import copy
import math

import pytest
import torch
from torch import nn

from common import cli, optim


# ---- schedules -------------------------------------------------------------------------------

def test_cosine_schedule_endpoints_warmup_and_midpoint():
    f = lambda s: optim.cosine_schedule(s, total_steps=110, peak=1.0, warmup_steps=10,
                                        start=0.1, final=0.2)
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.55)                        # linear warmup
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx((1.0 + 0.2) / 2)            # half-way through the cosine
    assert f(35) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert f(110) == 0.2 and f(500) == 0.2
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))    # monotone decay


def test_cosine_schedule_increasing_ema_momentum():
    f = lambda s: optim.cosine_schedule(s, 100, peak=0.99, start=0.99, final=1.0)
    assert f(0) == pytest.approx(0.99)
    assert f(50) == pytest.approx(0.995)
    assert f(100) == 1.0
    values = [f(s) for s in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError):
        optim.cosine_schedule(0, 10, 1.0, warmup_steps=11)


def test_set_lr_wd_honors_lr_scale_and_no_decay():
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a], "weight_decay": 0.1, "apply_wd": True, "lr_scale": 0.5},
                           {"params": [b], "weight_decay": 0.0, "apply_wd": False},
                           {"params": [c], "weight_decay": 0.3}], lr=1.0)
    optim.set_lr_wd(opt, lr=2.0, wd=0.7)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 2.0, 2.0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.7, 0.0, 0.7]
    optim.set_lr_wd(opt, lr=4.0)                              # wd untouched
    assert [g["weight_decay"] for g in opt.param_groups] == [0.7, 0.0, 0.7]


# ---- parameter groups ------------------------------------------------------------------------

class TinyViT(nn.Module):
    def __init__(self, depth=3):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 4, 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)


def names_of(group):
    return set(group["param_names"])


def test_param_groups_split_by_name():
    model = TinyViT(depth=1)
    model.norm.weight.requires_grad_(False)
    decay, no_decay = optim.param_groups(model, weight_decay=0.05)
    assert names_of(decay) == {"patch_embed.weight", "blocks.0.1.weight", "head.weight"}
    assert names_of(no_decay) == {"patch_embed.bias", "cls_token", "pos_embed", "blocks.0.0.weight",
                                  "blocks.0.0.bias", "blocks.0.1.bias", "norm.bias", "head.bias"}
    assert (decay["weight_decay"], decay["apply_wd"]) == (0.05, True)
    assert (no_decay["weight_decay"], no_decay["apply_wd"]) == (0.0, False)
    assert all(p is dict(model.named_parameters())[n]
               for n, p in zip(decay["param_names"], decay["params"]))
    # extra names, a custom rule, and a wrapper around the model
    decay, _ = optim.param_groups(model, 0.05, extra_no_decay_names=("head",))
    assert names_of(decay) == {"patch_embed.weight", "blocks.0.1.weight"}
    wrapped = torch.nn.DataParallel(model)
    decay, no_decay = optim.param_groups(wrapped, 0.05, no_decay=lambda n, p: n.endswith(".bias"))
    assert "cls_token" in names_of(decay) and names_of(no_decay) == {
        "patch_embed.bias", "blocks.0.0.bias", "blocks.0.1.bias", "norm.bias", "head.bias"}


def test_layer_decay_groups_scales():
    depth, decay = 3, 0.5
    groups = optim.layer_decay_groups(TinyViT(depth), 0.05, decay, num_layers=depth)
    scale = {n: g["lr_scale"] for g in groups for n in g["param_names"]}
    wd = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    assert scale["patch_embed.weight"] == scale["cls_token"] == scale["pos_embed"] == 0.5 ** 4
    assert scale["blocks.0.1.weight"] == 0.5 ** 3
    assert scale["blocks.2.0.bias"] == 0.5 ** 1
    assert scale["head.weight"] == scale["norm.weight"] == 1.0
    assert wd["blocks.2.1.weight"] == 0.05
    assert wd["blocks.2.1.bias"] == wd["pos_embed"] == 0.0
    assert optim.layer_id("encoder.spatial_transformer.blocks.11.attn.qkv.weight", 12) == 12
    assert optim.layer_id("decoder_blocks.0.mlp.fc1.weight", 12) == 13  # not an encoder block
    with pytest.raises(ValueError, match="num_layers"):
        optim.layer_decay_groups(TinyViT(depth), 0.05, decay, num_layers=2)


# ---- LARS ------------------------------------------------------------------------------------

def test_lars_two_steps_by_hand():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = optim.LARS([w, b], lr=0.1, momentum=0.9, weight_decay=0.1, trust_coefficient=0.6)
    for _ in range(2):
        w.grad = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
        b.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)
        opt.step()
        if _ == 0:
            # g = (0.6,0.8) + 0.1*(3,4) = (0.9,1.2), |g| = 1.5, |w| = 5, trust = 0.6*5/1.5 = 2
            # mu = (1.8, 2.4), w = (3,4) - 0.1*mu; bias: plain SGD-momentum, no wd
            assert torch.allclose(w, torch.tensor([[2.82, 3.76]], dtype=torch.float64))
            assert torch.allclose(b, torch.tensor([0.95, 1.95], dtype=torch.float64))
    # step 2: w stays along (3,4)/5, |w| = 4.7; g = (0.6,0.8) + 0.1*w = 1.47*(0.6,0.8)
    trust = 0.6 * 4.7 / 1.47
    mu = [0.9 * 1.8 + trust * 0.6 * 1.47, 0.9 * 2.4 + trust * 0.8 * 1.47]
    assert torch.allclose(w, torch.tensor([[2.82 - 0.1 * mu[0], 3.76 - 0.1 * mu[1]]],
                                          dtype=torch.float64))
    assert torch.allclose(b, torch.tensor([0.95 - 0.1 * 0.95, 1.95 - 0.1 * 0.95],
                                          dtype=torch.float64))


def test_lars_per_group_options_and_zero_norm():
    w = nn.Parameter(torch.zeros(1, 2))                      # |w| = 0: trust 1
    b = nn.Parameter(torch.tensor([2.0]))
    opt = optim.LARS([{"params": [w]}, {"params": [b], "exclude_1d": False, "weight_decay": 0.5}],
                     lr=1.0, momentum=0.0)
    w.grad, b.grad = torch.tensor([[1.0, -1.0]]), torch.tensor([1.0])
    opt.step()
    assert torch.equal(w, torch.tensor([[-1.0, 1.0]]))
    # b not excluded: g = 1 + 0.5*2 = 2; trust = 1e-3 * 2 / 2 = 1e-3
    assert b.item() == pytest.approx(2.0 - 2e-3)


# ---- EMA -------------------------------------------------------------------------------------

def test_ema_update_formula_buffers_and_wrappers():
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Linear(2, 3))
    teacher = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))  # student has an extra head
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(1.0)
        for p in student.parameters():
            p.fill_(3.0)
        student[1].running_mean.fill_(7.0)
    optim.ema_update(teacher, torch.nn.DataParallel(student), momentum=0.75)
    for p in teacher.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.75 * 1 + 0.25 * 3))
    assert torch.equal(teacher[1].running_mean, torch.full((2,), 7.0))
    student[1].running_mean.fill_(0.0)
    optim.ema_update(teacher, student, momentum=0.5, copy_buffers=False)
    assert torch.allclose(teacher[0].weight, torch.full((2, 2), 0.5 * 1.5 + 0.5 * 3))
    assert torch.equal(teacher[1].running_mean, torch.full((2,), 7.0))
    with pytest.raises(ValueError, match="absent"):
        optim.ema_update(student, teacher, 0.5)


# ---- AMP -------------------------------------------------------------------------------------

def test_amp_modes_and_autocast_dtype():
    cpu = torch.device("cpu")
    assert optim.resolve_amp("auto", cpu) == "none"
    assert optim.resolve_amp("auto", torch.device("cuda", 0)) == "bf16"
    with pytest.raises(ValueError, match="--amp"):
        optim.resolve_amp("fp8", cpu)
    a = torch.randn(4, 4)
    for mode, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("none", torch.float32)):
        amp = optim.Amp(mode, cpu)
        with amp.autocast():
            assert (a @ a).dtype == dtype
        assert amp.scaler.is_enabled() == (mode == "fp16")


@pytest.mark.parametrize("mode", ["none", "fp16"])
def test_amp_step_updates_clips_and_zeroes(mode):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    amp = optim.Amp(mode, "cpu")
    x = torch.randn(8, 4)
    before = [p.detach().clone() for p in model.parameters()]
    # the gradient of mean(100 * out) is known: 100 * mean(x) for the weight, 100 for the bias
    expected = torch.cat([100 * x.mean(0), torch.tensor([100.0])])
    norm = amp.step((100 * model(x)).float().mean(), opt, clip_grad=0.5)
    assert norm.item() == pytest.approx(expected.norm().item(), rel=1e-4)  # pre-clip norm
    delta = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert delta.norm().item() == pytest.approx(0.5, rel=1e-4)  # lr 1: step = clipped grad
    assert torch.allclose(delta, expected * 0.5 / expected.norm(), rtol=1e-4)
    assert all(p.grad is None for p in model.parameters())
    assert amp.step(model(x).mean(), opt) is None
    if mode == "fp16":
        state = amp.state_dict()
        other = optim.Amp("fp16", "cpu")
        other.load_state_dict(state)
        assert other.scaler.get_scale() == amp.scaler.get_scale()


def lars_loop_reference(params, lr, momentum, wd, eta, bufs):
    """The per-parameter LARS loop of the class docstring (the form checked against eztorch)."""
    for p in params:
        g = p.grad
        if p.ndim > 1:
            g = g.add(p, alpha=wd)
            p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
            g = g * torch.where((p_norm > 0) & (g_norm > 0), eta * p_norm / g_norm, 1.0)
        mu = bufs.setdefault(id(p), torch.zeros_like(p)).mul_(momentum).add_(g)
        p.add_(mu, alpha=-lr)


def test_lars_foreach_is_bitwise_the_per_parameter_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 5))
    ref = copy.deepcopy(net)
    with torch.no_grad():
        net[0].weight.zero_()  # |p| = 0: trust 1
        ref[0].weight.zero_()
    opt = optim.LARS(net.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-4)
    bufs = {}
    for step in range(3):
        x = torch.randn(4, 3, 8, 8)
        for m in (net, ref):
            m.zero_grad()
            m(x).square().mean().backward()
        net[3].bias.grad = None if step == 1 else net[3].bias.grad  # a param without grad
        if step == 1:
            ref[3].bias.grad = None
        opt.step()
        with torch.no_grad():
            lars_loop_reference([p for p in ref.parameters() if p.grad is not None], 0.3, 0.9,
                                1e-4, 1e-3, bufs)
        for a, b in zip(net.parameters(), ref.parameters()):
            assert torch.equal(a, b)


def test_amp_resume_across_modes():
    """A bf16 / fp32 checkpoint holds no loss scale: fp16 resumes it with a fresh scaler; an
    fp16 checkpoint's scale is ignored by a bf16 run."""
    bf16, fp16 = optim.Amp("bf16", "cpu"), optim.Amp("fp16", "cpu", init_scale=64.0)
    assert bf16.state_dict() == {}
    fp16.load_state_dict(bf16.state_dict())
    assert fp16.scaler.get_scale() == 64.0
    other = optim.Amp("fp16", "cpu", init_scale=8.0)
    other.load_state_dict(fp16.state_dict())
    assert other.scaler.get_scale() == 64.0
    bf16.load_state_dict(fp16.state_dict())
    assert not bf16.scaler.is_enabled()


def test_the_gpu_step_check_passes_a_faithful_step_and_catches_a_wrong_one():
    """`checks.assert_gpu_step_agrees`, run against CPU autocast (what the GPU tests run
    against CUDA): an honest step passes; a step whose 16-bit path drops a term fails."""
    from tests import checks
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    batch = (torch.randn(64, 16), torch.randint(0, 8, (64,)))

    def step(m, b, opt, amp, wrong=False):
        x, y = b
        with amp.autocast():
            logits = m(x)
            if wrong and amp.mode != "none":
                logits = logits[:, :4].repeat(1, 2)  # a bug only the mixed-precision path has
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        amp.step(loss, opt)
        return {"loss": loss.detach()}

    report = checks.assert_gpu_step_agrees(model, batch, step, device="cpu")
    assert report["none"]["cos"] > 0.9999 and 0.9 < report["bf16"]["cos"] < 1
    with pytest.raises(AssertionError, match="bf16"):
        checks.assert_gpu_step_agrees(model, batch, lambda *a: step(*a, wrong=True), device="cpu")


def test_enqueue_overwrites_the_oldest_rows_and_wraps():
    queue, ptr = torch.zeros(6, 2), torch.zeros((), dtype=torch.long)
    for step in range(4):  # 2 keys a step into 6 rows: rows 0-1, 2-3, 4-5, then 0-1 again
        optim.enqueue(queue, ptr, torch.full((2, 2), float(step + 1)))
    assert queue[:, 0].tolist() == [4, 4, 2, 2, 3, 3] and int(ptr) == 2
    with pytest.raises(cli.InputError, match=r"--q 6 must be a multiple of the keys enqueued "
                                             r"per step \(4 = two views\)"):
        optim.enqueue(queue, ptr, torch.zeros(4, 2), "--q", "two views")
    assert queue[:, 0].tolist() == [4, 4, 2, 2, 3, 3]  # refused before any write
