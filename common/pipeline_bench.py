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
`DIR/tcore` (T-CoRe's repository): their loader reads JPEG frame folders, so the tool writes
each file's frames as one (`frame_folders`) and times theirs and ours on those folders (ours
also on the file), their frame draw set to ours. `DIR/eztorch` (with pytorchvideo 0.1.5,
torchaug, hydra-core, omegaconf, iopath importable): SCE video's loader on the files, and
COMEDIAN stage 1's on 2-fps JPEG folders of the same frames (`soccernet_folders`; ours also on
those), each also with their GPU-side augmentation run on this core (ours does that work per
sample on the CPU); their own draws. `--frame-folders` adds ours on T-CoRe's folders alone.

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


JPEG_QUALITY = 90  # the frame folders' JPEG quality (T-CoRe's README leaves the extraction open)
FRAME_CLASS = "k400like"  # the one class folder of the T-CoRe layout


def frame_folders(paths: list) -> list:
    """The frames of each H.264 file in `paths`, decoded by `common.video`, as a JPEG frame
    folder (`00001.jpg`, ... at `JPEG_QUALITY`, every frame) in T-CoRe's layout
    `<dir>/frames/train/k400like/<file stem>/`, beside the files; written once per file
    (atomically: a temporary folder renamed), then reused. Returns the folders' paths."""
    from PIL import Image
    out = []
    for path in map(Path, paths):
        folder = path.parent / "frames" / "train" / FRAME_CLASS / path.stem
        if not folder.is_dir():
            tmp = folder.with_name(f".{folder.name}.{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            frames = video.read_frames(path, range(video.video_meta(path).num_frames)).numpy()
            for t, img in enumerate(frames):
                Image.fromarray(img).save(tmp / f"{t + 1:05d}.jpg", quality=JPEG_QUALITY)
            os.replace(tmp, folder)
        out.append(str(folder))
    return out


def soccernet_folders(paths: list) -> list:
    """The frames on screen every 0.5 s of each file in `paths` (`video.read_frames_at`: the
    2-fps frames COMEDIAN reads), as a JPEG frame folder in eztorch's SoccerNet layout
    `<dir>/soccernet/<file stem>/1/00000001.jpg, ...` (one game per file, its first half),
    with that layout's `<dir>/soccernet/train.json` listing them; written once, then reused.
    Returns the halves' folders."""
    from PIL import Image
    root, out, games = Path(paths[0]).parent / "soccernet", [], {}
    for path in map(Path, paths):
        folder = root / path.stem / "1"
        n = math.floor(video.video_meta(path).duration * 2)
        if not folder.is_dir():
            tmp = folder.with_name(f".1.{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            for k, img in enumerate(video.read_frames_at(path, [k / 2 for k in range(n)])):
                Image.fromarray(img.numpy()).save(tmp / f"{k + 1:08d}.jpg", quality=JPEG_QUALITY)
            os.replace(tmp, folder)
        games[path.stem] = {"UrlLocal": path.stem, "halves": {"1": {
            "UrlLocal": f"{path.stem}/1", "duration": n / 2, "fps": 2, "num_frames": n,
            "annotations": []}}}
        out.append(str(folder))
    with open(root / "train.json", "w") as f:
        json.dump(games, f)
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
        halves = [soccernet.Half(f"g{i}", 1, p, video.frame_folder_length(p) / soccernet.FPS
                                 if os.path.isdir(p) else video.video_meta(p).duration, [])
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


def time_pipeline(get, ks: list, clock=time.perf_counter, collate=None) -> float:
    """Clips per second of `clock` in one process: `get(k)` for each key, then `collate` (the
    loader's default collate if None). With `time.process_time` the seconds are the CPU time of
    this process (all its threads): on a core shared with other jobs, the time the pipeline
    itself used."""
    t = clock()
    (collate or torch.utils.data.default_collate)([get(k) for k in ks])
    return len(ks) / (clock() - t)


def cores_needed(gpu_clips_per_s: float, clips_per_s_per_core: float) -> int:
    """Cores (one loader worker each) whose pipelines together reach the GPU's step rate."""
    if clips_per_s_per_core <= 0:
        raise ValueError("cores_needed: the per-core rate must be positive")
    return max(1, math.ceil(gpu_clips_per_s / clips_per_s_per_core - 1e-9))


OFFICIAL = {  # method: (folder under DIR, what it holds, third-party modules their code needs)
    "sigma": ("sigma", "SIGMA's official repository (kinetics.py, datasets.py, ...)",
              ("decord",)),
    "tcore": ("tcore", "T-CoRe's official repository (base_model/data/...)", ()),
    "comedian": ("eztorch", "the eztorch repository (eztorch/datasets, transforms, configs)",
                 ("pytorchvideo", "torchaug", "hydra", "omegaconf", "iopath")),
    "sce_video": ("eztorch", "the eztorch repository (eztorch/datasets, transforms, configs)",
                  ("pytorchvideo", "torchaug", "hydra", "omegaconf", "iopath"))}


def official_note(method: str, root) -> str:
    """Why the authors' pipeline of `method` cannot be timed here (decord and their code are
    not dependencies of this project); '' when it can be tried."""
    if method not in OFFICIAL:
        return "comparing with the authors' pipeline is not wired in for this method"
    sub, what, needs = OFFICIAL[method]
    for need in needs:
        if importlib.util.find_spec(need) is None:
            return f"{need} is not importable (install it beside the project, not into it)"
    if not root:
        return "no --official-root (a folder holding the authors' code per method) given"
    if not os.path.isdir(os.path.join(root, sub)):
        return f"no {os.path.join(root, sub)} ({what})"
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


def tcore_draws(mod, folders: list, ks: list) -> dict:
    """key -> (past, current, future) frame indices: T-CoRe's draws for that key, as its
    `SandwichClips` makes them (the same generator, in the same order)."""
    a, out = mod.Args(), {}
    for k in ks:
        epoch, index = data.split_key(k)
        rng = data.sample_np_rng(a.seed, epoch, index)
        out[k] = mod.sandwich_indices(video.video_length(folders[index]), rng, a.current_range,
                                      a.past_offset, a.future_offset)
    return out


def official_tcore(folder: str, frame_dirs: list, ks: list):
    """(key -> sample, collate) of the authors' T-CoRe pretraining pipeline (`Kinetics` over
    JPEG frame folders, PIL decoding, `DataAugmentationVideo` at the paper's crops: 2 global
    224 px (0.32-1), 8 local 96 px (0.05-0.32); their collate with block masks, fp16 as
    `train.py` casts) on `frame_dirs` (`frame_folders`' layout), with our sandwich frames
    (`tcore_draws`) put in place of its frame draw; its crop, colour and mask draws stay its
    own. Their dataset calls `transform(frame_name, image, ...)` and their collate reads
    `frame_name` from its output, while their `DataAugmentationVideo.__call__` takes no name
    (the released code mixes two versions): a wrapper passes the image on and adds the name."""
    import functools
    mod = importlib.import_module("tcore")
    a = mod.Args()
    with _importing_from(folder):
        kin = importlib.import_module("base_model.data.datasets.kinetics")
        theirs = importlib.import_module("base_model.data")
    root = os.path.dirname(os.path.dirname(os.path.dirname(frame_dirs[0])))  # .../frames
    names = [os.path.basename(d) for d in frame_dirs]
    entries = np.empty(len(names), dtype=[("video_id", "<U25"), ("class_index", "<u4"),
                                          ("class_id", "U7"), ("class_name", "U16")])
    for i, n in enumerate(names):
        entries[i] = (n, 0, "class_0", FRAME_CLASS)
    np.save(os.path.join(root, "entries-TRAIN.npy"), entries)
    aug = theirs.DataAugmentationVideo(tuple(a.global_scale), tuple(a.local_scale),
                                       a.local_crops, a.global_size, a.local_size)

    def transform(frame_name, image, pos_tuple_list=None, center_crop=False):
        out, pos = aug(image, pos_tuple_list=pos_tuple_list, center_crop=center_crop)
        out["frame_name"] = frame_name
        return out, pos
    ds = kin.Kinetics(split=kin.Kinetics.Split.TRAIN, root=root, extra=root,
                      transform=transform, target_transform=lambda _: (),
                      past_offset_range=tuple(a.past_offset),
                      current_range=tuple(a.current_range),
                      future_offset_range=tuple(a.future_offset))
    ds.debug_save = False
    grid = a.global_size // a.patch_size
    collate = functools.partial(
        theirs.collate_data_and_cast_with_aux_use_past_future_frames,
        mask_ratio_tuple=tuple(a.mask_ratio), mask_probability=a.mask_prob, dtype=torch.half,
        n_tokens=grid * grid,
        mask_generator=theirs.MaskingGenerator(input_size=(grid, grid),
                                               max_num_patches=grid * grid))
    draws = tcore_draws(mod, frame_dirs, ks)

    def get(key):
        index = data.split_key(key)[1]
        files = sorted(os.listdir(frame_dirs[index]))
        ds.get_frames = lambda *_: tuple(files[i] for i in draws[key])
        return ds[index]
    return get, collate

def _eztorch(folder: str):
    """Make eztorch's data and transform modules importable from the checkout `folder`
    without its package `__init__`s (`eztorch`, `eztorch.datasets`, `eztorch.utils`: they
    import its models, callbacks and Lightning): those three are bare packages over their
    folders; `lightning.pytorch` (imported by `eztorch/utils/utils.py` and the SoccerNet
    parsers for a type hint and log calls) is a stand-in with `LightningModule`,
    `rank_zero_info` and `rank_zero_warn`; pytorchvideo 0.1.5's
    `torchvision.transforms.functional_tensor` is torchvision's same module, renamed
    `_functional_tensor` since, and numpy 2's `np.bytes_` is given its numpy 1 name
    `np.string_`. Nothing numerical is replaced. The names stay in
    `sys.modules` (their readers import lazily), so this is for the tool's process only."""
    import torchvision.transforms._functional_tensor as ft
    sys.modules.setdefault("torchvision.transforms.functional_tensor", ft)
    if not hasattr(np, "string_"):  # numpy 2 renamed it (their SoccerNet path tables use it)
        np.string_ = np.bytes_
    root = os.path.join(folder, "eztorch")
    for name in ("eztorch", "eztorch.datasets", "eztorch.utils", "eztorch.evaluation"):
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(root, *name.split(".")[1:])]
            sys.modules[name] = pkg
    if "lightning" not in sys.modules and importlib.util.find_spec("lightning") is None:
        lp = types.ModuleType("lightning.pytorch")
        lp.LightningModule = object
        lp.utilities = types.ModuleType("lightning.pytorch.utilities")
        lp.utilities.rank_zero_info = print
        lp.utilities.rank_zero_warn = print
        sys.modules.update({"lightning": types.SimpleNamespace(pytorch=lp),
                            "lightning.pytorch": lp,
                            "lightning.pytorch.utilities": lp.utilities})
    return root


def official_sce_video(folder: str, paths: list, workdir: str):
    """(key -> sample, collate) of the authors' SCE video pretraining loader, as eztorch's
    R3D-18 K400 run builds it (`run/pretrain/sce/resnet3d18/resnet3d18_kinetics400.yaml`):
    `Kinetics` with the pyav decoder (pytorchvideo's `EncodedVideoPyAV`), 2 clips of 2.56 s
    (`RandomMultiClipSampler`), the crop transform `kinetics_temporal_difference` (RGB
    difference p 0.2, 8 frames, random resized crop 224, scale 0.2-0.766) and the default
    collate; their own draws (not ours: their sampler and crops draw from Python's, numpy's
    and torch's global generators). Their colour jitter, grayscale, blur, solarize, flip and
    normalisation (`model.train_transform`: `kinetics_sce_color_strength_1`, torchaug batch
    transforms) run on the GPU in their training, not in the loader:
    `official_gpu_augmentation` gives them, to time on this core too. Their crop config names
    `eztorch.transforms.RandomTemporalDifference`, which the package exports only as
    `eztorch.transforms.video.RandomTemporalDifference` (the same class): that name is used."""
    root = _eztorch(folder)
    from omegaconf import OmegaConf
    import hydra.utils
    cs = importlib.import_module("eztorch.datasets.clip_samplers")
    kin = importlib.import_module("eztorch.datasets.kinetics")
    importlib.import_module("eztorch.transforms")
    cfg = OmegaConf.load(os.path.join(root, "configs/transform/crops",
                                      "kinetics_temporal_difference.yaml"))
    cfg.transform.transforms[0]._target_ = "eztorch.transforms.video.RandomTemporalDifference"
    setting = os.path.join(workdir, "sce-train.csv")
    with open(setting, "w") as f:  # their list format: 'path label'
        f.writelines(f"{p} 0\n" for p in paths)
    ds = kin.Kinetics(setting, cs.RandomMultiClipSampler(
        num_clips=2, clip_duration=2.56, speeds=[1], jitter_factor=0),
        transform=hydra.utils.instantiate(cfg), decode_audio=False, decoder="pyav")
    return (lambda key: ds[data.split_key(key)[1]]), None


GPU_AUGMENTATION = {"sce_video": "kinetics_sce_color_strength_1", "comedian": "soccernet_sce"}


def official_gpu_augmentation(folder: str, method: str):
    """A collate: the default one, then the authors' GPU-side augmentation of `method`
    (`GPU_AUGMENTATION`: eztorch's `transform/contrastive` config of its run, torchaug batch
    transforms on both views of the batch) run on this process's CPU thread."""
    root = _eztorch(folder)
    from omegaconf import OmegaConf
    import hydra.utils
    importlib.import_module("eztorch.transforms")
    gpu = hydra.utils.instantiate(OmegaConf.load(os.path.join(
        root, "configs/transform/contrastive", GPU_AUGMENTATION[method] + ".yaml")))
    return lambda samples: gpu(torch.utils.data.default_collate(samples)["input"])

def official_comedian(folder: str, halves: list):
    """(key -> sample, collate) of the authors' COMEDIAN stage-1 loader, as eztorch's
    `run/pretrain/sce/vit/vit_small_spatio_temporal_soccernet.yaml` builds it: `SoccerNet`
    over 2-fps JPEG frame folders (`soccernet_folders`' layout) with the frame decoder
    (`FrameSoccerNetVideo`, 4 I/O and 4 decode threads, 2 decodes), the 1-s window of our
    key's second (`SlidingWindowSoccerNetClipSampler(1, 0)` yields those), the crop transform
    `soccernet` (2 views, random resized crop 224, scale 0.2-1, ratio 1.33-2.21) and the
    default collate; their own crop draws. Its colour, blur and normalisation run on the GPU
    (`official_gpu_augmentation`). `sklearn` (imported for class weights and feature PCA,
    neither used here) is a stand-in that raises if called, if it is not installed."""
    root = _eztorch(folder)
    if "sklearn" not in sys.modules and importlib.util.find_spec("sklearn") is None:
        def unavailable(*_, **__):
            raise RuntimeError("sklearn stand-in: not installed beside the tool")
        for name, attrs in (("sklearn", {}), ("sklearn.utils", {}),
                            ("sklearn.utils.class_weight", {"compute_class_weight": unavailable}),
                            ("sklearn.decomposition", {"PCA": unavailable})):
            sys.modules[name] = types.SimpleNamespace(**attrs)
    from omegaconf import OmegaConf
    import hydra.utils
    sn = importlib.import_module("eztorch.datasets.soccernet")
    importlib.import_module("eztorch.transforms")
    base = os.path.dirname(os.path.dirname(halves[0]))
    ds = sn.soccernet_dataset(
        os.path.join(base, "train.json"),
        hydra.utils.instantiate(OmegaConf.load(os.path.join(root, "configs/transform/crops",
                                                            "soccernet.yaml"))),
        video_path_prefix=base + "/", decoder="frame",
        decoder_args=dict(fps=2, num_threads_io=4, num_threads_decode=4, num_decode=2,
                          time_difference_prob=0.0, transform=None, mask_ratio=0.0,
                          mask_tube=2), label_args=None, features_args=None)
    seconds = [(i, s) for i, h in enumerate(halves)
               for s in range(int(video.frame_folder_length(h) / 2))]  # SpatialClips' items

    def get(key):
        i, s = seconds[data.split_key(key)[1]]
        return ds[(i, 0, float(s), float(s + 1))]
    return get, None

def official_pipeline(method: str, root: str, paths: list, ks: list, workdir: str):
    """(callable key -> sample, its collate (None: the default one), '') for the authors'
    pipeline of `method`, or (None, None, why). T-CoRe's reads `frame_folders(paths)`."""
    note = official_note(method, root)
    if note:
        return None, None, note
    try:
        folder = os.path.join(root, OFFICIAL[method][0])
        if method == "tcore":
            return (*official_tcore(folder, frame_folders(paths), ks), "")
        if method == "sce_video":
            return (*official_sce_video(folder, paths, workdir), "")
        if method == "comedian":
            return (*official_comedian(folder, soccernet_folders(paths)), "")
        return official_sigma(folder, paths, ks, workdir), None, ""
    except Exception as e:  # their code or its imports (timm, cv2, ...) missing here
        return None, None, f"cannot run their code here ({type(e).__name__}: {e})"


def own_collate(method: str):
    """The collate a method's training loader uses (T-CoRe: `MaskingCollate`, which also
    draws the block masks); None for the default collate."""
    if method == "tcore":
        mod = importlib.import_module(method)
        return mod.MaskingCollate(mod.Args())
    return None


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
                   help="a folder holding the authors' code: DIR/sigma, DIR/tcore, "
                        "DIR/eztorch (SCE video and COMEDIAN)")
    p.add_argument("--frame-folders", action="store_true",
                   help="also time T-CoRe's pipeline on JPEG frame folders of the same frames "
                        "(as the authors' T-CoRe reads its data; implied by timing theirs)")
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
            ours = own_collate(m)
            sides = [("ours", get, ours)]
            if a.cold_tables:
                sides.append(("ours, tables not cached", cold(get), ours))
            if a.without_skipping:
                sides.append(("ours, every frame decoded", decoding_every_frame(get), ours))
            # the list file their dataset reads is written beside the files
            theirs, their_collate, why = official_pipeline(m, a.official_root, paths, ks,
                                                           os.path.dirname(paths[0]))
            if m == "tcore" and (a.frame_folders or theirs is not None):
                sides.append(("ours, JPEG frame folders",
                              pipeline(m, frame_folders(paths))[1], ours))
            if theirs is None:
                notes[m] = why
            elif m in GPU_AUGMENTATION:
                if m == "comedian":  # theirs reads 2-fps JPEG folders: ours too, the same
                    sides.append(("ours, 2-fps JPEG frame folders",
                                  pipeline(m, soccernet_folders(paths))[1], ours))
                sides.append(("authors' loader", theirs, their_collate))
                sides.append(("authors' loader + their GPU augmentation on this core", theirs,
                              official_gpu_augmentation(os.path.join(a.official_root,
                                                                     "eztorch"), m)))
                notes[m] = ("each side's own draws (pixels not compared); the authors' "
                            "colour, blur and flip run on the GPU in their training, not in "
                            "their loader" + (": theirs reads the 2-fps JPEG frame folders "
                                              "of the same frames" if m == "comedian" else ""))
            elif m == "tcore":
                sides.append(("authors', JPEG frame folders", theirs, their_collate))
                notes[m] = ("the same JPEG frame folders and sandwich frames; crops, colour "
                            "and masks are each side's own draws (pixels not compared)")
            else:  # the comparison doubles as their warm-up
                sides.append(("authors'", theirs, their_collate))
                gap = max(pixel_gap(get(k), theirs(k)) for k in ks)
                notes[m] = notes.get(m, "compared on the same draws; the clips' pixels differ "
                                        "by at most") + f" {gap:.2f} (at {size[0]}x{size[1]})"
            for side, fn, col in sides:
                time_pipeline(fn, ks, collate=col)  # warm-up: frame tables, allocator
                jobs.append((m, size, what, side, (fn, col), ks, []))
    clock = CLOCKS[a.clock]
    for r in range(a.rounds):  # alternate the order between rounds
        for m, size, what, side, (fn, col), ks, rates in (jobs if r % 2 == 0 else jobs[::-1]):
            rates.append(time_pipeline(fn, ks, clock, col))
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
        refs = [(s, r) for (mm, ff, s), r in out.items()
                if (mm, ff) == (m, f) and s.startswith("authors'")]
        if refs and not side.startswith("authors'"):
            row["ratio_to"] = {s: statistics.median(x / y for x, y in zip(row["rounds"],
                                                                         r["rounds"]))
                               for s, r in refs}
            row["ratio_to_authors"] = row["ratio_to"][refs[0][0]]
    for row in out.values():
        ratio = row.get("ratio_to_authors")
        print(f"| {row['method']} | {row['sample']} | {row['file']} | {row['pipeline']} | "
              f"{row['clips_per_s_per_core']:.2f} | {row['ms_per_clip']:.1f} | "
              f"{'' if ratio is None else f'{ratio:.2f}x'} | {row['cores_for_gpu']} |")
        if a.json:
            print(json.dumps(row))
    for row in out.values():
        for s, x in list(row.get("ratio_to", {}).items())[1:]:
            print(f"{row['method']} {row['file']}: {row['pipeline']} / {s}: {x:.2f}x")
    for m in methods:
        note = notes.get(m) or official_note(m, a.official_root)
        timed = any(mm == m and side.startswith("authors'") for mm, _, _, side, *_ in jobs)
        print(f"authors' pipeline, {m}: " + (
            note + " levels of 255 over the keys timed" if note.startswith("compared")
            else note if timed else f"skipped, {note}"))
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
