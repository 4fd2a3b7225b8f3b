"""common/video.py: exact frames at indices and timestamps, metadata, frame folders, errors.

The test videos have 60 uniform frames whose brightness is 4 * k for frame k, so the frame
index can be read back from the pixels (lossy codecs stay within +-2 of it).
"""
import numpy as np
import pytest
import torch
from PIL import Image

from common import video
from common.video import VideoReadError

N, H, W, FPS = 60, 48, 64, 25


def ramp(n: int = N) -> np.ndarray:
    return np.stack([np.full((H, W, 3), 4 * k, np.uint8) for k in range(n)])


def frame_ids(frames: torch.Tensor) -> list:
    """Frame index read back from the brightness; asserts each frame is uniform."""
    x = frames.float()
    mean = x.mean((1, 2, 3))
    assert (x - mean[:, None, None, None]).abs().max() <= 3
    ids = (mean / 4).round()
    assert (mean - 4 * ids).abs().max() <= 2
    return ids.long().tolist()


@pytest.fixture(scope="module", params=["libx264.mp4", "mpeg4.avi", "libx264.mkv"])
def clip(request, tmp_path_factory):
    codec = request.param.split(".")[0]
    path = tmp_path_factory.mktemp("v") / request.param
    return video.write_video(path, ramp(), FPS, codec, gop=12)


def test_meta(clip):
    m = video.video_meta(clip)
    assert (m.fps, m.num_frames, m.width, m.height) == (FPS, N, W, H)
    assert m.duration == pytest.approx(N / FPS, abs=1 / FPS)
    assert video.video_length(clip) == N


def test_read_frames_exact(clip):
    idx = [37, 5, 5, 0, 13, 59, 12, 11, 24, 37]  # unsorted, repeated, mid-GOP, GOP edges, last
    out = video.read_frames(clip, idx)
    assert out.shape == (len(idx), H, W, 3) and out.dtype == torch.uint8
    assert frame_ids(out) == idx


def test_read_frames_far_apart_and_clamped(clip):
    # 0 and 58 are more than 2 s apart (a second seek); 200 is past the end -> last frame.
    assert frame_ids(video.read_frames(clip, [58, 0, 200, 1])) == [58, 0, N - 1, 1]


def test_read_frames_at(clip):
    ts = [0.0, 0.039, 0.04, 0.5, 1.01, 2.39]
    assert frame_ids(video.read_frames_at(clip, ts)) == [int(t * FPS + 1e-6) for t in ts]


class CountingContainer:
    """Wraps an open container to count the frames decoded."""

    def __init__(self, c):
        self.c, self.decoded = c, 0

    def seek(self, *a, **kw):
        self.c.seek(*a, **kw)

    def decode(self, s):
        for f in self.c.decode(s):
            self.decoded += 1
            yield f


def test_decode_run_seeks(clip):
    """Reading frames 40..42 decodes from the keyframe at 36, not from frame 0."""
    with video._open(clip) as c:
        s = c.streams.video[0]
        cc = CountingContainer(c)
        got = video._decode_run(cc, s, [40, 42], s.time_base, s.start_time or 0, FPS)
    assert sorted(got) == [40, 42]
    assert [round(got[i].mean() / 4) for i in (40, 42)] == [40, 42]
    assert 3 <= cc.decoded <= 12 + 3


def test_write_video_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="even"):
        video.write_video(tmp_path / "odd.mp4", np.zeros((2, 47, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        video.write_video(tmp_path / "f.mp4", np.zeros((2, 48, 64, 3), np.float32))


def test_write_video_tensor_vp9(tmp_path):
    path = video.write_video(tmp_path / "t.webm", torch.from_numpy(ramp(10)), 10, "libvpx-vp9")
    assert video.video_meta(path).num_frames == 10
    assert frame_ids(video.read_frames(path, [9, 3])) == [9, 3]


@pytest.mark.parametrize("content", [b"", b"random", b"truncated"])
def test_bad_files_raise(tmp_path, content):
    path = tmp_path / "bad.mp4"
    if content == b"random":
        content = np.random.default_rng(0).bytes(4000)
    elif content == b"truncated":
        good = video.write_video(tmp_path / "good.mp4", ramp(20))
        content = good.read_bytes()[:300]
    path.write_bytes(content)
    for fn in (video.video_meta, lambda p: video.read_frames(p, [0])):
        with pytest.raises(VideoReadError, match=str(path)):
            fn(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(VideoReadError, match="missing.mp4"):
        video.read_frames(tmp_path / "missing.mp4", [0])
    assert issubclass(VideoReadError, RuntimeError)


@pytest.mark.parametrize("width,ext", [(5, ".jpg"), (8, ".png")])
def test_frame_folder(tmp_path, width, ext):
    for k, f in enumerate(ramp(12)):
        Image.fromarray(f).save(tmp_path / f"{k + 1:0{width}d}{ext}", quality=95)
    (tmp_path / "notes.txt").write_text("not a frame")
    assert video.frame_folder_length(tmp_path) == 12
    out = video.read_clip(tmp_path, [11, 0, 9, 10, 30])
    assert out.shape == (5, H, W, 3) and out.dtype == torch.uint8
    assert frame_ids(out) == [11, 0, 9, 10, 11]


def test_frame_folder_errors(tmp_path):
    with pytest.raises(VideoReadError, match="no frames"):
        video.read_frame_folder(tmp_path, [0])
    (tmp_path / "00001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(VideoReadError, match="00001.jpg"):
        video.read_frame_folder(tmp_path, [0])
