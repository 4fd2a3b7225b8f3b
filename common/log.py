"""Rank-0 logging: console lines, `log.jsonl` records, tqdm bars, throughput and `--bench`.

Values may be tensors: they are converted with `float()` only when a line is written, so a
training loop calls `Logger.log` at log steps and stays free of host syncs in between.
"""
import json
import os
import resource
import sys
import time
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from common import dist


def _scalar(v):
    if isinstance(v, torch.Tensor):
        return v.detach().float().item()
    return v


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Logger:
    """One console line and one JSON record per call, written by rank 0 only."""

    def __init__(self, output_dir: Optional[str], filename: str = "log.jsonl"):
        self.path = os.path.join(output_dir, filename) if output_dir else None
        if self.path and dist.is_main():
            os.makedirs(output_dir, exist_ok=True)

    def log(self, step: int, metrics: dict, echo: bool = True) -> dict:
        """Record `metrics` at global `step`; returns the record (plain Python numbers)."""
        rec = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
        if dist.is_main():
            if echo:
                line = " | ".join(f"{k} {_fmt(v)}" for k, v in rec.items())
                tqdm.write(line, file=sys.stdout)
            if self.path:
                with open(self.path, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
        return rec


def read_jsonl(path: str) -> list:
    """All records of a `log.jsonl` file, in order."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def progress(iterable: Iterable, total: Optional[int] = None, desc: Optional[str] = None,
             initial: int = 0):
    """A tqdm bar on rank 0 (silent elsewhere and when stderr is not a terminal under CI)."""
    disable = not dist.is_main() or os.environ.get("CI") == "true"
    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable,
                dynamic_ncols=True, leave=False)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocator peak on GPU, process max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput:
    """Samples per second between `reset()` and now (call `update(n)` after each step)."""

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = device
        self.reset()

    def reset(self) -> None:
        _sync(self.device)
        self.t0, self.samples, self.steps = time.perf_counter(), 0, 0

    def update(self, n: int) -> None:
        self.samples += n
        self.steps += 1

    def rates(self) -> dict:
        _sync(self.device)
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"samples_per_s": self.samples / dt,
                "ms_per_step": 1000 * dt / max(self.steps, 1)}


def bench(step_fn: Callable[[], object], batch_size: int, device: torch.device,
          steps: int = 20, warmup: int = 5, loader: Optional[Iterable] = None,
          loader_batches: int = 20, **extra) -> dict:
    """Time `step_fn()` (one training step on fixed random tensors) and optionally the data
    pipeline alone (`loader`); print one JSON line on rank 0 and return it as a dict.

    Throughput is per process times the world size (a global figure under torchrun).
    """
    for _ in range(warmup):
        step_fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    meter = Throughput(device)
    for _ in range(steps):
        step_fn()
        meter.update(batch_size)
    rates = meter.rates()
    out = {"bench": "train_step", "device": torch.cuda.get_device_name(device)
           if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
           "world": dist.world(), "batch_per_process": batch_size,
           "samples_per_s": rates["samples_per_s"] * dist.world(),
           "ms_per_step": rates["ms_per_step"],
           "peak_mem_mb": peak_memory_mb(device), **extra}
    if loader is not None:
        it, n, t0 = iter(loader), 0, None
        for i in range(loader_batches + 1):
            batch = next(it, None)
            if batch is None:
                break
            if i == 0:  # the first batch pays for worker start-up
                t0 = time.perf_counter()
                continue
            n += batch_size  # (with drop_last every batch is full)
        out["data_samples_per_s"] = n / max(time.perf_counter() - t0, 1e-9) if t0 else 0.0
    dist.print0(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                            for k, v in out.items()}))
    return out


def save_grid(rows: list, path: str, title: str, row_labels: list,
              col_labels: Optional[list] = None, scale: int = 1) -> None:
    """Write a labelled PNG (DESIGN: every picture reads without the code): `rows` of images,
    each a (K, 3, H, W) float tensor in [0, 1] with the same K, H, W, laid out as a grid with
    `title` on top, `col_labels` (K) above the columns and `row_labels` left of the rows, in
    Pillow's default font; `scale` enlarges the images (nearest) first. Rank 0 only."""
    if not dist.is_main():
        return
    if len(row_labels) != len(rows):
        raise ValueError(f"save_grid: {len(rows)} rows but {len(row_labels)} row labels")
    images = torch.cat([r.detach().float().cpu() for r in rows])
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    k, (h, w), pad = len(rows[0]), images.shape[-2:], 2
    grid = torchvision.utils.make_grid(images.clamp(0, 1), nrow=k, padding=pad, pad_value=1.0)
    grid = Image.fromarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy())
    try:  # Pillow's default font, scalable where Pillow has FreeType
        font = ImageFont.load_default(size=13)
    except (TypeError, ImportError, OSError):
        font = ImageFont.load_default()
    line = 16
    left = 8 + max(ImageDraw.Draw(grid).textlength(t, font=font) for t in row_labels)
    top = line + 6 + (line if col_labels else 0)
    canvas = Image.new("RGB", (int(left) + grid.width, top + grid.height), "white")
    canvas.paste(grid, (int(left), top))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title, fill="black", font=font)
    for j, text in enumerate(col_labels or []):
        draw.text((int(left) + pad + j * (w + pad), line + 4), text, fill="black", font=font)
    for i, text in enumerate(row_labels):
        draw.text((4, top + pad + i * (h + pad) + h // 2 - line // 2), text, fill="black",
                  font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
