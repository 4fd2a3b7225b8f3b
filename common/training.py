"""The bookkeeping of a training loop keyed by the global step, in one place (README: "What
is guaranteed, and tested").

A method's loop keeps only its own lines (its schedules, its `train_step`, its EMA or queue):

    loop = training.Loop(loader, args.epochs, {"model": sce, "optimizer": opt}, args,
                         logger, amp, max_steps=args.max_steps)
    loop.resume(args.resume)              # <output_dir>/last.pt when it exists
    for views, _, _ in loop:              # sets the sampler's epoch and mid-epoch start
        lr = optim.cosine_schedule(loop.step, loop.total_steps, peak)
        out = train_step(...)             # amp.step raises NonFiniteLoss before the update
        loop.end_step(out, {"train/lr": lr})  # logs every log_every, checkpoints every ckpt_every
    loop.check_replicas(sce)

With `accum_iter=n` (MAE's gradient accumulation, `--accum-iter`) a step is n micro-batches:
the loop yields each, `amp.step` divides the loss by n and steps the optimiser after the n-th
(the loop tells it which is which), and `end_step` counts the step then; the schedules, the
checkpoints and the resume stay keyed by optimiser steps.

What it guarantees:
- resume: the checkpoint holds every entry of `state` (anything with `state_dict` /
  `load_state_dict`), the AMP scaler, the step, `args`, every rank's RNG states and `source`
  (what the loop started from, e.g. the pretrained weights of a fine-tuning run). Loaders
  draw from their own generators (`data.make_loader`) and per-sample randomness from
  (seed, epoch, index), so a run stopped at any checkpoint and resumed is, on CPU, bitwise
  the uninterrupted run. A checkpoint whose `source` differs is refused (`CheckpointError`).
- a non-finite loss stops the run before its update (`optim.Amp.step` checks every step;
  the loop keeps `amp.context` naming the step and the last good checkpoint); before every
  save the loss and the weights are checked too (a finite loss can still bring an infinite
  gradient), so the checkpoint on disk is always a good one.
- logging on rank 0 every `log_every` steps and at the last step: the rank-mean loss, the
  given metrics, the epoch, skipped samples (`SafeDataset.skipped`) and throughput.
"""
import os
from typing import Optional

import torch
from torch import nn

from common import checkpoint, cli, dist, log, optim


class Loop:
    """Iterate over `loader` from the current step to `min(epochs x steps per epoch,
    max_steps)`; see the module docstring. `state` maps checkpoint entries to the objects
    saved under them; `args` (the script's `Args`, saved too) gives `output_dir`,
    `log_every` and `ckpt_every`. Attributes: `step` (global steps done),
    `epoch`, `steps_per_epoch`, `total_steps` (for schedules), `last_step`, `path` (the
    checkpoint file, `<output_dir>/<ckpt_name>`).

    `source` names what the loop starts from (e.g. `checkpoint.fingerprint` of the weights a
    fine-tuning starts from); `batch_flag` and `resume_flag` are the script's flags that the
    error messages name (`resume_flag=None`: the script has none for this loop).
    Raises `cli.InputError` when the loader yields no full batch, and
    `checkpoint.CheckpointError` from `resume` on a checkpoint of another source.
    """

    def __init__(self, loader, epochs: int, state: dict, args, logger: log.Logger,
                 amp: optim.Amp, *, max_steps: int = 0, ckpt_name: str = "last.pt",
                 source: Optional[str] = None, desc: str = "epoch", prefix: str = "train",
                 batch_flag: str = "--batch-size", resume_flag: Optional[str] = "--resume",
                 accum_iter: int = 1):
        self.loader, self.sampler = loader, loader.sampler
        self.sampler.set_epoch(0)
        if accum_iter < 1:
            raise cli.InputError(f"--accum-iter must be at least 1, got {accum_iter}")
        self.accum_iter = accum_iter
        self.steps_per_epoch = len(loader) // accum_iter  # optimiser steps
        if self.steps_per_epoch == 0:
            times, flags = (f" x --accum-iter {accum_iter}", f"{batch_flag} or --accum-iter") \
                if accum_iter > 1 else ("", batch_flag)
            raise cli.InputError(f"{len(self.sampler)} samples per process are fewer than one "
                                 f"batch of {loader.batch_size}{times}: lower {flags}")
        self.total_steps = epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, max_steps or self.total_steps)
        self.path = os.path.join(args.output_dir, ckpt_name)
        self.logger, self.amp, self.args, self.state = logger, amp, args, state
        self.log_every, self.ckpt_every = args.log_every, args.ckpt_every
        self.source, self.desc, self.prefix = source, desc, prefix
        self.resume_flag = resume_flag
        self.step, self.epoch, self.saved_step, self._micro = 0, 0, None, (0, 1)
        self.meter = log.Throughput(amp.device)

    # ---- resume and save ----
    def resume(self, path: Optional[str] = None) -> int:
        """Restore from `path` (explicit: any source accepted) or from `self.path` when it
        exists (its `source` must match). Returns the step (0 when there is nothing)."""
        explicit = bool(path)
        path = path or (self.path if os.path.isfile(self.path) else None)
        if path is None:
            return 0
        ckpt = checkpoint.load(path)
        if ckpt.get("accum_iter", 1) != self.accum_iter:  # steps would mean other batches
            raise checkpoint.CheckpointError(
                f"{path} was written with --accum-iter {ckpt.get('accum_iter', 1)}, this run "
                f"has {self.accum_iter}: resume with the same value, or a new --output-dir")
        if not explicit and ckpt.get("source") != self.source:
            hint = (f", or pass {self.resume_flag} {path} to continue it anyway"
                    if self.resume_flag else "")
            raise checkpoint.CheckpointError(
                f"{path} continues a run started from {ckpt.get('source')!r}, not from "
                f"{self.source!r}: choose a new --output-dir (or delete the file){hint}")
        checkpoint.load_training(path, self.state, self.amp, ckpt)
        self.step = self.saved_step = int(ckpt["step"])
        dist.print0(f"resumed from {path} at step {self.step}")
        return self.step

    def save(self) -> None:
        """Write the checkpoint (a collective under DDP: call on every rank)."""
        checkpoint.save_training(self.path, self.state, self.amp, self.step, self.args,
                                 source=self.source, accum_iter=self.accum_iter)
        self.saved_step = self.step

    # ---- the loop ----
    def _where(self, step: int) -> str:
        kept = (f"the last good checkpoint {self.path} (step {self.saved_step}) is kept"
                if self.saved_step is not None else "no checkpoint was written yet")
        return f"at step {step} in {os.path.dirname(self.path) or '.'}; {kept}"

    def __iter__(self):
        """Yields the batches (with --accum-iter n, the n micro-batches of each step, `amp`
        told which one is which); the body must call `end_step` after each."""
        n = self.accum_iter
        try:
            while self.step < self.last_step:
                self.epoch = self.step // self.steps_per_epoch
                self.sampler.set_epoch(self.epoch)
                done = self.step % self.steps_per_epoch
                self.sampler.set_start(done * n * self.loader.batch_size)
                batches = log.progress(self.loader, desc=f"{self.desc} {self.epoch}")
                for j, batch in enumerate(batches):
                    self.amp.context, before = self._where(self.step + 1), self.step
                    self.amp.accum = self._micro = (j % n, n)
                    yield batch
                    if self.step != before + (j % n == n - 1):
                        raise RuntimeError("training.Loop: call end_step() once per batch")
                    if self.step == self.last_step or self.epoch_end:
                        break  # (a last incomplete accumulation group is dropped, as in MAE)
        finally:  # also when the caller leaves the loop early: later amp.step calls step
            self.amp.accum = (0, 1)

    @property
    def epoch_end(self) -> bool:
        """True right after the step that ends an epoch (for per-epoch evaluations)."""
        return self._micro[0] == self._micro[1] - 1 and self.step % self.steps_per_epoch == 0

    def end_step(self, out: dict, metrics: Optional[dict] = None) -> None:
        """Count the step; log `out` (its "loss" averaged over ranks) and `metrics` at log
        steps; check the loss and save at checkpoint steps. Values may be tensors: they are
        read on the host only at log and checkpoint steps. With --accum-iter n it counts a
        step after the n-th micro-batch only."""
        i, n = self._micro
        if i < n - 1:
            return
        self.step += 1
        self.meter.update(self.loader.batch_size * n * dist.world())
        logging = self.step % self.log_every == 0 or self.step == self.last_step
        saving = self.step % self.ckpt_every == 0 or self.step == self.last_step
        if not (logging or saving):
            return
        loss = dist.all_reduce(out["loss"].detach().float().clone(), "mean")
        if not torch.isfinite(loss):  # train_step checked it; a method may skip amp.step
            raise optim.NonFiniteLoss(f"non-finite loss {self._where(self.step)}")
        if logging:
            p = self.prefix
            skipped = getattr(self.loader.dataset, "skipped", 0)
            self.logger.log(self.step, {"epoch": self.epoch, f"{p}/loss": loss,
                                        **{f"{p}/{k}": v for k, v in out.items() if k != "loss"},
                                        **(metrics or {}), f"{p}/skipped": skipped,
                                        **self.meter.rates()})
            self.meter.reset()
        if saving:
            if not self._finite_weights():  # a finite loss can still bring an inf gradient
                where = self._where(self.step)
                raise optim.NonFiniteLoss(f"non-finite weights after the update {where}")
            self.save()

    def _finite_weights(self) -> bool:
        """Every floating tensor of the modules in `state` is finite, on every rank."""
        tensors = [t for obj in self.state.values() if isinstance(obj, nn.Module)
                   for t in obj.state_dict().values() if t.is_floating_point()]
        bad = sum((~torch.isfinite(t)).sum() for t in tensors) if tensors else \
            torch.zeros((), device=self.amp.device)
        return dist.all_reduce(bad.float().reshape(1), "sum").item() == 0

    def check_replicas(self, *modules: nn.Module, buffers: tuple = ()) -> Optional[float]:
        """Under DDP, log the largest difference between ranks of the sums of every
        parameter (and of `buffers`): 0.0 when the replicas are equal. None alone."""
        if not dist.is_dist():
            return None
        tensors = [p for m in modules for p in m.parameters()] + list(buffers)
        sums = torch.stack([t.detach().double().sum() for t in tensors])
        spread = (dist.all_gather(sums[None]) - sums).abs().max()
        return self.logger.log(self.step, {"ddp/max_replica_diff": spread})["ddp/max_replica_diff"]

