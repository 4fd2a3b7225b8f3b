"""Tests for common/checkpoint.py: atomic save, weights_only load, RNG, prefixes, resume."""
import argparse
import random

import numpy as np
import pytest
import torch
from torch import nn

from common import checkpoint, optim


def small_model():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_checkpoint_round_trip_weights_only(tmp_path):
    torch.manual_seed(0)
    model = small_model()
    opt = torch.optim.AdamW(optim.param_groups(model, 0.05), lr=1e-3)
    amp = optim.Amp("fp16", "cpu")
    amp.step(model(torch.randn(5, 3)).float().pow(2).mean(), opt)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": amp.state_dict(),
             "step": 7, "args": {"lr": 1e-3, "name": "x", "sizes": [1, 2]},
             "rng": checkpoint.rng_state()}
    path = tmp_path / "sub" / "last.pt"
    checkpoint.save(path, state)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    torch.load(path, weights_only=True)                       # plain torch accepts it too
    loaded = checkpoint.load(path)
    assert_same_tensors(loaded["model"], state["model"])
    assert loaded["step"] == 7 and loaded["args"] == state["args"]
    assert loaded["scaler"]["scale"] == amp.scaler.get_scale()
    fresh = small_model()
    fresh_opt = torch.optim.AdamW(optim.param_groups(fresh, 0.05), lr=1e-3)
    checkpoint.load_model(fresh, loaded["model"])
    fresh_opt.load_state_dict(loaded["optimizer"])
    assert_same_tensors(fresh.state_dict(), model.state_dict())
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert_same_tensors(opt.state[p], fresh_opt.state[q])
    assert fresh_opt.param_groups[1]["param_names"] == opt.param_groups[1]["param_names"]


class ExplodingObject:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated)")


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    old = {"w": torch.arange(1000.0), "step": 1}
    checkpoint.save(path, old)
    # the first tensor is serialised before the exploding object is reached
    with pytest.raises(RuntimeError, match="disk full"):
        checkpoint.save(path, {"w": torch.zeros(1000), "boom": ExplodingObject()})
    loaded = checkpoint.load(path)
    assert torch.equal(loaded["w"], old["w"]) and loaded["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        checkpoint.load(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(RuntimeError, match="bad.pt"):
        checkpoint.load(bad)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(100)}, good)
    good.write_bytes(good.read_bytes()[:200])                 # truncated
    with pytest.raises(RuntimeError, match="good.pt"):
        checkpoint.load(good)
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"obj": ExplodingObject}, unsafe)  # a class: refused by weights_only
    with pytest.raises(RuntimeError, match="unsafe.pt.*ExplodingObject"):
        checkpoint.load(unsafe)
    ns = tmp_path / "ns.pt"                                   # MAE-style released checkpoint
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, ns)
    assert checkpoint.load(ns)["args"].lr == 0.1


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    checkpoint.save(tmp_path / "rng.pt", {"rng": checkpoint.rng_state()})
    draw = lambda: (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(),
                    np.random.randn(), torch.randn(4))
    first = draw()
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "rng.pt")["rng"])
    second = draw()
    assert first[:4] == second[:4] and torch.equal(first[4], second[4])


def test_unwrap_and_prefix_stripping():
    model = small_model()
    assert checkpoint.unwrap(nn.DataParallel(torch.compile(model))) is model
    assert checkpoint.unwrap(torch.compile(nn.DataParallel(model))) is model
    sd = model.state_dict()
    ddp = {"module." + k: v for k, v in sd.items()}
    compiled = {"_orig_mod." + k: v for k, v in sd.items()}
    both = {"module._orig_mod." + k: v for k, v in sd.items()}
    for wrapped in (ddp, compiled, both):
        assert list(checkpoint.clean_state_dict(wrapped)) == list(sd)
        fresh = small_model()
        assert checkpoint.load_model(torch.compile(fresh), wrapped) == ([], [])
        assert_same_tensors(fresh.state_dict(), sd)
    # a component named "module" deeper in the name is a real module and is kept
    assert list(checkpoint.clean_state_dict({"a.module.w": 1})) == ["a.module.w"]


def test_load_model_mismatch_messages():
    model = small_model()
    sd = model.state_dict()
    sd["extra.weight"] = torch.zeros(1)
    del sd["3.bias"]
    with pytest.raises(RuntimeError) as err:
        checkpoint.load_model(small_model(), sd, what="runs/x/last.pt")
    msg = str(err.value)
    assert "runs/x/last.pt" in msg and "missing (1): 3.bias" in msg
    assert "unexpected (1): extra.weight" in msg and "\n" not in msg  # one line
    assert checkpoint.load_model(small_model(), sd, strict=False) == (["3.bias"], ["extra.weight"])
    sd = model.state_dict()
    sd["0.weight"] = torch.zeros(5, 3)
    with pytest.raises(RuntimeError, match=r"f.pt.*; shape mismatch \(1\): 0.weight \(5, 3\) "
                                           r"vs model \(4, 3\)"):
        checkpoint.load_model(small_model(), sd, strict=False, what="f.pt")


def test_init_from_detects_key_and_prefix(tmp_path):
    src = small_model()
    sd = src.state_dict()
    torch.save(sd, tmp_path / "raw.pt")
    torch.save({"teacher": sd, "step": 3}, tmp_path / "teacher.pt")
    prefixed = {"encoder." + k: v for k, v in sd.items()} | {"head.w": torch.ones(1)}
    torch.save({"state_dict": prefixed, "epoch": 1}, tmp_path / "prefixed.pt")
    for name, kw in (("raw.pt", {}), ("teacher.pt", {}), ("teacher.pt", {"key": "teacher"}),
                     ("prefixed.pt", {"prefix": "encoder."})):
        dst = small_model()
        assert checkpoint.init_from(dst, tmp_path / name, strict=True, **kw) == ([], [])
        assert_same_tensors(dst.state_dict(), sd)
    with pytest.raises(ValueError, match="no key 'ema'"):
        checkpoint.init_from(small_model(), tmp_path / "teacher.pt", key="ema")
    torch.save({"step": 3}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="empty.pt"):
        checkpoint.init_from(small_model(), tmp_path / "empty.pt")


def train(model, opt, steps, start, total=8):
    """Toy loop: random data from the torch and python RNGs, dropout, per-step lr schedule."""
    for step in range(start, start + steps):
        optim.set_lr_wd(opt, optim.cosine_schedule(step, total, peak=0.1, warmup_steps=2))
        x = torch.randn(16, 3) * (1 + random.random())
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def build(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.ReLU(), nn.Linear(8, 2))
    return model, torch.optim.SGD(optim.param_groups(model, 1e-4), lr=0.0, momentum=0.9)


def test_resume_is_bit_identical(tmp_path):
    random.seed(0)
    model, opt = build(0)
    train(model, opt, 8, start=0)

    random.seed(0)
    half, half_opt = build(0)
    train(half, half_opt, 4, start=0)
    amp = optim.Amp("none", torch.device("cpu"))
    checkpoint.save_training(tmp_path / "last.pt", {"model": half, "optimizer": half_opt}, amp,
                             4, argparse.Namespace(), note="extra")
    random.seed(123)
    resumed, resumed_opt = build(1)                            # fresh, different init and RNG
    ckpt = checkpoint.load_training(tmp_path / "last.pt",
                                    {"model": resumed, "optimizer": resumed_opt}, amp)
    step = ckpt["step"]
    assert step == 4 and ckpt["note"] == "extra"
    train(resumed, resumed_opt, 4, start=step)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_real_ddp_wrapper_is_stripped(tmp_path):
    import torch.distributed as tdist
    store = tdist.FileStore(str(tmp_path / "store"), 1)
    tdist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = small_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        assert checkpoint.unwrap(ddp) is model
        assert list(ddp.state_dict())[0].startswith("module.")
        fresh = small_model()
        checkpoint.load_model(fresh, ddp.state_dict())
        assert_same_tensors(fresh.state_dict(), model.state_dict())
        teacher = small_model()
        optim.ema_update(teacher, ddp, momentum=0.0)          # m = 0: teacher becomes student
        assert_same_tensors(teacher.state_dict(), model.state_dict())
    finally:
        tdist.destroy_process_group()


def test_strip_prefix_picks_the_first_layout_present_and_drops_ignored_keys():
    w = torch.ones(2)
    sd = {"trunk.model.a.weight": w, "trunk.model.b": w, "momentum_trunk.model.a.weight": 2 * w,
          "head.weight": w}
    out, prefix = checkpoint.strip_prefix(sd, ("encoder.", "trunk.model.", "trunk."),
                                          ignore=("momentum_trunk.",))
    assert prefix == "trunk.model." and sorted(out) == ["a.weight", "b"]
    out, prefix = checkpoint.strip_prefix({"a.weight": w}, ("trunk.",))
    assert prefix == "" and list(out) == ["a.weight"]  # a bare backbone file
    assert checkpoint.key_prefixes(sd) == ["head.weight.", "momentum_trunk.model.",
                                           "trunk.model."]


def test_a_file_that_fits_no_layout_names_the_prefixes_it_holds():
    model = nn.Linear(2, 2)
    with pytest.raises(checkpoint.CheckpointError, match=r"key prefixes in the file.*net\.fc\."):
        checkpoint.load_model(model, {"net.fc.weight": torch.ones(2, 2)}, what="x.pt")
