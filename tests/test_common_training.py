"""common/training.py and the pieces it relies on: a toy loop with dropout, a random
per-sample input and a global-RNG draw per step resumes bitwise from any checkpoint; a NaN
loss stops the run before its update; a checkpoint of another source is refused; logging and
checkpoint cadence; loaders never draw from the global generator."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from common import checkpoint, data, log, optim, training
from tests import checks


@dataclass
class Args:
    output_dir: str
    log_every: int = 3
    ckpt_every: int = 2


class Noise(Dataset):
    """Sample i of epoch e: a vector drawn from (seed, e, i) and a label."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, key):
        epoch, index = data.split_key(key)
        return torch.randn(4, generator=data.sample_rng(0, epoch, index)), index % 2


def run(out, max_steps=0, nan_at=None, source="init", ckpt_every=2, log_every=3, resume="",
        box=None, inf_grad_at=None, batch=3, accum=1):
    """3 epochs of 3 steps (10 samples, batch 3, drop_last); returns (model, loop); the model
    is also put in `box["model"]`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2))
    if box is not None:
        box["model"] = model
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    amp = optim.Amp("none", torch.device("cpu"))
    loader = data.make_loader(Noise(), batch, train=True, seed=0)
    args = Args(str(out), log_every, ckpt_every)
    loop = training.Loop(loader, 3, {"model": model, "optimizer": opt}, args,
                         log.Logger(str(out)), amp, max_steps=max_steps, source=source,
                         accum_iter=accum)
    loop.resume(resume)
    for x, y in loop:
        x = x + 0.1 * torch.randn_like(x)  # a global-RNG draw each step, like masks or mixup
        loss = nn.functional.cross_entropy(model(x), y)
        if loop.step + 1 == nan_at:
            loss = loss * float("nan")
        if loop.step + 1 == inf_grad_at:  # a finite loss whose gradient overflows
            model[0].weight.register_hook(lambda g: g * float("inf"))
        amp.step(loss, opt)
        loop.end_step({"loss": loss.detach()}, {"train/lr": 0.05})
    return model, loop


def test_steps_epochs_and_logging(tmp_path):
    _, loop = run(tmp_path)
    assert (loop.steps_per_epoch, loop.total_steps, loop.step) == (3, 9, 9)
    recs = log.read_jsonl(str(tmp_path / "log.jsonl"))
    assert [r["step"] for r in recs] == [3, 6, 9]  # every log_every and the last step
    assert [r["epoch"] for r in recs] == [0, 1, 2]
    assert all(r["train/lr"] == 0.05 and r["train/skipped"] == 0 for r in recs)
    assert checkpoint.load(tmp_path / "last.pt")["step"] == 9


@pytest.mark.parametrize("stop", [2, 4, 5])  # mid-epoch, and at an epoch boundary (6 = 2 x 3)
def test_resume_is_bitwise_the_uninterrupted_run(tmp_path, stop):
    run(tmp_path / "straight", ckpt_every=1)
    run(tmp_path / "resumed", max_steps=stop, ckpt_every=1)
    _, loop = run(tmp_path / "resumed", ckpt_every=1)  # resumes last.pt
    assert loop.step == 9
    checks.assert_same_checkpoints(tmp_path / "straight" / "last.pt",
                                   tmp_path / "resumed" / "last.pt")
    a = log.read_jsonl(str(tmp_path / "straight" / "log.jsonl"))
    b = log.read_jsonl(str(tmp_path / "resumed" / "log.jsonl"))
    after = [[r["train/loss"] for r in recs if r["step"] > stop] for recs in (a, b)]
    assert after[0] == after[1] and len(after[0]) >= 2


@pytest.mark.parametrize("stop", [1, 3])  # 10 samples, batch 2, 2 micro-batches: 2 steps/epoch
def test_accumulation_resumes_bitwise(tmp_path, stop):
    _, loop = run(tmp_path / "straight", ckpt_every=1, batch=2, accum=2)
    assert (loop.steps_per_epoch, loop.step) == (2, 6)  # the 5th micro-batch is dropped
    run(tmp_path / "resumed", max_steps=stop, ckpt_every=1, batch=2, accum=2)
    run(tmp_path / "resumed", ckpt_every=1, batch=2, accum=2)
    checks.assert_same_checkpoints(tmp_path / "straight" / "last.pt",
                                   tmp_path / "resumed" / "last.pt")


def test_accumulation_flags_are_checked(tmp_path):
    run(tmp_path, max_steps=1, batch=2, accum=2)
    with pytest.raises(checkpoint.CheckpointError, match="--accum-iter 2, this run has 1"):
        run(tmp_path, batch=2, accum=1)  # the saved step means other batches
    loader = data.make_loader(Noise(), 3, train=True)
    amp = optim.Amp("none", torch.device("cpu"))
    with pytest.raises(ValueError, match="--accum-iter must be at least 1"):
        training.Loop(loader, 1, {}, Args(str(tmp_path)), log.Logger(None), amp, accum_iter=0)
    with pytest.raises(ValueError, match="fewer than one batch of 3 x --accum-iter 4: lower "
                                         "--batch-size or --accum-iter"):
        training.Loop(loader, 1, {}, Args(str(tmp_path)), log.Logger(None), amp, accum_iter=4)


def test_leaving_the_loop_early_resets_the_accumulation(tmp_path):
    loader = data.make_loader(Noise(), 2, train=True)
    amp = optim.Amp("none", torch.device("cpu"))
    loop = training.Loop(loader, 1, {}, Args(str(tmp_path)), log.Logger(None), amp, accum_iter=2)
    for _ in loop:
        assert amp.accum == (0, 2)
        break  # the loop's generator is closed when the for loop is left: `finally` runs
    assert amp.accum == (0, 1)


def test_accumulating_two_half_batches_is_one_full_batch(tmp_path):
    """Same samples, same order: 2 x 4 accumulated equals one batch of 8 (up to rounding)."""
    out = {}
    for batch, accum in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        init = torch.cat([p.detach().flatten() for p in model.parameters()])
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        amp = optim.Amp("none", torch.device("cpu"))
        loader = data.make_loader(Noise(), batch, train=True, seed=0)
        loop = training.Loop(loader, 4, {"model": model, "optimizer": opt},
                             Args(str(tmp_path / str(accum)), 100, 100), log.Logger(None), amp,
                             accum_iter=accum)
        for x, y in loop:
            amp.step(nn.functional.cross_entropy(model(x), y), opt)
            loop.end_step({"loss": torch.zeros(())})
        assert loop.step == 4 and amp.accum == (0, 1)
        out[accum] = torch.cat([p.flatten() for p in model.parameters()])
    assert torch.allclose(out[1], out[2], atol=1e-6)
    assert (out[1] - init).abs().max() > 0.05  # it did train


def test_non_finite_loss_never_reaches_the_weights(tmp_path):
    ref, _ = run(tmp_path / "ref", max_steps=4, ckpt_every=1)  # the weights after step 4
    box = {}
    with pytest.raises(optim.NonFiniteLoss, match=r"at step 5 .*last\.pt \(step 4\) is kept"):
        run(tmp_path / "nan", nan_at=5, ckpt_every=4, log_every=100, box=box)
    checks.assert_same(ref.state_dict(), box["model"].state_dict())
    checks.assert_same_checkpoints(tmp_path / "ref" / "last.pt", tmp_path / "nan" / "last.pt")


def test_weights_made_non_finite_by_a_finite_loss_are_never_saved(tmp_path):
    with pytest.raises(optim.NonFiniteLoss, match=r"weights .*at step 4 .*\(step 2\) is kept"):
        run(tmp_path, inf_grad_at=4, ckpt_every=2, log_every=100)
    ckpt = checkpoint.load(tmp_path / "last.pt")
    assert ckpt["step"] == 2 and all(v.isfinite().all() for v in ckpt["model"].values())


def test_no_checkpoint_yet_is_said(tmp_path):
    with pytest.raises(optim.NonFiniteLoss, match="at step 1 .*no checkpoint was written yet"):
        run(tmp_path, nan_at=1)


def test_a_checkpoint_of_another_source_is_refused(tmp_path):
    run(tmp_path, max_steps=2, source="a.pt")
    with pytest.raises(checkpoint.CheckpointError, match=r"started from 'a.pt', not from 'b.pt'"):
        run(tmp_path, source="b.pt")
    _, loop = run(tmp_path, source="b.pt", resume=str(tmp_path / "last.pt"))  # explicit: taken
    assert loop.step == 9


def test_forgetting_end_step_is_an_error(tmp_path):
    loader = data.make_loader(Noise(), 3, train=True)
    loop = training.Loop(loader, 1, {}, Args(str(tmp_path)), log.Logger(None),
                         optim.Amp("none", torch.device("cpu")))
    with pytest.raises(RuntimeError, match="end_step"):
        for _ in loop:
            pass


def test_fewer_samples_than_a_batch_is_a_user_error(tmp_path):
    loader = data.make_loader(Noise(), 11, train=True)
    with pytest.raises(ValueError, match="fewer than one batch of 11"):
        training.Loop(loader, 1, {}, Args(str(tmp_path)), log.Logger(None),
                      optim.Amp("none", torch.device("cpu")))


def test_loaders_never_draw_from_the_global_generator():
    for train in (True, False):
        torch.manual_seed(3)
        before = torch.get_rng_state()
        for _ in range(2):  # a new iterator each epoch, as a resumed run starts one more
            list(data.make_loader(Noise(), 3, train=train, seed=0))
        assert torch.equal(before, torch.get_rng_state())


def test_args_are_stored_as_a_dict(tmp_path):
    run(tmp_path, max_steps=2)
    saved = checkpoint.load(tmp_path / "last.pt")["args"]
    assert saved == {"output_dir": str(tmp_path), "log_every": 3, "ckpt_every": 2}
