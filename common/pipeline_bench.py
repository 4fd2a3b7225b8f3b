"""Data-pipeline benchmark: clips per second per CPU core of each video method's training
pipeline, on K400-like H.264 files it writes itself, and how many cores keep one GPU fed.

    python -m common.pipeline_bench                      # every video method, default files
    python -m common.pipeline_bench --methods sigma --rounds 5 --gpu-clips-per-s 200

Run it pinned to one core (`taskset -c 1 python -m common.pipeline_bench`): it runs in one
process with one torch thread and reports clips/s of that process, i.e. per core. A "clip" is
one training sample as the method's loader yields it (SIGMA: one 16-frame clip and its mask;
SCE video: a video's two clips; T-CoRe: a sandwich triplet with its 2 + L + 4 crops;
COMEDIAN stage 1: one second's two 2-frame views). Each pipeline is timed as its `Dataset`'s
`__getitem__` for a fixed list of (epoch, index) keys plus the default collate (what one loader
worker does), the median over `--rounds` rounds that alternate between methods and files,
after one warm-up pass (which fills the per-process frame-table cache, as a long run does).
Seconds are the process's CPU time by default (`--clock cpu`; `--clock wall` for elapsed time):
on a core that other jobs share, wall time counts their turns too.

Files: `--files` H.264 clips of `--seconds` s at 25 fps, GOP 250 (one keyframe per 10 s, as
Kinetics' x264 encodes), crf 23, yuv420p, in two sizes (320 x 240 and 568 x 320, short side
320), of moving smooth texture with sensor-like noise; written once with PyAV under
`common.synthetic.cache_root()/pipeline-bench-*` (or `--root`).

The cores one GPU needs: ceil(gpu clips/s / clips/s per core), printed per method for
`--gpu-clips-per-s` (the GPU's training step rate in clips/s, measured with `--bench` on it).

`--cold-tables` adds rows where the per-process frame-table cache is emptied before every sample
(a K400 epoch visits about 240,000 files: at that scale nearly every read is a miss);
`--without-skipping` adds rows that decode every frame (`common.video` otherwise leaves the
unwanted non-reference H.264 pictures undecoded).

`--model-step` adds the model step alone: each method's training step (forward, backward and
optimiser step, fp32, this process's one thread) at its paper settings on a batch of
`--step-batch` of its own samples, median of `--step-repeats` steps after a warm-up one.

The authors' pipelines: `--official-root DIR` holds a checkout of an authors' repository per
method (`DIR/sigma`: SIGMA's official repository, built on VideoMAE). Where decord and that
code import (`PYTHONPATH=/somewhere/with/decord:...`; neither is a dependency of this project),
their per-sample pretraining pipeline (SIGMA: `kinetics.VideoMAE` with decord,
`DataAugmentationForVideoMAE`, as `build_pretraining_dataset` builds it) is timed on the same
files and keys, in the same alternating rounds, and given the same draws as ours (its start
frame and crop are set to ours; each of its random draws otherwise stays its own), so both
sides decode the same frames and resize the same crop; the first sample's pixels are compared
and the difference printed. Otherwise a line says why it is skipped.

This is a tool, not library code: it imports the method files (and, when asked, the authors'
code) with importlib when run; nothing in `common/` imports it.
"""
import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import math
import os
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from common import data, synthetic, video

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


def model_step(method: str, samples: list, device: torch.device, args=None) -> tuple:
    """(what a step is, a callable running one training step, the module it trains) of
    `method`'s model at its paper
    settings (`Args()` defaults: SIGMA ViT-B with the MLP target; SCE video its 3-D ResNet;
    T-CoRe its ViT; COMEDIAN stage 1), its optimiser at its peak lr, on the batch its loader
    makes of `samples` (the method's own collate), fp32 (no autocast): forward, backward and
    the optimiser step, as its training loop runs it (EMA updates included). `args`: other
    settings than the defaults (the model's; the samples must fit them)."""
    from common import optim
    mod = importlib.import_module(method)
    a, amp, b = args or mod.Args(), optim.Amp("none", device), len(samples)
    if method == "sigma":
        model = mod.build_model(a).to(device)
        net, opt, _ = mod.training_setup(model, a, device)
        clip, mask = (x.to(device) for x in torch.utils.data.default_collate(samples))
        net.train()
        return (f"ViT-{a.model}, {b} clips", lambda: mod.train_step(
            net, clip, mask, opt, amp, None, a.clip_grad), model)
    if method == "sce_video":
        sce = mod.build_model(a).to(device)
        opt = mod.build_optimizer(sce, a)[0]
        c0, c1, _ = torch.utils.data.default_collate(samples)
        clips = [mod.channels_last(c, device) for c in (c0, c1)]
        sce.train()
        return (f"R3D-{a.depth}, {b} videos", lambda: mod.train_step(
            sce, clips, opt, amp, a.ema_m0), sce)
    if method == "tcore":
        tc = mod.build_model(a).to(device)
        opt, lr = mod.build_optimizer(tc, a, device)
        warm = a.warmup_epochs * 100  # past the warm-up: the peak lr, last layer unfrozen
        sch = mod.schedules(a, warm, warm + 1000, 100, lr)
        mod.set_schedules(opt, a, sch["lr"], sch["pmm_lr"], sch["last_lr"], sch["wd"])
        crops, masks = mod.to_device(mod.MaskingCollate(a)(samples), device)
        tc.train()
        return (f"ViT-{a.model}, {b} triplets", lambda: mod.train_step(
            tc, crops, masks, opt, amp, sch["teacher_temp"], sch["momentum"], a.clip_grad), tc)
    if method == "comedian":
        stage, batch_size, _, base_lr, *_ = mod.phases(a)["spatial"]
        model = mod.build_model(a, stage, a.pca_dim).to(device)
        opt, before_step = mod.loop_optimizer("spatial", model, a)
        optim.set_lr_wd(opt, base_lr * batch_size / 256)
        *views, _ = torch.utils.data.default_collate(samples)
        views = [v.to(device) for v in views]
        return (f"stage 1, {b} seconds", lambda: mod.loop_step(
            stage, model, views, opt, amp, a, a.ema_m0, before_step), model)
    raise ValueError(f"model_step: unknown method {method!r}")


def time_steps(step, repeats: int, clock=time.perf_counter) -> list:
    """Seconds (of `clock`) of each of `repeats` calls of `step` after one warm-up call."""
    step()
    out = []
    for _ in range(repeats):
        t = clock()
        step()
        out.append(clock() - t)
    return out


def keys(method: str, n_files: int, clips: int, seconds: float) -> list:
    """`clips` dataset keys (epoch, index): files in turn, a new epoch (new draws) each pass.
    COMEDIAN's items are the seconds of the halves: spread over files and seconds."""
    per = int(seconds) if method == "comedian" else 1
    return [(k // (n_files * per), (k * 7) % (n_files * per)) for k in range(clips)]


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def time_pipeline(get, ks: list, clock=time.perf_counter) -> float:
    """Clips per second of `clock` in one process: `get(k)` for each key, then the loader's
    default collate. With `time.process_time` the seconds are the CPU time of this process (all
    its threads): on a core shared with other jobs, the time the pipeline itself used."""
    t = clock()
    torch.utils.data.default_collate([get(k) for k in ks])
    return len(ks) / (clock() - t)


def cores_needed(gpu_clips_per_s: float, clips_per_s_per_core: float) -> int:
    """Cores (one loader worker each) whose pipelines together reach the GPU's step rate."""
    if clips_per_s_per_core <= 0:
        raise ValueError("cores_needed: the per-core rate must be positive")
    return max(1, math.ceil(gpu_clips_per_s / clips_per_s_per_core - 1e-9))


OFFICIAL = {"sigma": "SIGMA's official repository (kinetics.py, datasets.py, ...)"}


def official_note(method: str, root) -> str:
    """Why the authors' pipeline of `method` cannot be timed here (decord and their code are
    not dependencies of this project); '' when it can be tried."""
    if method not in OFFICIAL:
        return "comparing with the authors' pipeline is not wired in for this method"
    if importlib.util.find_spec("decord") is None:
        return "decord is not importable (install it beside the project, not into it)"
    if not root:
        return "no --official-root (a folder holding the authors' code per method) given"
    if not os.path.isdir(os.path.join(root, method)):
        return f"no {os.path.join(root, method)} ({OFFICIAL[method]})"
    return ""


@contextlib.contextmanager
def _importing_from(folder: str):
    """Import the authors' top-level modules (`datasets`, `transforms`, ...) from `folder`;
    restores sys.path and drops those modules again afterwards (their names are generic)."""
    before = set(sys.modules)
    sys.path.insert(0, folder)
    # their kinetics.py imports `numpy.lib.function_base.disp` (unused), gone in numpy 2
    shim = "numpy.lib.function_base"
    if importlib.util.find_spec("numpy.lib") and shim not in sys.modules:
        try:
            importlib.import_module(shim)
        except ImportError:
            sys.modules[shim] = types.SimpleNamespace(disp=print)
    try:
        yield
    finally:
        sys.path.remove(folder)
        for name in set(sys.modules) - before:
            mod = sys.modules[name]
            if name == shim or (getattr(mod, "__file__", None) or "").startswith(folder):
                del sys.modules[name]


def sigma_draws(mod, paths: list, ks: list) -> dict:
    """key -> (start frame, (top, left, crop h, crop w)): SIGMA's draws for that key, as its
    `PretrainClips` makes them (the same generator, in the same order)."""
    a, out = mod.Args(), {}
    for k in ks:
        epoch, index = data.split_key(k)
        rng = data.sample_np_rng(a.seed, epoch, index)
        meta = video.video_meta(paths[index])
        idx = mod.stride_indices(meta.num_frames, a.num_frames, a.sampling_rate, rng)
        out[k] = idx[0], mod.multi_scale_crop(meta.height, meta.width, a.input_size, rng)
    return out


def official_sigma(folder: str, paths: list, ks: list, workdir: str):
    """A callable key -> sample running the authors' SIGMA pretraining pipeline at the paper
    settings (K400: 16 frames, rate 4, multi-scale crop to 224, tube mask 0.9), with our draws
    (`sigma_draws`) put in place of its start-frame and crop draws."""
    mod = importlib.import_module("sigma")
    with _importing_from(folder):
        theirs = importlib.import_module("datasets")
    setting = os.path.join(workdir, "sigma-train.csv")
    with open(setting, "w") as f:  # their list format: 'path label' (label unused)
        f.writelines(f"{p} 0\n" for p in paths)
    args = types.SimpleNamespace(
        gray_scale_prob=0.0, augmentation="multi_scale_crop", input_size=224, mask_type="tube",
        window_size=(8, 14, 14), mask_ratio=0.9, num_frames=16, sampling_rate=4,
        data_path="", data_path_csv=setting, target_type="mlp")
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its transform
        ds = theirs.build_pretraining_dataset(args)
    crop = ds.transform.train_augmentation  # GroupMultiScaleCrop
    draws = sigma_draws(mod, paths, ks)
    skip = np.zeros(16, dtype=int)

    def get(key):
        start, (top, left, ch, cw) = draws[key]
        ds._sample_train_indices = lambda n: (np.array([start + 1]), skip)  # 1-based offset
        crop._sample_crop_size = lambda im_size: (cw, ch, left, top)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # on an error it prints and loads item + 1
            sample = ds[data.split_key(key)[1]]
        if "failed" in out.getvalue():
            raise RuntimeError(f"the authors' pipeline failed on {key}: {out.getvalue()}")
        return sample
    return get


def official_pipeline(method: str, root: str, paths: list, ks: list, workdir: str):
    """(callable key -> sample, '') for the authors' pipeline of `method`, or (None, why)."""
    note = official_note(method, root)
    if note:
        return None, note
    try:
        return official_sigma(os.path.join(root, method), paths, ks, workdir), ""
    except Exception as e:  # their code or its imports (timm, cv2, ...) missing here
        return None, f"cannot run their code here ({type(e).__name__}: {e})"


def pixel_gap(ours, theirs) -> float:
    """Largest difference between two pipelines' samples (their normalised clips), in 8-bit
    levels (x std x 255)."""
    a, b = ours[0].float(), torch.as_tensor(theirs[0]).float()
    if a.shape != b.shape:
        return float("inf")
    std = torch.tensor((0.229, 0.224, 0.225)).view(3, *[1] * (a.dim() - 1))
    return float(((a - b).abs() * std).max()) * 255


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
    p.add_argument("--official-root", default=None,
                   help="a folder holding the authors' code per method (DIR/sigma, ...)")
    p.add_argument("--cold-tables", action="store_true",
                   help="also time ours with the frame-table cache emptied before each sample")
    p.add_argument("--without-skipping", action="store_true",
                   help="also time ours decoding every frame (no skipping of non-reference "
                        "pictures)")
    p.add_argument("--model-step", action="store_true",
                   help="also time each method's training step (forward, backward, optimiser "
                        "step, fp32) on a batch of its own samples")
    p.add_argument("--step-batch", type=int, default=2, help="samples in that batch")
    p.add_argument("--step-repeats", type=int, default=3, help="timed steps (median)")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                   help="cpu: the process's CPU time (robust on a core shared with other "
                        "jobs); wall: elapsed time (on a core of its own the two agree)")
    p.add_argument("--json", action="store_true", help="also print one JSON line per row")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    methods = [m for m in a.methods.split(",") if m]
    files = bench_files(a.root, a.files, a.seconds)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(f"# one process, 1 torch thread, {affinity} core(s) allowed, {a.clock} time"
          + ("" if affinity == 1 else " (pin it: taskset -c N)")
          + f"; {a.files} K400-like H.264 files per size ({a.seconds:g} s, {FPS} fps, GOP {GOP})")
    jobs, notes = [], {}
    for m in methods:
        for size, paths in files.items():
            got = pipeline(m, paths)
            if got is None:
                break
            what, get = got
            ks = keys(m, len(paths), a.clips, a.seconds)
            sides = [("ours", get)]
            if a.cold_tables:
                sides.append(("ours, tables not cached", cold(get)))
            if a.without_skipping:
                sides.append(("ours, every frame decoded", decoding_every_frame(get)))
            # the list file their dataset reads is written beside the files
            theirs, why = official_pipeline(m, a.official_root, paths, ks,
                                            os.path.dirname(paths[0]))
            if theirs is None:
                notes[m] = why
            else:  # the comparison doubles as their warm-up
                sides.append(("authors'", theirs))
                gap = max(pixel_gap(get(k), theirs(k)) for k in ks)
                notes[m] = notes.get(m, "compared on the same draws; the clips' pixels differ "
                                        "by at most") + f" {gap:.2f} (at {size[0]}x{size[1]})"
            for side, fn in sides:
                time_pipeline(fn, ks)  # warm-up: frame tables, allocator
                jobs.append((m, size, what, side, fn, ks, []))
    clock = CLOCKS[a.clock]
    for r in range(a.rounds):  # alternate the order between rounds
        for m, size, what, side, fn, ks, rates in (jobs if r % 2 == 0 else jobs[::-1]):
            rates.append(time_pipeline(fn, ks, clock))
    unit = "clips per CPU-s" if a.clock == "cpu" else "clips/s"
    print(f"| method | sample | file | pipeline | {unit} per core | ms per clip | ours / "
          f"authors' | cores for {a.gpu_clips_per_s:g} clips/s |")
    print("|---|---|---|---|---|---|---|---|")
    out = {}
    for m, (w, h), what, side, _, _, rates in jobs:
        rate = statistics.median(rates)
        out[(m, f"{w}x{h}", side)] = row = {
            "method": m, "sample": what, "file": f"{w}x{h}", "pipeline": side,
            "clips_per_s_per_core": rate, "ms_per_clip": 1000 / rate,
            "rounds": [round(x, 3) for x in rates],
            "cores_for_gpu": cores_needed(a.gpu_clips_per_s, rate),
            "gpu_clips_per_s": a.gpu_clips_per_s}
    for (m, f, side), row in out.items():  # median of the per-round ratios (paired rounds)
        ref = out.get((m, f, "authors'"))
        if ref is not None and side != "authors'":
            row["ratio_to_authors"] = statistics.median(
                x / y for x, y in zip(row["rounds"], ref["rounds"]))
    for row in out.values():
        ratio = row.get("ratio_to_authors")
        print(f"| {row['method']} | {row['sample']} | {row['file']} | {row['pipeline']} | "
              f"{row['clips_per_s_per_core']:.2f} | {row['ms_per_clip']:.1f} | "
              f"{'' if ratio is None else f'{ratio:.2f}x'} | {row['cores_for_gpu']} |")
        if a.json:
            print(json.dumps(row))
    for m in methods:
        note = notes.get(m) or official_note(m, a.official_root)
        print(f"authors' pipeline, {m}: " + (note + " levels of 255 over the keys timed"
                                              if note.startswith("compared") else
                                              f"skipped, {note}"))
    if a.model_step:
        out.update(step_rows(methods, files, a))
    return out


def step_rows(methods: list, files: dict, a) -> dict:
    """Time each method's `model_step` on this process's CPU thread, on a batch of its first
    `a.step_batch` samples from the 320 x 240 files; print a table; return the rows by
    (method, 'step')."""
    out = {}
    unit = "clips per CPU-s" if a.clock == "cpu" else "clips/s"
    print(f"\n| method | model step (fp32, forward + backward + optimiser) | ms per step, "
          f"median of {a.step_repeats} | {unit} per core |")
    print("|---|---|---|---|")
    for m in methods:
        got = pipeline(m, files[SIZES[0]])
        if got is None:
            continue
        ks = keys(m, a.files, max(a.step_batch, a.clips), a.seconds)[:a.step_batch]
        what, step, _ = model_step(m, [got[1](k) for k in ks], torch.device("cpu"))
        secs = statistics.median(time_steps(step, a.step_repeats, CLOCKS[a.clock]))
        out[(m, "step")] = row = {"method": m, "step": what, "ms_per_step": 1000 * secs,
                                  "clips_per_s_per_core": a.step_batch / secs}
        print(f"| {m} | {what} | {row['ms_per_step']:.0f} | "
              f"{row['clips_per_s_per_core']:.3f} |")
        if a.json:
            print(json.dumps(row))
    return out


def cold(get):
    """`get` with the per-process frame-table cache emptied first (a miss on every file)."""
    def fn(key):
        video._scan.cache_clear()
        return get(key)
    return fn


def decoding_every_frame(get):
    """`get` with the skipping of unwanted non-reference pictures switched off."""
    def fn(key):
        video.SKIP_NONREF = False
        try:
            return get(key)
        finally:
            video.SKIP_NONREF = True
    return fn


if __name__ == "__main__":
    sys.exit(main() and 0)
