"""Video IO through PyAV (torchvision 0.29 has none): metadata, frames at given indices or
timestamps, frame-folder videos, and an encoder for the synthetic data and the tests.

Frames are `torch.uint8` tensors of shape (T, H, W, 3), RGB. Frame indices are 0-based and
counted from the first frame of the video stream; indices past the end are clamped to the
last frame, so a sampler may ask for a clip longer than a short video.
"""
import functools
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence, Union

import av
import numpy as np
import torch
from PIL import Image

PathLike = Union[str, os.PathLike]
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
RESEEK_SECONDS = 2.0  # wanted frames further apart than this are reached by a new seek


class VideoReadError(RuntimeError):
    """A video (or frame folder) is missing, empty, corrupt or has no video stream."""


@dataclass(frozen=True)
class VideoMeta:
    fps: float
    num_frames: int
    duration: float  # seconds
    width: int
    height: int


def _open(path: PathLike) -> "av.container.InputContainer":
    if not os.path.isfile(path):
        raise VideoReadError(f"{path}: no such video file")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"{path}: empty video file")
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise VideoReadError(f"{path}: cannot open video ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: no video stream")
    return container


@functools.lru_cache(maxsize=4096)
def _meta(path: str, mtime_ns: int, size: int) -> VideoMeta:
    with _open(path) as c:
        s = c.streams.video[0]
        fps = float(s.average_rate or s.guessed_rate or 0)
        if s.duration is not None:
            duration = float(s.duration * s.time_base)
        else:
            duration = (c.duration or 0) / av.time_base
        num_frames = s.frames or round(duration * fps)
        if fps <= 0 or num_frames <= 0:
            raise VideoReadError(f"{path}: cannot tell the frame rate or length")
        return VideoMeta(fps, num_frames, duration, s.codec_context.width, s.codec_context.height)


def video_meta(path: PathLike) -> VideoMeta:
    """fps, frame count, duration and size of a video; cached per (path, mtime, size)."""
    try:
        st = os.stat(path)
    except OSError:
        raise VideoReadError(f"{path}: no such video file") from None
    return _meta(str(path), st.st_mtime_ns, st.st_size)


def read_frames(path: PathLike, indices: Sequence[int]) -> torch.Tensor:
    """Frames `indices` (any order, repeats allowed) of a video as uint8 (T, H, W, 3).

    For each run of nearby wanted frames: seek to the keyframe before the first one, decode
    forward, convert to RGB only the wanted frames, stop after the last one. A decoded
    frame's index is round((pts * time_base - start) * fps).
    """
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError(f"{path}: read_frames needs at least one frame index")
    if min(indices) < 0:
        raise ValueError(f"{path}: negative frame index {min(indices)}")
    meta = video_meta(path)
    indices = [min(i, meta.num_frames - 1) for i in indices]
    wanted = sorted(set(indices))
    runs, gap = [[wanted[0]]], max(1, round(RESEEK_SECONDS * meta.fps))
    for i in wanted[1:]:  # runs of wanted frames, each reached by one seek
        if i - runs[-1][-1] > gap:
            runs.append([])
        runs[-1].append(i)
    got = {}
    try:
        with _open(path) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            tb, start = s.time_base, s.start_time or 0
            for run in runs:
                got.update(_decode_run(c, s, run, tb, start, meta.fps))
    except av.FFmpegError as e:
        raise VideoReadError(f"{path}: decoding failed ({e})") from None
    if len(got) < len(wanted):
        raise VideoReadError(f"{path}: no frame could be decoded")
    return torch.from_numpy(np.stack([got[i] for i in indices]))


def _decode_run(c, s, run: list, tb: Fraction, start: int, fps: float) -> dict:
    """Decode the frames of `run` (sorted unique indices) after one seek.

    An index the stream skips (variable frame rate, a stream shorter than its metadata)
    gets the frame on screen at that time: the last decoded one before it.
    """
    got = {}
    for target in (start + int(run[0] / fps / tb), start):  # retry from the very start
        c.seek(target, stream=s, backward=True, any_frame=False)
        j, idx, prev = 0, -1, None
        for frame in c.decode(s):
            # Some old AVI files lack pts: count on from the previous frame.
            idx = idx + 1 if frame.pts is None else round(float((frame.pts - start) * tb) * fps)
            if prev is None and idx > run[0] and target != start:
                break  # the seek landed after the first wanted frame
            while j < len(run) and run[j] <= idx:
                shown = frame if run[j] == idx or prev is None else prev
                got[run[j]] = shown.to_ndarray(format="rgb24")
                j += 1
            if j == len(run):
                return got
            prev = frame
        if prev is not None:  # end of stream: its last frame stays on screen
            last = prev.to_ndarray(format="rgb24")
            got.update({i: last for i in run[j:]})
            return got
    return got


def read_frames_at(path: PathLike, timestamps: Sequence[float]) -> torch.Tensor:
    """Frames on screen at `timestamps` (seconds from the video start): index floor(t * fps)."""
    fps = video_meta(path).fps
    return read_frames(path, [max(0, math.floor(t * fps + 1e-6)) for t in timestamps])


@functools.lru_cache(maxsize=4096)
def _frame_files(folder: str, mtime_ns: int) -> tuple:
    """Image names sorted by the last number in them, so any zero padding works."""
    names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS)]
    return tuple(sorted(names, key=lambda n: (int((re.findall(r"\d+", n) or [-1])[-1]), n)))


def _listing(folder: PathLike) -> tuple:
    if not os.path.isdir(folder):
        raise VideoReadError(f"{folder}: no such frame folder")
    files = _frame_files(str(folder), os.stat(folder).st_mtime_ns)
    if not files:
        raise VideoReadError(f"{folder}: no frames (expected {folder}/00001.jpg, ...)")
    return files


def frame_folder_length(folder: PathLike) -> int:
    """Number of image frames in a frame-folder video."""
    return len(_listing(folder))


def read_frame_folder(folder: PathLike, indices: Sequence[int]) -> torch.Tensor:
    """Frames `indices` of a frame folder as uint8 (T, H, W, 3); index 0 is the first file
    (`00001.jpg`, or `00000.jpg` in DAVIS). Indices past the end are clamped to the last."""
    files, out = _listing(folder), []
    for i in indices:
        path = os.path.join(folder, files[min(int(i), len(files) - 1)])
        try:
            with Image.open(path) as img:
                out.append(np.asarray(img.convert("RGB")))
        except OSError as e:
            raise VideoReadError(f"{path}: cannot decode frame ({e})") from None
    return torch.from_numpy(np.stack(out))


def write_video(path: PathLike, frames, fps: float = 25, codec: str = "libx264",
                gop: int = 12, crf: int = 18) -> Path:
    """Encode uint8 (T, H, W, 3) RGB frames (tensor or array) as yuv420p; returns the path.

    `codec`: libx264, mpeg4, libvpx-vp9 (PyAV 18 encoders); `crf` sets the quality of x264
    and vp9, mpeg4 gets a generous bit rate. `gop`: frames between keyframes. H and W must
    be even (yuv420p). x264 output is not always byte-identical from run to run (about 1 file
    in 50 differs by a few bytes here, whatever the thread settings); the pictures agree.
    """
    frames = np.asarray(frames.cpu() if torch.is_tensor(frames) else frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be uint8 (T, H, W, 3), got "
                         f"{frames.dtype} {tuple(frames.shape)}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"{path}: yuv420p needs an even frame size, got {h}x{w}: crop or pad")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(10**5))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.gop_size = gop
        if codec in ("libx264", "libvpx-vp9"):
            s.options = {"crf": str(crf), **({"b": "0"} if codec == "libvpx-vp9" else {})}
        else:
            s.codec_context.bit_rate = max(10**6, int(h * w * fps))
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        c.mux(s.encode())
    return Path(path)


def video_length(path: PathLike) -> int:
    """Frame count of a video file or of a frame folder."""
    return frame_folder_length(path) if os.path.isdir(path) else video_meta(path).num_frames


def read_clip(path: PathLike, indices: Sequence[int]) -> torch.Tensor:
    """`read_frame_folder` for a folder, `read_frames` for a file: uint8 (T, H, W, 3)."""
    return read_frame_folder(path, indices) if os.path.isdir(path) else read_frames(path, indices)
