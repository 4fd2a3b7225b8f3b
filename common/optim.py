"""Optimisation helpers: per-step schedules, parameter groups, LARS, EMA, layer decay, AMP.

Schedules are plain functions of the global step; the training loop writes their values into
the optimiser each step with `set_lr_wd`. Parameter groups carry the keys "apply_wd" (bool),
"param_names" and, for layer decay, "lr_scale" and "layer_id".
"""
import contextlib
import math
import re
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from common import cli, dist
from common.checkpoint import unwrap

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "time_embed", "register_tokens")
EMBED_NAMES = ("patch_embed",) + NO_DECAY_NAMES  # layer 0 under layer-wise decay
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def cosine_schedule(step: int, total_steps: int, peak: float, warmup_steps: int = 0,
                    start: float = 0.0, final: float = 0.0) -> float:
    """Linear warmup `start` -> `peak` over `warmup_steps`, then half-cosine `peak` -> `final`.

    Step 0 gives `start`, step `warmup_steps` gives `peak`, steps >= `total_steps` give `final`.
    Increasing schedules work too (EMA momentum: `peak=0.99, start=0.99, final=1.0`).
    """
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps})")
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    if step >= total_steps:
        return final
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr_wd(optimizer: torch.optim.Optimizer, lr: float, wd: Optional[float] = None) -> None:
    """Set each group's lr to `lr * group["lr_scale"]` (default 1) and, when `wd` is given,
    the weight decay of the groups that apply it ("apply_wd", else those with non-zero wd)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if wd is not None and group.get("apply_wd", group.get("weight_decay", 0.0) != 0.0):
            group["weight_decay"] = wd


def _trainable(model: nn.Module, no_decay: Optional[Callable], extra_no_decay_names: Iterable[str]):
    """Yield (name, param, apply_wd) for every parameter that requires grad."""
    names = NO_DECAY_NAMES + tuple(extra_no_decay_names)
    if no_decay is None:
        def no_decay(name, p):  # biases, norm weights, tokens and position tables
            return p.ndim <= 1 or any(n in name for n in names)
    for name, p in unwrap(model).named_parameters():
        if p.requires_grad:
            yield name, p, not no_decay(name, p)


def _add(groups: dict, key, name: str, p: nn.Parameter, **options) -> None:
    group = groups.setdefault(key, {"params": [], "param_names": [], **options})
    group["params"].append(p)
    group["param_names"].append(name)


def param_groups(model: nn.Module, weight_decay: float, no_decay: Optional[Callable] = None,
                 extra_no_decay_names: Iterable[str] = ()) -> list:
    """Two groups: with `weight_decay`, and without it for 1-D params (biases, norms) and
    token / position tables. `no_decay(name, param) -> bool` replaces that rule. Frozen
    params are skipped and empty groups dropped."""
    groups = {}
    for name, p, apply_wd in _trainable(model, no_decay, extra_no_decay_names):
        _add(groups, apply_wd, name, p, weight_decay=weight_decay if apply_wd else 0.0,
             apply_wd=apply_wd)
    return [groups[k] for k in (True, False) if k in groups]


def layer_id(name: str, num_layers: int) -> int:
    """ViT depth of a parameter: 0 for embeddings/tokens, i+1 in `blocks.i`, else num_layers+1."""
    match = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    if match:
        if int(match.group(1)) >= num_layers:
            raise ValueError(f"parameter {name} lies beyond num_layers={num_layers}")
        return int(match.group(1)) + 1
    return 0 if any(n in name for n in EMBED_NAMES) else num_layers + 1


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float, num_layers: int,
                       no_decay: Optional[Callable] = None,
                       extra_no_decay_names: Iterable[str] = ()) -> list:
    """Fine-tuning groups (BEiT/MAE style): `lr_scale = layer_decay ** (num_layers + 1 - id)`
    with `id = layer_id(name)`, split by the no-decay rule of `param_groups`."""
    groups = {}
    for name, p, apply_wd in _trainable(model, no_decay, extra_no_decay_names):
        lid = layer_id(name, num_layers)
        _add(groups, (lid, apply_wd), name, p, weight_decay=weight_decay if apply_wd else 0.0,
             apply_wd=apply_wd, lr_scale=layer_decay ** (num_layers + 1 - lid), layer_id=lid)
    return [groups[k] for k in sorted(groups)]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and the LARS trust ratio (BYOL/SimCLR style, as used by SCE).

    For each parameter p with gradient g:
        if not (exclude_1d and p.ndim <= 1):             # biases and norms skip both steps
            g     = g + weight_decay * p
            trust = eta * ||p|| / ||g||   if ||p|| > 0 and ||g|| > 0   else 1
            g     = trust * g
        mu = momentum * mu + g                            # mu starts at 0
        p  = p - lr * mu
    with eta = `trust_coefficient`. Every option can be set per parameter group.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, exclude_1d: bool = True):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, exclude_1d=exclude_1d)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, in a few `torch._foreach_*` kernels
        per group and dtype (not ~10 per parameter): on the CPU the same bits as the loop in
        the class docstring, on CUDA the norms may differ in the last bit (their reduction
        order)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_kind = {}  # (device, dtype) -> params, so each foreach list is homogeneous
            for p in group["params"]:
                if p.grad is not None:
                    by_kind.setdefault((p.device, p.dtype), []).append(p)
            for params in by_kind.values():
                self._update(group, params)
        return loss

    def _update(self, group: dict, params: list) -> None:
        grads = [p.grad for p in params]
        adapt = [i for i, p in enumerate(params) if not (group["exclude_1d"] and p.ndim <= 1)]
        if adapt:
            ps = [params[i] for i in adapt]
            gs = torch._foreach_add([grads[i] for i in adapt], ps, alpha=group["weight_decay"])
            p_norm = torch.stack(torch._foreach_norm(ps))
            g_norm = torch.stack(torch._foreach_norm(gs))
            ok = (p_norm > 0) & (g_norm > 0)
            trust = torch.where(ok, group["trust_coefficient"] * p_norm / g_norm, 1.0)
            torch._foreach_mul_(gs, list(trust.unbind()))
            for i, g in zip(adapt, gs):
                grads[i] = g
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        torch._foreach_mul_(bufs, group["momentum"])  # mu = momentum * mu + g
        torch._foreach_add_(bufs, grads)
        torch._foreach_add_(params, bufs, alpha=-group["lr"])  # p = p - lr * mu


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float,
               copy_buffers: bool = True) -> None:
    """teacher_p = m * teacher_p + (1 - m) * student_p, matching parameters by name.

    The student may hold more parameters than the teacher (e.g. a predictor); wrappers (DDP,
    torch.compile) are stripped. Buffers (BN statistics) are copied when `copy_buffers`.
    """
    teacher, student = unwrap(teacher), unwrap(student)
    s_params = dict(student.named_parameters())
    t_names, t_params = zip(*teacher.named_parameters())
    missing = [n for n in t_names if n not in s_params]
    if missing:
        raise ValueError(f"ema_update: teacher parameters absent from the student: {missing[:5]}")
    s_list = [s_params[n] for n in t_names]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_list, alpha=1.0 - momentum)
    if copy_buffers:
        s_buffers = dict(student.named_buffers())
        for name, buf in teacher.named_buffers():
            buf.copy_(s_buffers[name])


@torch.no_grad()
def enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, flag: str = "--queue-size",
            per_step: str = "") -> None:
    """FIFO update of a memory bank of keys (MoCo, SCE Alg. A.1 l. 50-52): the keys of every
    rank (`dist.all_gather`, (n, D) in rank order) overwrite the n oldest rows of `queue`
    (M, D), from row `ptr` (a 0-d int64 buffer, advanced in place; no host sync). Raises
    cli.InputError naming `flag` (and `per_step`, what n is made of) when M is not a multiple
    of n, which the official queues require."""
    keys = dist.all_gather(keys)
    n, m = len(keys), len(queue)
    if m % n:
        raise cli.InputError(f"{flag} {m} must be a multiple of the keys enqueued per step "
                             f"({n}{' = ' + per_step if per_step else ''})")
    rows = (ptr + torch.arange(n, device=keys.device)) % m
    queue.index_copy_(0, rows, keys.to(queue.dtype))
    ptr.add_(n).remainder_(m)


def resolve_amp(mode: str, device: torch.device) -> str:
    """"auto" -> "bf16" on CUDA and "none" elsewhere; other modes are checked and returned."""
    if mode == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "none"
    if mode not in AMP_DTYPES:
        raise ValueError(f"--amp must be one of auto, {', '.join(AMP_DTYPES)}; got {mode!r}")
    return mode


class NonFiniteLoss(FloatingPointError):
    """A loss was NaN or infinite: raised before its backward pass, so no update from it
    reaches the weights."""


class Amp:
    """One code path for bf16 / fp16 (with a GradScaler) / fp32 training.

        with amp.autocast():
            loss = model(x)
        grad_norm = amp.step(loss, optimizer, clip_grad=1.0)

    `step` checks the loss every step, before backward (one host sync per step, as DINO and
    MAE do): a non-finite loss on any rank raises `NonFiniteLoss` on every rank. `context` is
    appended to its message; `common.training.Loop` keeps it at "step N ... last good
    checkpoint ...".
    """

    def __init__(self, mode: str, device: torch.device, init_scale: float = 2.0 ** 16):
        self.device = torch.device(device)
        self.mode = resolve_amp(mode, self.device)
        self.dtype = AMP_DTYPES[self.mode]
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=init_scale,
                                           enabled=self.mode == "fp16")
        self.context, self.accum, self.stepped = "", (0, 1), False

    def check_finite(self, loss: torch.Tensor) -> None:
        """Raise `NonFiniteLoss` when `loss` is NaN/inf on this or any other rank."""
        bad = (~torch.isfinite(loss.detach().float())).any().float().reshape(1)
        ranks = dist.all_gather(bad)  # (world,): one host sync per step
        if ranks.any():
            where = f" {self.context}" if self.context else ""
            raise NonFiniteLoss(f"non-finite loss on rank {ranks.nonzero().flatten().tolist()}"
                                f"{where}: stopping before the update, no step from it was "
                                f"applied")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
             clip_grad: Optional[float] = None, params: Optional[Iterable] = None):
        """Backward, optional grad clipping (on unscaled grads), step, zero_grad.

        Returns the total grad norm before clipping (a tensor; use `clip_grad=math.inf` to only
        measure it), or None without clipping. Raises `NonFiniteLoss` before backward when the
        loss is not finite (`check_finite`); with fp16 a step whose grads overflow is skipped.

        Gradient accumulation (MAE's `accum_iter`): while `accum` is (i, n) with n > 1 (the
        loop keeps it: micro-batch i of n), the loss is divided by n and only micro-batch n - 1
        clips and steps; the others return None after their backward. `stepped` tells whether
        the last call stepped the optimiser (EMA updates follow the optimiser steps).
        """
        self.check_finite(loss)
        i, n = self.accum
        self.scaler.scale(loss / n if n > 1 else loss).backward()
        self.stepped = i == n - 1
        if not self.stepped:
            return None
        norm = None
        if clip_grad is not None:
            self.scaler.unscale_(optimizer)
            if params is None:
                params = [p for g in optimizer.param_groups for p in g["params"]]
            norm = nn.utils.clip_grad_norm_(params, clip_grad)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore the fp16 loss scale. A checkpoint written with bf16 or fp32 holds no scale
        (an empty dict): an fp16 run resumed from it starts a fresh scaler; a scale is
        ignored by a bf16 / fp32 run."""
        if self.scaler.is_enabled() and not state:
            return
        self.scaler.load_state_dict(state)
