"""Video IO through PyAV (torchvision 0.29 has none): metadata, frames at given indices or
timestamps, frame-folder videos, and an encoder for the synthetic data and the tests.

Frames are `torch.uint8` tensors of shape (T, H, W, 3), RGB. Frame `i` of a video file is the
`i`-th frame that a plain sequential decode (`for f in container.decode(stream)`) yields, what
decord returns, on every container and codec (mp4, mkv, avi, webm; h264, mpeg4, msmpeg4,
cinepak, vp9), whatever the header frame count and the timestamps say; `video_length` is the
number of frames that decode yields. Indices are 0-based; indices past the end are clamped to
the last frame, so a sampler may ask for a clip longer than a short video.

How: a demux-only pass (no decoding), cached per (path, mtime, size), lists the packets; frame
`i` is the packet with the `i`-th smallest pts. Packets that yield no frame are left out: empty
ones (PyAV's final flush packet; AVI "dropped frame" chunks, which FFmpeg's demuxer already
skips) and those the demuxer marks discard (mp4 edit lists). A read seeks to the keyframe at or
before a wanted frame, decodes forward and names each decoded frame by its pts in that table,
never by time x fps. Two exact fallbacks:
- "decode": if the packets lack pts or repeat one, or a read finds the decoder disagreeing
  with the table (a pts not in it, frames out of sequence, a promised frame never decoded),
  the table is rebuilt from one full decode: frame `i` is the `i`-th decoded frame, found again
  after a seek by the pts the decoder gave it (H.264 in AVI needs this: its packet pts are
  decode-order stamps, so sorting them misorders B-frames);
- "count": if even the decoded frames lack distinct pts (raw .h264), every read decodes from
  frame 0 and counts.
A truncated or corrupt file has only the frames that decode: a packet cut by the end of the
file (or flagged corrupt) is seen by the demux pass, whose table is then built by decoding, so
`video_length` is the decodable count from the first call, in every process. Should a read
still find a promised frame that never decodes, it raises VideoReadError (the error
`common.data.SafeDataset` counts and skips), never a repeated last frame, and so does every
later read of those indices. Known blind spot: a non-empty packet that decodes to nothing (an
MPEG-4 "not coded" VOP) is seen only by a read that decodes through it.
Cost: the tables of the last 4096 files are cached per process; a miss costs one demux pass
(about 5 ms for a 10-s 320x240 clip), a full decode for the rare files that need it.
Frame skipping (H.264 with a packet table): a packet whose every slice has nal_ref_idc 0 (a
non-reference picture, which by the standard no other picture predicts from) and whose frame is
not wanted is not sent to the decoder; the frames it would have shown are left out of the
order check, which otherwise stays exact. Every other picture is decoded as before, so the
wanted frames are bit-identical to a full decode; on x264 files with B-frames about half the
frames are skipped. Should a read with skipping disagree with the table, the file is read
without skipping from then on (and only a disagreement then rebuilds the table). The blind
spot above widens with it: an unwanted non-reference picture that would decode to nothing is
never sent to the decoder, so no read finds it (none was met in H.264 files here).
"""
import bisect
import functools
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from common import cli

try:  # PyAV is needed only to read or write video files: image-only runs go without it
    import av
    from av.video.reformatter import VideoReformatter
except ImportError:
    av = VideoReformatter = None

PathLike = Union[str, os.PathLike]
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
RESEEK_FRAMES = 8  # a wanted frame gets a new seek if that skips decoding more frames than this
TIME_EPS = 1e-6  # seconds: a frame shown at t + TIME_EPS counts as shown at t
SKIP_NONREF = True  # skip unwanted non-reference H.264 pictures (False: decode every frame)


class VideoReadError(RuntimeError):
    """A video (or frame folder) is missing, empty, corrupt or has no video stream."""


class PyAVMissing(cli.UserError, ImportError):
    """PyAV is not installed and a video file must be read or written."""


def require_av() -> None:
    """Raise `PyAVMissing` (one line: what to install) when PyAV cannot be imported."""
    if av is None:
        raise PyAVMissing("reading or writing video files needs PyAV: pip install av (offline: "
                          "pip install --no-deps av-<version>-<platform>.whl)")


@dataclass(frozen=True)
class VideoMeta:
    fps: float  # average frame rate from the header (metadata only: frames are not found by it)
    num_frames: int  # frames a sequential decode yields
    duration: float  # seconds, from the first frame to the end of the last
    width: int
    height: int


@dataclass(frozen=True)
class _Index:
    """Where the frames of a video file are (see the module docstring)."""
    meta: VideoMeta
    mode: str  # "packets", "decode" or "count"
    rank: dict  # pts the decoder gives a frame -> frame index ({} in "count" mode)
    times: tuple  # seconds from frame 0 to frame i (sorted pts; i / fps in "count" mode)
    keys: tuple  # sorted indices of the keyframes, the seek points
    key_ts: tuple  # their pts, the timestamps to seek to


class _Mismatch(Exception):
    """The decoder disagrees with a video's frame table."""


class _SkipMismatch(_Mismatch):
    """The decoder disagrees with a video's frame table on a read that skipped frames."""


def _open(path: PathLike) -> "av.container.InputContainer":
    if not os.path.isfile(path):
        raise VideoReadError(f"{path}: no such video file")
    if os.path.getsize(path) == 0:
        raise VideoReadError(f"{path}: empty video file")
    require_av()
    try:
        container = av.open(str(path))
    except av.FFmpegError as e:
        raise VideoReadError(f"{path}: cannot open video ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: no video stream")
    return container


@functools.lru_cache(maxsize=4096)
def _scan(path: str, mtime_ns: int, size: int, decode: bool) -> _Index:
    """The frame table of a file: from its packets, or from one full decode if `decode`."""
    with _open(path) as c:
        s = c.streams.video[0]
        rows = []  # (pts, dts, keyframe?, duration) per frame
        try:
            if decode:  # frames in decode order = frame order
                s.thread_type = "AUTO"
                for f in c.decode(s):
                    rows.append((f.pts, f.dts, f.key_frame, f.duration))
            else:  # packets in decode order; sorted by pts below
                for p in c.demux(s):
                    if p.is_corrupt or (p.pos is not None and p.pos + p.size > size):
                        return _scan(path, mtime_ns, size, True)  # truncated: count what decodes
                    if p.size and not p.is_discard:
                        rows.append((p.pts, p.dts, p.is_keyframe, p.duration))
        except av.FFmpegError:  # truncated or corrupt: keep the frames before the error
            if not decode:
                return _scan(path, mtime_ns, size, True)
        fps = float(s.average_rate or s.guessed_rate or 0)
        w, h, tb = s.codec_context.width, s.codec_context.height, s.time_base
    pts = [r[0] for r in rows]
    if None in pts or len(set(pts)) < len(pts):
        if not decode:
            return _scan(path, mtime_ns, size, True)
        rows, mode = [], "count"
    else:
        mode = "decode" if decode else "packets"
        if not decode:
            rows.sort(key=lambda r: r[0])
    n = len(pts)
    if n == 0:
        raise VideoReadError(f"{path}: no frame could be decoded")
    if mode == "count":
        times = tuple(i / fps for i in range(n)) if fps > 0 else ()
    else:
        times = tuple(float((p - min(pts)) * tb) for p in sorted(pts))
        if fps <= 0 and n > 1 and times[-1] > 0:
            fps = (n - 1) / times[-1]
    if fps <= 0:
        raise VideoReadError(f"{path}: cannot tell the frame rate")
    last = float(rows[-1][3] * tb) if rows and rows[-1][3] else 1 / fps
    keys = [i for i, r in enumerate(rows) if r[2]]
    return _Index(VideoMeta(fps, n, times[-1] + last, w, h), mode,
                  {r[0]: i for i, r in enumerate(rows)}, times, tuple(keys),
                  tuple(rows[i][0] for i in keys))


_DISTRUSTED = set()  # (path, mtime_ns, size) of files whose packet table a read proved wrong
_NO_SKIP = set()  # of the files read with frame skipping, those where a read met a mismatch
_PROMISED = {}  # of those, the ones that decode fewer frames than their packets: -> that count


def _index(path: PathLike) -> tuple:
    """(cache key, _Index) of a video file."""
    try:
        st = os.stat(path)
    except OSError:
        raise VideoReadError(f"{path}: no such video file") from None
    key = (str(path), st.st_mtime_ns, st.st_size)
    return key, _scan(*key, key in _DISTRUSTED)


def video_meta(path: PathLike) -> VideoMeta:
    """fps, frame count (that of a sequential decode), duration and size of a video file;
    cached per (path, mtime, size)."""
    return _index(path)[1].meta


def read_frames(path: PathLike, indices: Sequence[int]) -> torch.Tensor:
    """Frames `indices` (any order, repeats allowed) of a video file as uint8 (T, H, W, 3).

    Frame i is the i-th frame of a sequential decode (what decord returns); indices past the
    end are clamped to the last frame. Wanted frames close together share one seek to the
    keyframe before them; only wanted frames are converted to RGB. Raises VideoReadError if a
    frame the file's packets promised does not decode (truncated file), never repeating one.
    The table and its exact fallbacks are described in the module docstring.
    """
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError(f"{path}: read_frames needs at least one frame index")
    if min(indices) < 0:
        raise ValueError(f"{path}: negative frame index {min(indices)}")
    key, idx = _index(path)
    n, promised = idx.meta.num_frames, _PROMISED.get(key, 0)
    if max(indices) >= n and promised > n:  # the same answer as the read that found it out
        raise VideoReadError(f"{path}: frame {min(max(indices), promised - 1)} does not "
                             f"decode: {n} of its {promised} frames do")
    try:
        try:
            return _read(path, idx, indices, SKIP_NONREF and key not in _NO_SKIP)
        except _SkipMismatch:  # a mismatch seen only with frames skipped: read without
            _NO_SKIP.add(key)
            return _read(path, idx, indices, False)
    except _Mismatch as e:  # only a packet table is checked this way: rebuild by decoding
        _DISTRUSTED.add(key)
        promised, idx = idx.meta.num_frames, _index(path)[1]
        n = idx.meta.num_frames
        if n < promised:
            _PROMISED[key] = promised
            if max(indices) >= n:
                raise VideoReadError(f"{path}: frame {min(max(indices), promised - 1)} does "
                                     f"not decode ({e}): {n} of its {promised} frames do") from None
        return _read(path, idx, indices)


def _read(path: PathLike, idx: _Index, indices: list, skip: bool = True) -> torch.Tensor:
    """`read_frames` with one frame table; raises _Mismatch where a packet table proves wrong
    (_SkipMismatch if non-reference frames were skipped, `skip`, on that read)."""
    indices = [min(i, idx.meta.num_frames - 1) for i in indices]
    wanted = sorted(set(indices))
    runs = [[wanted[0]]]
    for i in wanted[1:]:  # runs of wanted frames, each reached by one seek
        k = bisect.bisect_right(idx.keys, i) - 1
        if (idx.keys[k] if k >= 0 else 0) - runs[-1][-1] > RESEEK_FRAMES:
            runs.append([])
        runs[-1].append(i)
    got, nal = {}, None
    try:
        with _open(path) as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            if skip and idx.mode == "packets":
                nal = _avcc_length_size(s.codec_context)
            for run in runs:
                got.update(_decode_run(path, c, s, idx, run, nal=nal))
    except (av.FFmpegError, _Mismatch) as e:
        if idx.mode == "packets":
            raise (_Mismatch if nal is None else _SkipMismatch)(str(e)) from None
        raise VideoReadError(f"{path}: decoding failed ({e})") from None
    return torch.from_numpy(np.stack([got[i] for i in indices]))


def _avcc_length_size(cc) -> Optional[int]:
    """Bytes of the NAL-unit length prefix of an H.264 stream stored as in MP4 and Matroska
    (an avcC record as extradata: 1, 2 or 4); None for any other codec or layout (Annex B
    start codes, as in AVI and raw .h264), which are read without frame skipping."""
    extra = cc.extradata
    if cc.name != "h264" or not extra or len(extra) < 7 or extra[0] != 1:
        return None
    size = (extra[4] & 3) + 1
    return size if size in (1, 2, 4) else None


def is_nonref_picture(data: bytes, length_size: int) -> bool:
    """Whether an H.264 access unit (length-prefixed NAL units) is a non-reference picture that
    can go undecoded: at least one coded slice (NAL type 1), every slice with nal_ref_idc 0,
    and besides them only access-unit delimiters (9) and filler (12). Anything else (IDR
    slices, parameter sets, SEI, partitions, a malformed length) answers False."""
    j, slices = 0, 0
    while j < len(data):
        if j + length_size >= len(data):
            return False
        n = int.from_bytes(data[j:j + length_size], "big")
        header = data[j + length_size]  # forbidden_zero_bit, nal_ref_idc (2 bits), nal_unit_type
        kind, ref_idc = header & 0x1F, (header >> 5) & 3
        if n == 0 or j + length_size + n > len(data) or header & 0x80:
            return False
        if kind == 1 and ref_idc == 0:
            slices += 1
        elif kind not in (9, 12):
            return False
        j += length_size + n
    return slices > 0


def _decode_run(path, c, s, idx: _Index, run: list, key: Optional[int] = None,
                nal: Optional[int] = None) -> dict:
    """{index: RGB array} for `run` (sorted unique indices), decoded after one seek.

    Seeks to keyframe `key` (a position in idx.keys; default: the last at or before run[0])
    and steps back a keyframe whenever the seek lands after run[0] (demuxers whose index holds
    dts may); key -1 and "count" mode decode a fresh container of `path` from its first
    packet, with no seek (a seek to the smallest timestamp can land on the second keyframe).
    Each decoded frame is named by its pts in the table ("count": by its position). `nal`:
    the NAL length size of an H.264 stream whose unwanted non-reference pictures are skipped
    (None: decode every packet). Raises _Mismatch where the decoded frames contradict the table.
    """
    key = -1 if idx.mode == "count" else (bisect.bisect_right(idx.keys, run[0]) - 1
                                           if key is None else key)
    if key < 0:
        with _open(path) as fresh:
            stream = fresh.streams.video[0]
            stream.thread_type = "AUTO"
            return _decode_frames(path, c, s, idx, run, key, fresh, stream, nal)
    c.seek(idx.key_ts[key], stream=s, backward=True)
    return _decode_frames(path, c, s, idx, run, key, c, s, nal)


def _decoded(container, stream, idx: _Index, want: set, nal: Optional[int], skipped: set):
    """The frames of `stream` from where `container` stands; with `nal`, the packets of
    non-reference pictures whose frames are not in `want` are not decoded (keyframes, the
    seek points, always are): their frame indices are added to `skipped` as they are passed."""
    if nal is None:
        yield from container.decode(stream)
        return
    for packet in container.demux(stream):
        i = idx.rank.get(packet.pts)
        if (packet.size and i is not None and i not in want and not packet.is_keyframe
                and is_nonref_picture(bytes(packet), nal)):
            skipped.add(i)
            continue
        yield from stream.decode(packet)


def _decode_frames(path, c, s, idx: _Index, run: list, key: int, container, stream,
                   nal: Optional[int]) -> dict:
    """The frames of `run` among the frames decoded from `container`'s `stream` after a seek
    to keyframe `key` (or from its start), unwanted non-reference pictures skipped if `nal`."""
    got, want, last, skipped = {}, set(run), None, set()
    decoded = _decoded(container, stream, idx, want, nal, skipped)
    # One converter for the run: Frame.to_ndarray builds a new one per frame, which costs
    # ~3 ms a frame with threaded decoding (the pixels are the same).
    rgb = VideoReformatter()
    if idx.mode == "count":
        frames = enumerate(decoded)
    else:
        frames = ((idx.rank.get(f.pts), f) for f in decoded)
    for i, f in frames:
        if i is None:
            raise _Mismatch(f"decoded a frame with pts {f.pts}, not in the table")
        if last is None and i > run[0]:  # the seek landed after the first wanted frame
            if key < 0:
                raise _Mismatch(f"decoding from the start begins at frame {i}, not {run[0]}")
            return _decode_run(path, c, s, idx, run, key - 1, nal)
        if idx.mode == "packets" and last is not None:
            after = last + 1  # the next frame, past the ones skipped undecoded
            while after in skipped:
                after += 1
            if i != after or i in skipped:
                raise _Mismatch(f"decoded frame {i} right after frame {last}"
                                + (f" ({len(skipped)} skipped)" if skipped else ""))
        if i in want:
            got[i] = rgb.reformat(f, format="rgb24").to_ndarray()
        if i >= run[-1]:
            break
        last = i
    if len(got) < len(run):
        raise _Mismatch(f"frame {min(want - got.keys())} is never decoded")
    return got


def read_frames_at(path: PathLike, timestamps: Sequence[float]) -> torch.Tensor:
    """Frames on screen at `timestamps` (seconds from the first frame) as uint8 (T, H, W, 3):
    the last frame whose real presentation time is <= t, so variable frame rates are right
    (frames without timestamps, "count" mode: frame i is shown from i / fps)."""
    times = _index(path)[1].times
    return read_frames(path, [max(0, bisect.bisect_right(times, t + TIME_EPS) - 1)
                              for t in timestamps])


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
                gop: int = 12, crf: int = 18, pts: Optional[Sequence[int]] = None,
                options: Optional[dict] = None) -> Path:
    """Encode uint8 (T, H, W, 3) RGB frames (tensor or array); returns the path.

    `codec`: libx264, mpeg4, msmpeg4 (v3), msmpeg4v2, libvpx-vp9, cinepak (PyAV 18 encoders);
    all as yuv420p (H and W must be even) but cinepak, as rgb24. `crf` sets the quality of
    x264 and vp9, the others get a generous bit rate. `gop`: frames between keyframes.
    `pts`: increasing presentation times of the frames in units of 1 / `fps` (default 0, 1, 2,
    ...: a constant rate); gaps make a variable-rate file (AVI fills them with empty chunks).
    `options`: more encoder options (e.g. {"x264-params": "bframes=0"}), after the default ones.
    x264 output is not always byte-identical from run to run (about 1 file in 50 differs by a
    few bytes here, whatever the thread settings); the pictures agree.
    """
    frames = np.asarray(frames.cpu() if torch.is_tensor(frames) else frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"{path}: frames must be uint8 (T, H, W, 3), got "
                         f"{frames.dtype} {tuple(frames.shape)}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"{path}: yuv420p needs an even frame size, got {h}x{w}: crop or pad")
    if pts is not None and (len(pts) != t or any(b <= a for a, b in zip(pts, pts[1:]))):
        raise ValueError(f"{path}: pts must be {t} increasing integers, got {list(pts)}")
    require_av()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(10**5)
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height = w, h
        s.pix_fmt = "rgb24" if codec == "cinepak" else "yuv420p"
        s.codec_context.gop_size = gop
        if codec in ("libx264", "libvpx-vp9"):
            s.options = {"crf": str(crf), **({"b": "0"} if codec == "libvpx-vp9" else {}),
                         **(options or {})}
        else:
            s.codec_context.bit_rate = max(10**6, int(h * w * fps))
            if options:
                s.options = dict(options)
        for k, f in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")
            frame.pts, frame.time_base = (k if pts is None else int(pts[k])), 1 / rate
            c.mux(s.encode(frame))
        c.mux(s.encode())
    return Path(path)


def video_length(path: PathLike) -> int:
    """Frame count of a frame folder, or of a video file: the frames a sequential decode
    yields (of a truncated file, those that decode; see the module docstring)."""
    return frame_folder_length(path) if os.path.isdir(path) else video_meta(path).num_frames


def read_clip(path: PathLike, indices: Sequence[int]) -> torch.Tensor:
    """`read_frame_folder` for a folder, `read_frames` for a file: uint8 (T, H, W, 3)."""
    return read_frame_folder(path, indices) if os.path.isdir(path) else read_frames(path, indices)
