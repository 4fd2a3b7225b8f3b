"""common/video.py: exact frames at indices and timestamps, metadata, frame folders, errors.

The ground truth for frame i is the i-th frame of a plain sequential decode with PyAV
(`sequential`). Most test videos have uniform frames whose brightness is 4 * k for frame k,
so the frame index can also be read back from the pixels (lossy codecs stay within +-2 of it).
"""
import shutil
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from common import video
from common.video import VideoReadError

N, H, W, FPS = 60, 48, 64, 25
# (container, codec) pairs the project writes or reads
FORMATS = ["libx264.mp4", "libx264.mkv", "mpeg4.avi", "msmpeg4.avi", "msmpeg4v2.avi",
           "cinepak.avi", "libvpx-vp9.webm"]


def ramp(n: int = N) -> np.ndarray:
    return np.stack([np.full((H, W, 3), 4 * k, np.uint8) for k in range(n)])


def frame_ids(frames: torch.Tensor, step: float = 4, offset: float = 0) -> list:
    """Frame index read back from the brightness (offset + step * k for frame k); asserts
    each frame is uniform."""
    x = frames.float()
    mean = x.mean((1, 2, 3))
    assert (x - mean[:, None, None, None]).abs().max() <= 3
    ids = ((mean - offset) / step).round()
    assert (mean - offset - step * ids).abs().max() <= 2
    return ids.long().tolist()


def sequential(path) -> np.ndarray:
    """All frames of a plain sequential decode, up to the first decoding error if any."""
    out = []
    with av.open(str(path)) as c:
        try:
            for f in c.decode(c.streams.video[0]):
                out.append(f.to_ndarray(format="rgb24"))
        except av.FFmpegError:
            pass
    return np.stack(out)


def packets(path) -> list:
    """(pts, size) of the video packets in demux order, the final flush packet left out."""
    with av.open(str(path)) as c:
        return [(p.pts, p.size) for p in c.demux(c.streams.video[0]) if p.size]


def assert_matches_sequential(path, seed: int = 0) -> np.ndarray:
    """Length, all frames at once, and every frame alone in random order, exactly equal to
    the sequential decode; returns that decode."""
    seq = sequential(path)
    assert video.video_length(path) == len(seq)
    assert np.array_equal(video.read_frames(path, range(len(seq))).numpy(), seq)
    for i in np.random.default_rng(seed).permutation(len(seq)):
        assert np.array_equal(video.read_frames(path, [i])[0].numpy(), seq[i]), i
    idx = np.random.default_rng(seed + 1).integers(0, len(seq), 12).tolist()
    assert np.array_equal(video.read_frames(path, idx).numpy(), seq[idx])
    return seq


@pytest.fixture(scope="module", params=FORMATS)
def clip(request, tmp_path_factory):
    codec = request.param.split(".")[0]
    path = tmp_path_factory.mktemp("v") / request.param
    return video.write_video(path, ramp(), FPS, codec, gop=12)


def test_matches_sequential_decode(clip):
    seq = assert_matches_sequential(clip)
    assert frame_ids(torch.from_numpy(seq)) == list(range(N))


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
    # 0 and 58 are keyframes apart (a second seek); 200 is past the end -> last frame.
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
    """Reading frames 40 and 42 decodes from the keyframe at or before 40, not from 0."""
    idx = video._index(clip)[1]
    assert idx.mode == "packets" and 36 in idx.keys
    with video._open(clip) as c:
        s = c.streams.video[0]
        cc = CountingContainer(c)
        got = video._decode_run(clip, cc, s, idx, [40, 42])
    assert sorted(got) == [40, 42]
    assert [round(got[i].mean() / 4) for i in (40, 42)] == [40, 42]
    assert 3 <= cc.decoded <= 12 + 3


def grey(levels) -> np.ndarray:
    return np.stack([np.full((H, W, 3), v, np.uint8) for v in levels])


def test_variable_frame_rate_mp4(tmp_path):
    """The bug report: 20 frames, 40 ms apart then 200 ms apart. Frame k has level 10 + 12 k;
    the old time x fps indexing returned frames 0, 2, 4, 7, 9, 10, 10, 11, 11, 12, ..."""
    path, tb = str(tmp_path / "vfr.mp4"), Fraction(1, 1000)
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.time_base = s.codec_context.time_base = tb
        for k, frame in enumerate(grey(10 + 12 * np.arange(20))):
            f = av.VideoFrame.from_ndarray(frame, format="rgb24")
            f.pts, f.time_base = (40 * k if k < 10 else 360 + 200 * (k - 9)), tb
            c.mux(s.encode(f))
        c.mux(s.encode())
    assert video.video_length(path) == 20
    assert frame_ids(video.read_frames(path, range(20)), 12, 10) == list(range(20))
    assert frame_ids(video.read_frames(path, [19]), 12, 10) == [19]
    assert frame_ids(video.read_frames(path, [15, 3, 19, 10]), 12, 10) == [15, 3, 19, 10]
    assert_matches_sequential(path)
    # frame k < 10 is shown from 0.04 k s, frame k >= 10 from 0.36 + 0.2 (k - 9) s
    ts = [0.0, 0.039, 0.04, 0.39, 0.40, 0.559, 0.56, 0.57, 1.0, 2.359, 2.36, 5.0, -1.0]
    want = [0, 0, 1, 9, 9, 9, 10, 10, 12, 18, 19, 19, 0]
    assert frame_ids(video.read_frames_at(path, ts), 12, 10) == want


def test_b_frames_mp4(tmp_path):
    """x264's default B-frames: packet pts do not rise in decode order."""
    path = video.write_video(tmp_path / "bf.mp4", ramp(), FPS, gop=12)
    pts = [p for p, _ in packets(path)]
    assert pts != sorted(pts)
    assert frame_ids(torch.from_numpy(assert_matches_sequential(path))) == list(range(N))


@pytest.mark.parametrize("codec", ["mpeg4", "msmpeg4"])
def test_avi_with_timestamp_gaps(tmp_path, codec):
    """FFmpeg's AVI muxer fills pts gaps with empty "dropped frame" chunks: the header counts
    them, the decoder yields only the real frames."""
    pts = [0, 1, 2, 10, 11, 30, 31, 32, 40, 41]
    path = video.write_video(tmp_path / "gaps.avi", ramp(len(pts)), FPS, codec, pts=pts)
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == pts[-1] + 1  # 42 chunks, 10 frames
    seq = assert_matches_sequential(path)
    assert len(seq) == len(pts) and frame_ids(torch.from_numpy(seq)) == list(range(len(pts)))
    ts = [0.0, 0.08, 0.39, 0.4, 1.19, 1.2, 5.0]
    assert frame_ids(video.read_frames_at(path, ts)) == [0, 2, 2, 3, 4, 5, 9]


def moving(n: int = N) -> np.ndarray:
    """Frames of a diagonal ramp panning 5 levels a frame and a red square moving 2 px a
    frame: motion that x264 codes with B-frames."""
    yy, xx = np.mgrid[0:H, 0:W]
    out = np.empty((n, H, W, 3), np.uint8)
    for k in range(n):
        out[k] = ((3 * xx + 2 * yy + 5 * k) % 256)[..., None]
        out[k, 10:20, (2 * k) % 50:(2 * k) % 50 + 10] = (250, 30, 30)
    return out


# x264 settings: B-frames with b-pyramid (the default: the middle B-frame of a group is a
# reference), B-frames that are never references, no B-frames (every frame a reference),
# interlaced coding (a picture-timing SEI in every picture: nothing is skipped); one keyframe
X264 = {name: {"x264-params": "scenecut=0" + extra} for name, extra in (
    ("pyramid", ""), ("flat", ":b-pyramid=none"), ("no-b", ":bframes=0"),
    ("interlaced", ":interlaced=1"))}


@pytest.fixture(scope="module", params=list(X264))
def x264_clip(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("x264") / f"{request.param}.mp4"
    return request.param, video.write_video(path, moving(), FPS, gop=N, options=X264[request.param])


def picture_types(path) -> dict:
    """pts -> picture type (1 I, 2 P, 3 B) of each decoded frame."""
    with av.open(str(path)) as c:
        return {f.pts: int(f.pict_type) for f in c.decode(c.streams.video[0])}


def test_nonref_pictures_are_the_unreferenced_b_frames(x264_clip):
    """The packets found to be non-reference pictures: every B-frame when no B-frame is a
    reference, a part of them with b-pyramid, none without B-frames or with SEI in each."""
    name, path = x264_clip
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        size = video._avcc_length_size(s.codec_context)
        skippable = {p.pts for p in c.demux(s)
                     if p.size and video.is_nonref_picture(bytes(p), size)}
    assert size == 4
    b = {pts for pts, kind in picture_types(path).items() if kind == 3}
    if name == "flat":
        assert skippable == b and len(b) > N // 4
    elif name == "pyramid":
        assert skippable and skippable < b and len(b - skippable) > N // 10
    else:
        assert not skippable and (name == "no-b") == (not b)


def test_is_nonref_picture_by_hand():
    """NAL headers: 0x01 non-ref slice, 0x41 slice with nal_ref_idc 2, 0x65 IDR, 0x06 SEI,
    0x09 access-unit delimiter; 2-byte length prefixes."""
    def au(*nals):
        return b"".join(len(n).to_bytes(2, "big") + n for n in nals)
    assert video.is_nonref_picture(au(b"\x01\x88\x84"), 2)
    assert video.is_nonref_picture(au(b"\x09\xf0", b"\x01\x9a", b"\x01\x9b"), 2)
    assert not video.is_nonref_picture(au(b"\x41\x9a"), 2)  # a reference P/B slice
    assert not video.is_nonref_picture(au(b"\x01\x9a", b"\x41\x9a"), 2)
    assert not video.is_nonref_picture(au(b"\x65\x88"), 2)
    assert not video.is_nonref_picture(au(b"\x06\x05\x01", b"\x01\x9a"), 2)  # SEI
    assert not video.is_nonref_picture(au(b"\x09\xf0"), 2)  # no slice
    assert not video.is_nonref_picture(au(b"\x01\x9a")[:-1], 2)  # cut short
    assert not video.is_nonref_picture(b"", 2)


def test_skipping_decoder_equals_a_full_decode(x264_clip):
    """Reads that skip the unwanted non-reference pictures give the frames of a full
    sequential decode, bit for bit, alone, in sets, and across the whole file; the frames
    skipped before a wanted frame are exactly the non-reference pictures among them."""
    name, path = x264_clip
    seq = assert_matches_sequential(path)
    idx = video._index(path)[1]
    assert idx.mode == "packets" and idx.keys == (0,)
    for sets in ([40], [7, 23, 39, 55], list(range(3, N, 4)), [N - 1, 0]):
        assert np.array_equal(video.read_frames(path, sets).numpy(), seq[sets])
    key = video._index(path)[0]
    assert key not in video._NO_SKIP and key not in video._DISTRUSTED  # no read fell back
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        size = video._avcc_length_size(s.codec_context)
        nonref = {idx.rank[p.pts] for p in c.demux(s)
                  if p.size and video.is_nonref_picture(bytes(p), size)}
        c.seek(0, stream=s, backward=True)
        skipped = set()
        decoded = []
        for f in video._decoded(c, s, idx, {40}, size, skipped):
            decoded.append(idx.rank[f.pts])
            if decoded[-1] == 40:
                break
    # all non-reference pictures before 40 and some after it (demuxed before 40 came out)
    assert {i for i in nonref if i < 40} <= skipped <= nonref - {40}
    assert set(decoded) == set(range(41)) - skipped  # every other frame, in order
    assert decoded == sorted(decoded)
    assert (name in ("no-b", "interlaced")) == (not skipped)


def test_a_mismatch_met_only_when_skipping_reads_without_skipping(tmp_path, monkeypatch):
    """Should the decoder, with pictures skipped, leave out a reference frame the table holds
    (simulated: the skipping path drops one), the read is redone without skipping (right
    frames), the file is read so from then on, and its packet table stays trusted."""
    path = video.write_video(tmp_path / "flat.mp4", moving(), FPS, gop=N,
                             options=X264["flat"])
    seq = sequential(path)
    kinds = [kind for _, kind in sorted(picture_types(path).items())]  # in frame order
    lost = next(i for i in range(9, N) if kinds[i] == 2)  # a P-frame: a reference
    real = video._decoded

    def losing(container, stream, idx, want, nal, skipped):
        for f in real(container, stream, idx, want, nal, skipped):
            if nal is None or idx.rank.get(f.pts) != lost:
                yield f
    monkeypatch.setattr(video, "_decoded", losing)
    key = video._index(path)[0]
    assert np.array_equal(video.read_frames(path, [lost + 6]).numpy(), seq[[lost + 6]])
    assert key in video._NO_SKIP and key not in video._DISTRUSTED
    assert np.array_equal(video.read_frames(path, [lost + 1, 3]).numpy(), seq[[lost + 1, 3]])
    assert video._index(path)[1].mode == "packets"


def test_h264_in_avi_falls_back_to_decode_order(tmp_path):
    """In AVI, H.264 packet pts are decode-order stamps: sorting them misorders B-frames. The
    first read that meets this rebuilds the table from one full decode, exactly."""
    path = video.write_video(tmp_path / "h264.avi", ramp(), FPS, gop=12)
    pts = [p for p, _ in packets(path)]
    assert pts == sorted(pts)
    with av.open(str(path)) as c:
        decoded = [f.pts for f in c.decode(c.streams.video[0])]
    assert decoded != sorted(decoded)  # frame pts of B-frames are out of order
    assert frame_ids(video.read_frames(path, [13, 14])) == [13, 14]  # a seek to frame 12
    assert video._index(path)[1].mode == "decode"
    seq = assert_matches_sequential(path)
    for i in range(N):  # the first read of a fresh copy is right too, whatever it asks
        fresh = shutil.copy(path, tmp_path / f"copy{i}.avi")
        assert np.array_equal(video.read_frames(fresh, [i, i + 1])[0].numpy(), seq[i]), i


def test_raw_h264_without_timestamps_counts_frames(tmp_path):
    path = video.write_video(tmp_path / "raw.h264", ramp(30), FPS, gop=12)
    assert all(p is None for p, _ in packets(path))
    assert frame_ids(torch.from_numpy(assert_matches_sequential(path))) == list(range(30))
    assert video._index(path)[1].mode == "count"
    assert frame_ids(video.read_frames_at(path, [0.0, 0.039, 0.04, 9.0])) == [0, 0, 1, 29]


def noisy(n: int) -> np.ndarray:
    """Frames of level 10 + 12 k under noise, so that they compress poorly."""
    noise = np.random.default_rng(0).integers(-40, 40, (n, H, W, 3))
    return np.clip(noise + 10 + 12 * np.arange(n)[:, None, None, None], 0, 255).astype(np.uint8)


def assert_no_repeated_last_frame(path, promised: int):
    """Indices the decoder lacks raise VideoReadError, unless the length excludes them."""
    seq = sequential(path)
    for i in range(promised):
        if i < len(seq):
            assert np.array_equal(video.read_frames(path, [i])[0].numpy(), seq[i]), i
        elif video.video_length(path) > len(seq):
            with pytest.raises(VideoReadError, match=str(path)):
                video.read_frames(path, [i])
    assert video.video_length(path) == len(seq)  # once a read has found out, at the latest


def test_truncated_mkv(tmp_path):
    good = video.write_video(tmp_path / "good.mkv", noisy(12), FPS)
    path = tmp_path / "cut.mkv"
    path.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    with av.open(str(path)) as c:  # the header still says 12 frames
        assert round(c.duration / av.time_base * FPS) == 12
    assert 0 < len(sequential(path)) < 12
    assert_no_repeated_last_frame(path, 12)


def test_truncated_mp4_reports_the_decodable_length_from_the_start(tmp_path):
    """moov first, mdat cut: the header lists 12 frames and the demuxer 6 packets, the last of
    them cut, but only 3 frames decode. The cut packet is seen by the demux pass, so the
    length is the decodable one before any read (in every process: no history), and the same
    call gives the same frames every time."""
    good = tmp_path / "good.mp4"
    with av.open(str(good), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for f in noisy(12):
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    path = tmp_path / "cut.mp4"
    path.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    assert 0 < len(packets(path)) < 12
    seq = sequential(path)
    assert video.video_length(path) == len(seq) < len(packets(path))  # before any read
    for _ in range(2):
        out = video.read_frames(path, [0, 5]).numpy()  # 5 lies past the end: clamped
        assert np.array_equal(out, seq[[0, len(seq) - 1]])
    assert_matches_sequential(path)


def test_h264_avi_whose_second_frame_is_a_keyframe_reads_frame_0(tmp_path):
    """Frame 1 differs so much that x264 makes it a keyframe: after the table is rebuilt by
    decoding, frame 0 is still read (decoding from the start does not seek)."""
    frames = np.zeros((40, 32, 48, 3), np.uint8)
    for i in range(40):
        frames[i] = (10 + 12 * i) % 256
        frames[i, (3 * i) % 28:(3 * i) % 28 + 4, :8] = 255
    path = video.write_video(tmp_path / "key1.avi", frames, FPS, "libx264", gop=7)
    seq = sequential(path)
    assert np.array_equal(video.read_frames(path, [5])[0].numpy(), seq[5])
    assert video._index(path)[1].mode == "decode"
    assert np.array_equal(video.read_frames(path, [0])[0].numpy(), seq[0])
    assert_matches_sequential(path)


def test_write_video_rejects_bad_frames(tmp_path):
    with pytest.raises(ValueError, match="even"):
        video.write_video(tmp_path / "odd.mp4", np.zeros((2, 47, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        video.write_video(tmp_path / "f.mp4", np.zeros((2, 48, 64, 3), np.float32))
    with pytest.raises(ValueError, match="increasing"):
        video.write_video(tmp_path / "p.mp4", np.zeros((2, 48, 64, 3), np.uint8), pts=[3, 3])


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
