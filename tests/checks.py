"""Checks shared by the method tests: whole-checkpoint equality (bitwise resume), a loss made
non-finite at a chosen step through the real forward pass, a run killed with SIGKILL, and a
count of the host syncs a training step would make on a GPU."""
import collections
import copy
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from common import checkpoint, optim, training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORED = ("args", "source")  # args name the output folder, which differs between the runs
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every run compared bitwise


def assert_same(a, b, where: str = "") -> None:
    """Equal tensor for tensor (dtype, shape and every bit), and equal everything else."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max diff {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(a), sorted(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def assert_same_checkpoints(path_a, path_b) -> dict:
    """Two checkpoint files hold the same state: model, optimiser, scaler, step, every rank's
    RNG states and anything else, except the run-specific `args` and `source`."""
    a, b = checkpoint.load(path_a), checkpoint.load(path_b)
    assert set(a) == set(b), (sorted(a), sorted(b))
    assert "rng" in a and "optimizer" in a
    for key in a:
        if key not in IGNORED:
            assert_same(a[key], b[key], key)
    return a


def nan_input_at_step(monkeypatch, module, step: int, arg: int = 1) -> dict:
    """Wrap `module.train_step` so that at call `step` its input (positional `arg`) is
    multiplied by NaN: the real forward then gives a non-finite loss. Returns a dict that
    receives "model" (unwrapped) and "before" (its state dict just before that call)."""
    real, seen = module.train_step, {"calls": 0}

    def wrapped(*a, **kw):
        seen["calls"] += 1
        if seen["calls"] == step:
            seen["model"] = checkpoint.unwrap(a[0])
            seen["before"] = {k: v.clone() for k, v in seen["model"].state_dict().items()}
            a = list(a)
            x = a[arg]
            a[arg] = [v * float("nan") for v in x] if isinstance(x, list) else x * float("nan")
        return real(*a, **kw)
    monkeypatch.setattr(module, "train_step", wrapped)
    return seen


def assert_stopped_before_update(seen: dict, run, ckpt_path, step: int, kept: int,
                                 forward_changes: dict = None) -> None:
    """`run()` must raise NonFiniteLoss naming `step` and the kept checkpoint, leave the
    weights (and EMA copies, queues, prototypes) as they were before that step, and leave a
    loadable checkpoint of step `kept`. BatchNorm running statistics are not compared: the
    forward pass that produced the loss updates them, and the stopped run is discarded.
    `forward_changes` maps a name to what the forward itself does to it (e.g. SwAV-style
    prototypes re-normalised at the start of a step), applied to the state before."""
    with pytest.raises(optim.NonFiniteLoss, match=rf"at step {step} .*\(step {kept}\) is kept"):
        run()
    assert seen["calls"] == step
    after = seen["model"].state_dict()
    for k, v in after.items():
        if "running_" not in k and "num_batches_tracked" not in k:
            before = (forward_changes or {}).get(k, lambda t: t)(seen["before"][k])
            assert torch.equal(before, v), k
    assert checkpoint.load(ckpt_path)["step"] == kept


def kill_and_resume(cmd: list, ckpt: str, last_step: int, timeout: float = 300) -> int:
    """Start `cmd` (a run that writes `ckpt` every step up to `last_step`), SIGKILL it once its
    checkpoint has reached a step drawn at random in the first half of the run, then run the
    same command again: it must resume and finish. Returns the step it was killed after."""
    env = ENV
    kill_after = random.Random().randint(1, last_step // 2)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    t0, step = time.time(), 0
    while step < kill_after:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() - t0 < timeout, f"no checkpoint of step {kill_after} in {timeout} s"
        time.sleep(0.005)
        if os.path.exists(ckpt):  # written atomically: a complete file or none
            step = checkpoint.load(ckpt)["step"]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it was killed"
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout, done.stdout[-2000:]
    return step


def python(script: str) -> list:
    return [sys.executable, os.path.join(ROOT, script)]


class Stop(Exception):
    """Raised by `stop_after_step`: stands for a run that dies after a checkpoint."""


def stop_after_step(monkeypatch, step: int, ckpt_name: str = "last.pt") -> None:
    """Make the `training.Loop` writing `ckpt_name` stop (raise `Stop`) right after step
    `step` is done, once; the next run in the same folder resumes from its checkpoint."""
    real = training.Loop.end_step

    def end_step(self, *a, **kw):
        real(self, *a, **kw)
        if self.step == step and os.path.basename(self.path) == ckpt_name:
            monkeypatch.setattr(training.Loop, "end_step", real)
            raise Stop(f"stopped after step {step}")
    monkeypatch.setattr(training.Loop, "end_step", end_step)


# Operations that make the host wait for the GPU: a value read back (`item`, `bool(t)`,
# `float(t)`), an output whose size depends on the data (`nonzero`, boolean-mask indexing,
# `masked_select`, `unique`, `repeat_interleave` without `output_size`), and a tensor built
# from Python data inside the step (`torch.tensor(...)`: a host-to-device copy every step).
_SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique_dim",
             "aten._unique2", "aten.unique_consecutive", "aten.lift_fresh"}
_SYNC_METHODS = {"tolist", "numpy", "cpu"}


class _HostSyncs(TorchDispatchMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        name = name if name.startswith("aten.") else "aten." + name
        if name in _SYNC_OPS:
            self.counts[name.split(".", 1)[1]] += 1
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])):
            self.counts["boolean-mask index"] += 1
        elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None:
            self.counts["repeat_interleave"] += 1
        return func(*args, **kwargs)


class _HostReads(TorchFunctionMode):
    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _SYNC_METHODS:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_host_syncs(fn, *args, **kwargs) -> collections.Counter:
    """Run `fn(*args, **kwargs)` on the CPU and count what would stall the host on a GPU:
    reads of a value (`_local_scalar_dense`: `.item()`, `bool(t)`), data-dependent shapes
    (`nonzero`, a boolean-mask index, `masked_select`, `unique`, `repeat_interleave` without
    `output_size`), tensors built from Python data (`lift_fresh`: `torch.tensor(...)`) and
    copies to the host (`tolist`, `numpy`, `cpu`). A training step is allowed exactly one:
    the non-finite check's `_local_scalar_dense`."""
    counts = collections.Counter()
    with _HostReads(counts), _HostSyncs(counts):
        fn(*args, **kwargs)
    return counts


# ---- GPU acceptance (tests marked `gpu`): one CUDA training step against the fp32 CPU step ----
# A contrastive or self-distillation loss at initialisation is a small difference of large
# terms, so a 16-bit step's gradient can sit at cosine 0.9 from the fp32 one on any device
# (measured on the CPU: SCE image, tiny ResNet, bf16 0.887, fp16 0.979). So the CUDA step in
# fp32 (TF32 off) must equal the CPU step tightly, and a 16-bit CUDA step may be at most
# `SLACK` times as far from fp32 as the same autocast dtype is on the CPU, or within the floor,
# and never beyond the cap (which catches a precision bug shared by both devices' autocast).
FP32_TOLERANCE = dict(loss=1e-4, cos=0.9999, norm=1e-3)
FLOOR = {"bf16": dict(loss=3e-2, cos=0.98, norm=0.05), "fp16": dict(loss=5e-3, cos=0.995, norm=0.02)}
CAP = {"bf16": dict(loss=6e-2, cos=0.8, norm=0.2), "fp16": dict(loss=1.5e-2, cos=0.95, norm=0.05)}
SLACK = 4.0


def to_device(x, device):
    """Move every tensor of a nested tuple / list / dict to `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x


def one_step(model, batch, step, device: str, amp_mode: str) -> tuple:
    """A copy of `model` and `batch` on `device`, one `step(model, batch, opt, amp)` with
    SGD at lr 1 (so that each trained parameter moves by minus its gradient). Returns the loss
    and the gradient as one float64 CPU vector. fp32 on CUDA runs with TF32 off."""
    model = copy.deepcopy(model).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)
    amp = optim.Amp(amp_mode, torch.device(device), init_scale=2.0 ** 10)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = amp_mode != "none"
    try:
        out = step(model, to_device(batch, device), opt, amp)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    grad = torch.cat([(b - p.detach()).double().flatten().cpu() for b, p in zip(before, params)])
    return float(out["loss"]), grad


def _distance(run, ref) -> dict:
    (loss, grad), (loss0, grad0) = run, ref
    return dict(loss=abs(loss - loss0) / max(abs(loss0), 1e-6),
                cos=float(torch.nn.functional.cosine_similarity(grad, grad0, dim=0)),
                norm=abs(float(grad.norm() / grad0.norm()) - 1))


def assert_gpu_step_agrees(model, batch, step, modes=("none", "bf16", "fp16"),
                           device="cuda") -> dict:
    """One step of `step(model, batch, opt, amp) -> {"loss": ...}` on `device` in each AMP
    mode against the fp32 CPU step on the same weights and batch: fp32 within
    `FP32_TOLERANCE`; bf16 / fp16 within `SLACK` times the CPU autocast's own distance from
    fp32, or within `FLOOR`, never beyond `CAP`. `step` must draw no random numbers of its own (randomness lives
    in `batch`), so that both devices compute the same thing. Returns {mode: distances}. (With
    `device="cpu"` the check runs against itself: how its own test runs.)"""
    ref = one_step(model, batch, step, "cpu", "none")
    assert ref[1].norm() > 0, "the CPU step produced no gradient"
    report = {}
    for mode in modes:
        d = report[mode] = _distance(one_step(model, batch, step, device, mode), ref)
        if mode == "none":
            tol = FP32_TOLERANCE
        else:
            cpu = _distance(one_step(model, batch, step, "cpu", mode), ref)
            gap = {k: cpu[k] if k != "cos" else 1 - cpu[k] for k in cpu}  # 0 is exact
            floor, cap = ({k: v if k != "cos" else 1 - v for k, v in t[mode].items()}
                          for t in (FLOOR, CAP))
            tol = {k: min(cap[k], max(floor[k], SLACK * gap[k])) for k in gap}
            tol["cos"] = 1 - tol["cos"]
        assert d["loss"] < tol["loss"], f"{mode}: loss off by {d['loss']:.2e} (relative)"
        assert d["cos"] > tol["cos"] and d["norm"] < tol["norm"], \
            f"{mode}: gradient cosine {d['cos']:.5f}, norm off by {d['norm']:.4f}: {tol}"
    return report


def cli_error(script, argv: list, capsys) -> str:
    """The one line `cli.run` prints on stderr for a user error in `argv` (exit status 2, no
    traceback), run in this process through `script`'s entry point."""
    with pytest.raises(SystemExit) as exit_:
        script.cli.run(script.main, script.Args, script.PRESETS, argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err, err[-2000:]
    return err.strip().splitlines()[-1]
