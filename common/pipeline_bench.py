"""Data-pipeline benchmark: clips per second per CPU core of each video method's training
pipeline, on K400-like H.264 files it writes itself, and how many cores keep one GPU fed.

    python -m common.pipeline_bench                      # every video method, default files
    python -m common.pipeline_bench --methods sigma --rounds 5 --gpu-clips-per-s 200
    python -m common.pipeline_bench --model-step         # also one CPU model step per method

Run it pinned to one core (`taskset -c 1 python -m common.pipeline_bench`): it runs in one
process with one torch thread and reports clips/s of that process, i.e. per core. A "clip" is
one training sample as the method's loader yields it (SIGMA: one 16-frame clip and its mask;
SCE video: a video's two clips; T-CoRe: a sandwich triplet with its 2 + L + 4 crops;
COMEDIAN stage 1: one second's two 2-frame views). Each pipeline is timed as its `Dataset`'s
`__getitem__` for a fixed list of (epoch, index) keys plus the default collate (what one loader
worker does), the median over `--rounds` rounds that alternate between methods and files,
after one warm-up pass (which fills the per-process frame-table cache, as a long run does).

Files: `--files` H.264 clips of `--seconds` s at 25 fps, GOP 250 (one keyframe per 10 s, as
Kinetics' x264 encodes), crf 23, yuv420p, in two sizes (320 x 240 and 568 x 320, short side
320), of moving smooth texture with sensor-like noise; written once with PyAV under
`common.synthetic.cache_root()/pipeline-bench-*` (or `--root`).

The cores one GPU needs: ceil(gpu clips/s / clips/s per core), printed per method for
`--gpu-clips-per-s` (the GPU's training step rate in clips/s, measured with `--bench` on it).
The authors' pipelines (decord and their dataset code) are compared only where importable
beside this project (`--official-root`); otherwise the line says why it is skipped.
"""
import argparse
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import synthetic, video

SIZES = ((320, 240), (568, 320))  # (W, H): the K400 320 x 240 and the short side 320 encodes
FPS, GOP, CRF = 25, 250, 23
METHODS = ("sigma", "sce_video", "tcore", "comedian")


def k400_like_frames(w: int, h: int, n: int, seed: int) -> np.ndarray:
    """uint8 (n, h, w, 3): a smooth colour texture panning at a few px per frame, two moving
    bright blobs and per-frame noise (so the encoder spends bits as on camera footage)."""
    rng = np.random.default_rng(seed)
    gh, gw = h // 16 + 4, w // 16 + 4 + n // 4
    coarse = rng.uniform(0, 255, (gh, gw, 3)).astype(np.float32)
    tex = torch.nn.functional.interpolate(torch.from_numpy(coarse).permute(2, 0, 1)[None],
                                          scale_factor=16, mode="bicubic")[0].permute(1, 2, 0)
    tex = tex.numpy()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.empty((n, h, w, 3), np.uint8)
    for t in range(n):
        x0 = int(t * 4) % (tex.shape[1] - w)
        img = tex[8:8 + h, x0:x0 + w].copy()
        for k in range(2):
            cx = w * (0.5 + 0.35 * math.sin(0.05 * t + k * 2.0))
            cy = h * (0.5 + 0.3 * math.cos(0.07 * t + k))
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (h / 10) ** 2))
            img += blob[..., None] * np.array([120, 80 - 60 * k, 40 + 60 * k], np.float32)
        img += rng.normal(0, 6, img.shape).astype(np.float32)
        out[t] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def bench_files(root=None, files: int = 4, seconds: float = 10.0) -> dict:
    """{(W, H): [paths]}: `files` K400-like H.264 mp4 files per size (written once, atomically
    per file, then reused)."""
    root = Path(root) if root else synthetic.cache_root() / f"pipeline-bench-{files}x{seconds:g}s"
    out = {}
    for w, h in SIZES:
        out[(w, h)] = []
        for i in range(files):
            path = root / f"{w}x{h}" / f"clip{i:02d}.mp4"
            if not path.exists():
                tmp = path.with_name(f".{path.stem}.{os.getpid()}.mp4")
                video.write_video(tmp, k400_like_frames(w, h, round(seconds * FPS), 1000 * i + w),
                                  fps=FPS, gop=GOP, crf=CRF)
                os.replace(tmp, path)
            out[(w, h)].append(str(path))
    return out


def pipeline(method: str, paths: list):
    """(what a sample is, a callable key -> sample) of `method`'s training dataset at its
    paper settings (its `Args()` defaults) over `paths`; None when the method file cannot be
    imported (this module is a tool: it imports the method files only when run)."""
    try:
        mod = importlib.import_module(method)
    except ImportError as e:
        print(f"{method}: skipped, cannot import it ({e})")
        return None
    from common import data
    if method == "sigma":
        ds = mod.PretrainClips([data.VideoRecord(p, 0) for p in paths], mod.Args())
        return "16x224 clip + tube mask", ds.__getitem__
    if method == "sce_video":
        a = mod.Args()
        ds = mod.PretrainClips([data.VideoRecord(p, 0) for p in paths], a, a.seed)
        return f"2 clips {a.num_frames}x{a.crop_size}", ds.__getitem__
    if method == "tcore":
        a = mod.Args()
        ds = mod.SandwichClips(list(paths), a)
        return f"3 frames, {2 + a.local_crops} crops + 4 aux", ds.__getitem__
    if method == "comedian":
        from common import soccernet
        halves = [soccernet.Half(f"g{i}", 1, p, video.video_meta(p).duration, [])
                  for i, p in enumerate(paths)]
        ds = mod.SpatialClips(halves, mod.Args(), 0)
        return "stage 1: 2 views 2x224", ds.__getitem__
    raise ValueError(f"pipeline: unknown method {method!r}")


def keys(method: str, n_files: int, clips: int, seconds: float) -> list:
    """`clips` dataset keys (epoch, index): files in turn, a new epoch (new draws) each pass.
    COMEDIAN's items are the seconds of the halves: spread over files and seconds."""
    per = int(seconds) if method == "comedian" else 1
    return [(k // (n_files * per), (k * 7) % (n_files * per)) for k in range(clips)]


def time_pipeline(get, ks: list) -> float:
    """Clips/s of one process: `get(k)` for each key, then the loader's default collate."""
    t = time.perf_counter()
    torch.utils.data.default_collate([get(k) for k in ks])
    return len(ks) / (time.perf_counter() - t)


def cores_needed(gpu_clips_per_s: float, clips_per_s_per_core: float) -> int:
    """Cores (one loader worker each) whose pipelines together reach the GPU's step rate."""
    if clips_per_s_per_core <= 0:
        raise ValueError("cores_needed: the per-core rate must be positive")
    return max(1, math.ceil(gpu_clips_per_s / clips_per_s_per_core - 1e-9))


def official_note(root) -> str:
    """Why the authors' pipelines are not compared here (decord and their code are not
    dependencies of this project); '' when both are importable."""
    if importlib.util.find_spec("decord") is None:
        return "decord is not installed (pip install decord; not a project dependency)"
    if not root or not os.path.isdir(root):
        return "no --official-root (a checkout of the authors' code) given"
    return ("comparing with the authors' dataset classes is not wired in: time them with "
            "their own loader on these files")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m common.pipeline_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    p.add_argument("--files", type=int, default=4, help="files per size")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each file")
    p.add_argument("--clips", type=int, default=16, help="clips per timed round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds (median)")
    p.add_argument("--gpu-clips-per-s", type=float, default=200.0,
                   help="the GPU's training rate in clips/s (e.g. from `--bench` on it)")
    p.add_argument("--root", default=None, help="where the files are written")
    p.add_argument("--official-root", default=None, help="a checkout of the authors' code")
    p.add_argument("--json", action="store_true", help="also print one JSON line per row")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    methods = [m for m in a.methods.split(",") if m]
    files = bench_files(a.root, a.files, a.seconds)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(f"# one process, 1 torch thread, {affinity} core(s) allowed"
          + ("" if affinity == 1 else " (pin it: taskset -c N)")
          + f"; {a.files} K400-like H.264 files per size ({a.seconds:g} s, {FPS} fps, GOP {GOP})")
    jobs = []
    for m in methods:
        for size, paths in files.items():
            got = pipeline(m, paths)
            if got is None:
                break
            what, get = got
            ks = keys(m, len(paths), a.clips, a.seconds)
            time_pipeline(get, ks)  # warm-up: frame tables, allocator
            jobs.append((m, size, what, get, ks, []))
    for r in range(a.rounds):  # alternate the order between rounds
        for m, size, what, get, ks, rates in (jobs if r % 2 == 0 else jobs[::-1]):
            rates.append(time_pipeline(get, ks))
    print(f"| method | sample | file | clips/s per core | ms per clip | cores for "
          f"{a.gpu_clips_per_s:g} clips/s |")
    print("|---|---|---|---|---|---|")
    out = {}
    for m, (w, h), what, _, _, rates in jobs:
        rate = statistics.median(rates)
        row = {"method": m, "sample": what, "file": f"{w}x{h}", "clips_per_s_per_core": rate,
               "ms_per_clip": 1000 / rate, "rounds": [round(x, 2) for x in rates],
               "cores_for_gpu": cores_needed(a.gpu_clips_per_s, rate),
               "gpu_clips_per_s": a.gpu_clips_per_s}
        out[(m, f"{w}x{h}")] = row
        print(f"| {m} | {what} | {w}x{h} | {rate:.2f} | {1000 / rate:.1f} | "
              f"{row['cores_for_gpu']} |")
        if a.json:
            print(json.dumps(row))
    note = official_note(a.official_root)
    print(f"authors' pipelines: skipped, {note}" if note else "authors' pipelines: compared")
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
