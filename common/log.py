"""Rank-0 logging: console lines, `log.jsonl` records, tqdm bars, throughput and `--bench`.

Values may be tensors: they are converted with `float()` only when a line is written, so a
training loop calls `Logger.log` at log steps and stays free of host syncs in between.
"""
import json
import os
import re
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


# Dense (no sparsity) peak tensor-core TFLOP/s per GPU for 16-bit inputs, from the vendors'
# data sheets; fp32 matmuls run as TF32 at half of it. A device not listed gets no MFU.
PEAK_TFLOPS_16BIT = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0,
                     "H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4,
                     "A100": 312.0, "L40S": 362.0, "L40": 181.0, "A10G": 70.0, "L4": 121.0,
                     "RTX 4090": 165.2}


def peak_tflops(device: torch.device, amp_dtype: Optional[torch.dtype],
                name: Optional[str] = None) -> Optional[float]:
    """The device's peak TFLOP/s for the AMP dtype (bf16/fp16; fp32 as TF32: half), or None
    on the CPU and on GPUs not in `PEAK_TFLOPS_16BIT`. `name`: the CUDA device name (read
    from the device when not given); a table key matches whole words of it."""
    if device.type != "cuda":
        return None
    name = name or torch.cuda.get_device_name(device)
    peak = next((v for k, v in sorted(PEAK_TFLOPS_16BIT.items(), key=lambda kv: -len(kv[0]))
                 if re.search(rf"(^|\W){re.escape(k)}($|\W)", name)), None)  # "L4" not "L40"
    if peak is None:
        return None
    return peak if amp_dtype in (torch.bfloat16, torch.float16) else peak / 2


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (forward and backward), counted by
    `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions, attention; 2 per
    multiply-add), on any device."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def process_cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU seconds of process `pid` (all its threads) from /proc, or None
    where /proc is not there (not Linux) or the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def per_core(samples: int, wall_s: float, cpu_s: Optional[float], workers: int) -> dict:
    """The loader's rates: samples/s, per worker (the main process counts as one worker when
    the loader has none), and per core (samples per CPU second of the main process and its
    workers together: what one core's worth of pipeline yields; None when not measured)."""
    rate = samples / max(wall_s, 1e-9)
    return {"data_samples_per_s": rate,
            "data_samples_per_s_per_worker": rate / max(workers, 1),
            "data_samples_per_s_per_core": samples / cpu_s if cpu_s else None,
            "data_workers": workers,
            "data_cores_busy": cpu_s / max(wall_s, 1e-9) if cpu_s is not None else None}


def loader_rates(loader: Iterable, batch_size: int, batches: int = 20) -> dict:
    """Time `batches` batches of `loader` after its first (which pays for worker start-up):
    `per_core` of them, the CPU time read from the main process (`time.process_time`, all
    its threads, so decoder threads count) and from each worker's /proc entry."""
    it, n = iter(loader), 0
    workers = getattr(loader, "num_workers", 0)
    if next(it, None) is None:
        return per_core(0, 1.0, None, workers)
    pids = [w.pid for w in getattr(it, "_workers", [])]  # DataLoader's worker processes

    def cpu() -> Optional[float]:
        each = [process_cpu_seconds(pid) for pid in pids]
        return None if None in each else time.process_time() + sum(each)
    c0, t0 = cpu(), time.perf_counter()
    for _ in range(batches):
        if next(it, None) is None:
            break
        n += batch_size  # (with drop_last every batch is full)
    wall, c1 = time.perf_counter() - t0, cpu()
    return per_core(n, wall, c1 - c0 if c0 is not None and c1 is not None else None, workers)


def bench(step_fn: Callable[[], object], batch_size: int, device: torch.device,
          steps: int = 20, warmup: int = 5, loader: Optional[Iterable] = None,
          loader_batches: int = 20, amp_dtype: Optional[torch.dtype] = None, **extra) -> dict:
    """Time `step_fn()` (one training step on fixed random tensors, as training runs it) and
    optionally the data pipeline alone (`loader`); print one JSON line on rank 0 and return it
    as a dict: samples/s, ms/step, FLOPs per sample (one step counted with `count_flops`),
    achieved TFLOP/s, MFU where the GPU's peak is known (`peak_tflops` for `amp_dtype`), peak
    memory, and the loader's samples/s: in all, per worker and per CPU core (`loader_rates`).

    Throughput and TFLOP/s are per process times the world size (global under torchrun).
    """
    for _ in range(warmup):
        step_fn()
    flops = count_flops(step_fn)
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
           "peak_mem_mb": peak_memory_mb(device),
           "gflop_per_sample": flops / batch_size / 1e9,
           "tflop_per_s": flops / (rates["ms_per_step"] / 1000) / 1e12 * dist.world(), **extra}
    peak = peak_tflops(device, amp_dtype)
    if peak is not None:
        out["mfu"] = out["tflop_per_s"] / dist.world() / peak
    if loader is not None:
        out.update(loader_rates(loader, batch_size, loader_batches))
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
