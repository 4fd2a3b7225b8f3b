"""common/propagation.py: propagation on hand-built features, DAVIS/JHMDB/VIP metrics on
hand-computed cases, the file readers and writers (MAT v5 written here by hand)."""
import math
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from common import propagation as P, synthetic


# ---- propagation ----
def unit(deg: float) -> list:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def line_feats(frames: list) -> torch.Tensor:
    """(T, 2, 1, W) features from per-frame lists of angles (degrees) along a 1 x W grid."""
    return torch.tensor([[unit(a) for a in fr] for fr in frames]).permute(0, 2, 1)[:, :, None]


def test_propagate_copies_labels_of_identical_frames():
    h, w, T = 3, 4, 6
    feats = torch.eye(h * w).view(h * w, h, w)[None].repeat(T, 1, 1, 1)  # one-hot per position
    first = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))
    out = P.propagate(feats, first, topk=1, context=4, radius=2.0)
    assert out.shape == (T, 3, h, w)
    assert torch.equal(out, first.expand(T, -1, -1, -1))
    # top-5: the query's own position in all 5 context frames (1 long-term + 4 short-term)
    out = P.propagate(feats, first, topk=5, context=4, radius=2.0)
    assert torch.allclose(out, first.expand(T, -1, -1, -1), atol=1e-6)


def test_propagate_radius_short_term_only():
    onehot = lambda ids: torch.eye(2)[ids].t()[:, None]  # noqa: E731  (K=2, 1, W)
    # long-term: frame 1 pos 0 only matches frame 0 pos 3 (distance 3 > radius 1): used
    feats = line_feats([[90, 90, 90, 0], [0, 90, 90, 90]])
    out = P.propagate(feats, onehot([0, 0, 0, 1]), topk=1, context=1, radius=1.0)
    assert torch.equal(out[1], onehot([1, 0, 0, 0]))
    # short-term: frame 2 pos 0 (25 deg) best matches frame 1 pos 4 (40 deg, label 1 from
    # frame 0's 60 deg keys), 4 cells away; masked unless radius > 4 (strict <)
    feats = line_feats([[0, 60, 60, 60, 60], [200, 200, 200, 200, 40], [25, 200, 200, 200, 200]])
    first = onehot([0, 1, 1, 1, 1])
    for radius, expected in ((2.0, 0), (4.0, 0), (4.01, 1)):
        out = P.propagate(feats, first, topk=1, context=1, radius=radius)
        assert out[1, :, 0, 4].argmax() == 1
        assert out[2, :, 0, 0].argmax() == expected, radius


def test_propagate_topk_softmax_and_soft_reuse():
    tau = 0.5
    deg = math.degrees(math.atan2(0.6, 0.8))  # unit vector (0.8, 0.6)
    feats = line_feats([[0, 90], [deg, 180], [deg, 180]])
    first = torch.eye(2)[:, None]  # pos 0 -> class 0, pos 1 -> class 1
    out = P.propagate(feats, first, topk=3, temperature=tau, context=1, radius=10.0)
    # frame 1 pos 0: keys 0.8 (frame 0, long-term), 0.8 (its short-term copy), 0.6, 0.6
    e = lambda s: math.exp(s / tau)  # noqa: E731
    soft = torch.tensor([2 * e(0.8), e(0.6)]) / (2 * e(0.8) + e(0.6))
    assert torch.allclose(out[1, :, 0, 0], soft, atol=1e-6)
    # frame 2 pos 0: top 3 = frame 1 pos 0 (1.0, its soft label), frame 0 pos 0 and pos 1
    want = (e(1.0) * soft + torch.tensor([e(0.8), e(0.6)])) / (e(1.0) + e(0.8) + e(0.6))
    assert torch.allclose(out[2, :, 0, 0], want, atol=1e-6)


def test_propagate_chunking_is_exact():
    g = torch.Generator().manual_seed(1)
    feats = torch.nn.functional.normalize(torch.randn(6, 8, 4, 5, generator=g), dim=1)
    first = torch.nn.functional.one_hot(torch.randint(0, 3, (4, 5), generator=g), 3)
    first = first.permute(2, 0, 1).float()
    full = P.propagate(feats, first, topk=4, context=3, radius=2.5, chunk=1000)
    assert torch.allclose(P.propagate(feats, first, topk=4, context=3, radius=2.5, chunk=3),
                          full, atol=1e-6)
    assert not torch.allclose(full[-1], full[0])  # labels did move
    with pytest.raises(ValueError, match="grid"):
        P.propagate(feats, first[:, :3], topk=4)


# ---- DAVIS metrics ----
def test_seg2bmap_hand_cases():
    square = np.zeros((4, 4), bool)
    square[1:3, 1:3] = True
    assert np.array_equal(P.seg2bmap(square), [[1, 1, 1, 0], [1, 0, 1, 0], [1, 1, 1, 0],
                                               [0, 0, 0, 0]])
    assert np.array_equal(P.seg2bmap([[0, 0], [0, 1]]), [[1, 1], [1, 0]])  # SE, last row/col
    assert np.array_equal(P.seg2bmap([[0, 1], [1, 1]]), [[1, 0], [0, 0]])
    assert not P.seg2bmap(np.ones((3, 3))).any()  # a full mask has no boundary


def test_j_measure():
    gt, pred = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    gt[0, :4] = True
    pred[0, 2:4] = pred[1, 0:2] = True
    assert P.j_measure(gt, pred) == pytest.approx(2 / 6)
    assert P.j_measure(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    assert P.j_measure(gt, np.zeros((4, 4))) == 0.0 and P.j_measure(np.zeros((4, 4)), gt) == 0.0
    void = np.zeros((4, 4), bool)
    void[1] = True  # the wrong prediction is void: J = 2 / 4
    assert P.j_measure(gt, pred, void) == pytest.approx(0.5)
    assert np.allclose(P.j_measure(np.stack([gt, gt]), np.stack([gt, pred])), [1, 1 / 3])
    with pytest.raises(ValueError, match="shape"):
        P.j_measure(gt, pred[:3])


def test_f_measure():
    empty = np.zeros((5, 12), bool)
    gt, pred = empty.copy(), empty.copy()
    gt[1, 1] = pred[1, 1] = pred[1, 8] = True  # boundaries: 4 pixels and 4 + 4 far ones
    assert P.f_measure(empty, empty) == 1.0
    assert P.f_measure(gt, empty) == 0.0 and P.f_measure(empty, gt) == 0.0
    assert P.f_measure(gt, pred, bound_th=2) == pytest.approx(2 * 0.5 / 1.5)  # P=1/2, R=1
    # diagonal shift by (1, 1), radius 1: the disk (a cross) misses 1 of 4 pixels each way
    a, b = np.zeros((12, 12), bool), np.zeros((12, 12), bool)
    a[5, 5] = b[6, 6] = True
    assert P.f_measure(a, b, bound_th=1) == pytest.approx(0.75)
    assert P.f_measure(a, b, bound_th=2) == 1.0  # (1, 1) is inside disk(2)
    # default tolerance on 100 x 100: ceil(0.008 * 141.4) = 2 pixels
    sq = np.zeros((100, 100), bool)
    sq[30:60, 30:60] = True
    shifted = [np.roll(sq, s, axis=1) for s in (0, 2, 3)]
    f = P.f_measure(np.stack([sq] * 3), np.stack(shifted))
    assert f.shape == (3,) and f[0] == 1.0 and f[1] == 1.0 and f[2] < 1.0


def test_db_statistics():
    x = [1.0, 0.8, 0.5, 0.4, 0.3, 0.2, 0.0]  # bins [0:3], ..., [5:7]; halves round up
    mean, recall, decay = P.db_statistics(x)
    assert mean == pytest.approx(3.2 / 7) and recall == pytest.approx(2 / 7)
    assert decay == pytest.approx((1.0 + 0.8 + 0.5) / 3 - 0.1)
    assert P.db_statistics([np.nan, 1.0, 0.0])[:2] == pytest.approx((0.5, 1 / 3))


def davis_seq(T=5, objects=2):
    gt = np.zeros((T, 12, 12), np.uint8)
    for t in range(T):
        gt[t, 1:5, 1 + t:5 + t] = 1
        if objects > 1:
            gt[t, 7:11, 2:6] = 2
    return gt


def test_davis_jf():
    perfect = P.davis_jf([davis_seq()], [davis_seq()])
    assert perfect == {"J&F-Mean": 1.0, "J-Mean": 1.0, "J-Recall": 1.0, "J-Decay": 0.0,
                       "F-Mean": 1.0, "F-Recall": 1.0, "F-Decay": 0.0}
    gt = davis_seq()
    gt[2, 0, :] = 255  # void counts as background
    pred = davis_seq()
    pred[0] = 1
    pred[-1] = 7  # first and last frames are not scored
    assert P.davis_jf([gt], [pred]) == perfect
    missed = davis_seq()
    missed[missed == 2] = 0  # object 2 never predicted: J = F = 0 for it, per object mean
    r = P.davis_jf([davis_seq(objects=1), davis_seq()], [davis_seq(objects=1), missed])
    assert r["J-Mean"] == pytest.approx(2 / 3) and r["F-Mean"] == pytest.approx(2 / 3)
    assert r["J&F-Mean"] == pytest.approx(2 / 3) and r["J-Recall"] == pytest.approx(2 / 3)
    gt = davis_seq()
    gt[0, 0, 0] = 255  # void in frame 0 does not count as object 255
    assert P.davis_jf([gt], [missed])["J-Mean"] == pytest.approx(1 / 2)
    bad = davis_seq()
    bad[2, 0, 0] = 3
    with pytest.raises(ValueError, match="id 3"):
        P.davis_jf([davis_seq()], [bad])


def test_onehot_label_round_trip():
    label = np.kron(np.arange(12).reshape(3, 4) % 4, np.ones((8, 8), np.uint8))  # 24 x 32
    onehot = P.label_to_onehot(label, 4, (3, 4))
    assert onehot.shape == (4, 3, 4) and set(onehot.unique().tolist()) == {0.0, 1.0}
    assert np.array_equal(P.soft_to_label(onehot, (24, 32)).numpy(), label)
    assert torch.allclose(P.label_to_onehot([[0, 1], [1, 1]], 2, (1, 1))[:, 0, 0],
                          torch.tensor([0.25, 0.75]))
    line = np.zeros((16, 16), np.int64)
    line[0] = 1  # no antialiasing, as cv2 INTER_LINEAR: samples at 3.5 and 11.5 miss row 0
    assert P.label_to_onehot(line, 2, (2, 2))[1].sum() == 0
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        P.label_to_onehot(line + 1, 2, (2, 2))


# ---- DAVIS files ----
def test_read_davis(tmp_path):
    root = synthetic.davis(tmp_path / "davis", sequences=2, frames=5, size=(48, 64))
    seqs = P.read_davis(root)
    assert [s[0] for s in seqs] == ["synth00", "synth01"]
    for name, frames, masks in seqs:
        assert len(frames) == len(masks) == 5 and frames[0].name == "00000.jpg"
        label = P.read_label_png(masks[0])
        assert label.dtype == np.uint8 and label.shape == (48, 64) and label.max() >= 2
    shutil.rmtree(root / "JPEGImages/480p/synth01")
    with pytest.raises(FileNotFoundError, match="synth01"):
        P.read_davis(root)
    with pytest.raises(FileNotFoundError, match="test.txt"):
        P.read_davis(root, split="test")


def test_label_png_round_trip(tmp_path):
    label = np.arange(60, dtype=np.uint8).reshape(6, 10) % 7
    label[0, 0] = 255
    P.write_label_png(tmp_path / "a/00000.png", label)
    with Image.open(tmp_path / "a/00000.png") as im:
        assert im.mode == "P" and im.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    assert np.array_equal(P.read_label_png(tmp_path / "a/00000.png"), label)
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png"):
        P.read_label_png(tmp_path / "rgb.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        P.read_label_png(tmp_path / "missing.png")


# ---- JHMDB ----
def mat_element(e: str, mtype: int, payload: bytes, small: bool = True) -> bytes:
    if small and len(payload) <= 4:
        return struct.pack(e + "I", len(payload) << 16 | mtype) + payload.ljust(4, b"\0")
    return struct.pack(e + "II", mtype, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def mat_variable(e: str, name: str, arr: np.ndarray, cls: int, mtype: int, dtype: str,
                 compress: bool = False) -> bytes:
    body = (mat_element(e, 6, struct.pack(e + "II", cls, 0), small=False)
            + mat_element(e, 5, np.array(arr.shape, e + "i4").tobytes(), small=False)
            + mat_element(e, 1, name.encode())
            + mat_element(e, mtype, np.asarray(arr).astype(e + dtype).tobytes(order="F")))
    var = struct.pack(e + "II", 14, len(body)) + body
    return struct.pack(e + "II", 15, len(z := zlib.compress(var))) + z if compress else var


@pytest.mark.parametrize("e", ["<", ">"])
def test_read_mat_v5(tmp_path, e):
    pos = np.arange(2 * 15 * 3, dtype=np.float64).reshape(2, 15, 3) / 4 + 1
    scale = np.array([[3.0, 250.0, 7.0]])
    head = b"MATLAB 5.0 MAT-file, written by the test".ljust(116) + bytes(8)
    head += struct.pack(e + "HH", 0x0100, 0x4D49)  # version, endian indicator "MI"
    data = (head + mat_variable(e, "pos_img", pos, 6, 9, "f8")
            + mat_variable(e, "scale", scale, 6, 2, "u1", compress=True)  # double stored as uint8
            + mat_variable(e, "viewpoint", np.array([[69, 48]]), 4, 4, "u2", compress=True)
            + mat_variable(e, "n", np.array([[-5]]), 10, 3, "i2"))  # 2-byte payload: small element
    path = tmp_path / "joint_positions.mat"
    path.write_bytes(data)
    out = P.read_mat_v5(path)
    assert sorted(out) == ["n", "pos_img", "scale"]  # the char array is skipped
    assert out["pos_img"].shape == (2, 15, 3) and np.array_equal(out["pos_img"], pos)
    assert out["pos_img"][1, 4, 2] == pos[1, 4, 2]  # column-major order restored
    assert out["scale"].dtype == np.float64 and np.array_equal(out["scale"], scale)
    assert out["n"].dtype == np.int16 and out["n"][0, 0] == -5
    assert list(P.read_mat_v5(path, ["scale"])) == ["scale"]
    with pytest.raises(ValueError, match="'viewpoint' is a char"):
        P.read_mat_v5(path, ["viewpoint"])
    with pytest.raises(ValueError, match="no variable 'pos_world'"):
        P.read_mat_v5(path, ["pos_world"])
    (tmp_path / "bad.mat").write_bytes(b"not a mat file" * 20)
    with pytest.raises(ValueError, match="bad.mat"):
        P.read_mat_v5(tmp_path / "bad.mat")


def test_joint_heatmaps_and_points():
    pts = np.array([[5.3, 2.7], [0.7, 0.7], [-5.0, 3.0], [7.0, 4.0]])
    maps = P.joint_heatmaps(pts, (8, 10))
    assert maps.shape == (5, 8, 10)
    peak = lambda m: divmod(int(m.argmax()), 10)  # noqa: E731  (row, col)
    assert peak(maps[1]) == (3, 5) and maps[1, 3, 5] == 1.0
    assert maps[1, 3, 4] == pytest.approx(math.exp(-2)) and (maps[1] > 0).sum() == 16
    assert peak(maps[2]) == (2, 2)  # int(0.7 - 1.5) = 0, not -1: one cell further
    assert (maps[2] > 0).sum() == 9 and maps[3].sum() == 0  # clipped window; outside the grid
    assert torch.equal(maps[0], (maps[1:].sum(0) == 0).float())
    got = P.heatmaps_to_points(maps[1:])
    assert torch.allclose(got[3], torch.tensor([7.0, 4.0]))  # symmetric top-5 -> the centre
    assert torch.equal(got[2], torch.tensor([-1.0, -1.0]))  # empty map
    m = torch.zeros(1, 3, 4)
    m[0, 0, 1], m[0, 2, 3] = 3.0, 1.0
    assert torch.allclose(P.heatmaps_to_points(m), torch.tensor([[1.5, 0.5]]))


def test_pck():
    gt = np.array([[[50, 50], [60, 60], [70, 70]],  # frame 0: skipped
                   [[0, 0], [10, 0], [5, 0]],  # box diagonal 10 -> scale 6
                   [[0, 0], [0, 20], [-30, 40]]], float)  # joint 2 not counted: scale 12
    pred = np.array([[[0, 0], [0, 0], [0, 0]],
                     [[0.5, 0], [11, 0], [5, 0]],  # d/scale 0.083, 0.167, 0
                     [[1, 1], [0, 23], [-1, -1]]], float)  # 0.118, 0.25, excluded
    r = P.pck(pred, gt)
    assert r["PCK@0.1"] == pytest.approx((50 + 0 + 100) / 3)
    assert r["PCK@0.2"] == pytest.approx((100 + 50 + 100) / 3)
    # a second, shorter video, all wrong: counts are pooled per joint over videos
    r = P.pck([pred, pred[:2] + [[0, 0]] * 3 + 100 * (np.arange(2) == 1)[:, None, None]],
              [gt, gt[:2]], alphas=(0.1, 0.2))
    assert r["PCK@0.1"] == pytest.approx((100 / 3 + 0 + 50) / 3)
    assert r["PCK@0.2"] == pytest.approx((200 / 3 + 100 / 3 + 50) / 3)


# ---- VIP ----
def test_confusion_miou():
    gt, pred = np.array([0, 0, 1, 1, 255]), np.array([0, 1, 1, 1, 0])
    hist = P.confusion(gt, pred, num_classes=3)
    assert np.array_equal(hist, [[1, 1, 0], [0, 2, 0], [0, 0, 0]])  # GT 255 ignored
    assert P.miou(hist) == pytest.approx((1 / 2 + 2 / 3) / 2)  # class 2 absent: nan, ignored
    with pytest.raises(ValueError, match="predicted ids"):
        P.confusion(gt, pred + 3, num_classes=3)


# ---- benchmark drivers ----
def position_features(stride: int):
    """A feature function whose features are one-hot grid positions: every frame matches frame
    0 cell for cell, so propagation must return frame 0's labels as the grid sees them."""
    def fn(x):
        h, w = x.shape[-2] // stride, x.shape[-1] // stride
        return torch.eye(h * w).view(h * w, h, w)[None].expand(len(x), -1, -1, -1)
    return fn


def frame0_prediction(gt0: np.ndarray, size, grid, num) -> torch.Tensor:
    """What position features must predict at every frame: frame 0's one-hot at the grid, then
    bilinear upsampling to `size` and argmax."""
    return P.soft_to_label(P.label_to_onehot(torch.from_numpy(gt0).long(), num, grid), size)


def test_eval_davis_pipeline(tmp_path):
    root = synthetic.davis(tmp_path / "d", size=(48, 64), sequences=2, frames=6)
    scores, preds = P.eval_davis(position_features(8), root, size=(48, 64), out_dir=tmp_path / "o")
    gts, want = [], []
    for name, frames, masks in P.read_davis(root):
        gt = np.stack([P.read_label_png(m) for m in masks])
        gts.append(gt)
        want.append(np.repeat(frame0_prediction(gt[0], (48, 64), (6, 8), int(gt[0].max()) + 1)
                              .numpy()[None].astype(np.uint8), len(gt), 0))
    for (name, _, pred), w in zip(preds, want):
        assert np.array_equal(pred.numpy(), w), name
        assert np.array_equal(P.read_label_png(tmp_path / "o" / name / "00003.png"), w[3])
    assert scores == P.davis_jf(gts, want)
    assert 0.05 < scores["J&F-Mean"] < 0.95  # objects move: frame 0 masks are partly right
    # native-size scoring: predictions at 96 x 128 are NEAREST-resized to the 48 x 64 GT
    s2, p2 = P.eval_davis(position_features(16), root, size=(96, 128), gt_at_eval_size=False)
    assert p2[0][2].shape == (6, 48, 64) and 0.05 < s2["J&F-Mean"] < 0.95


def test_eval_jhmdb_pipeline(tmp_path):
    """Static joints on identical frames: PCK of the frame-0 heatmaps' soft-argmax."""
    e, lines, preds, gts = "<", [], [], []
    g = np.random.default_rng(0)
    for v in range(2):
        folder = tmp_path / "Rename_Images" / f"v{v}"
        folder.mkdir(parents=True)
        for t in range(4):
            Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(folder / f"{t + 1:05d}.png")
        pts = np.stack([g.uniform(2, 62, 15), g.uniform(2, 46, 15)])  # (2, 15) pixels
        pos = np.repeat(pts[:, :, None], 4, 2) + 1  # MATLAB 1-based
        head = b"MATLAB 5.0 MAT-file".ljust(116) + bytes(8) + struct.pack(e + "HH", 0x0100, 0x4D49)
        mat = tmp_path / "joint_positions" / f"v{v}" / "joint_positions.mat"
        mat.parent.mkdir(parents=True)
        mat.write_bytes(head + mat_variable(e, "pos_img", pos, 6, 9, "f8"))
        lines.append(f"joint_positions/v{v}/joint_positions.mat Rename_Images/v{v}\n")
        scale = np.array([16 / 64, 16 / 48])  # grid 16 x 16 at 64 x 64 with stride 4
        maps = P.joint_heatmaps(pts.T * scale, (16, 16))
        p0 = P.heatmaps_to_points(maps[1:]).numpy() / scale
        preds.append(np.repeat(p0[None], 4, 0))
        gts.append(np.repeat(pts.T[None], 4, 0))
    (tmp_path / "list.txt").write_text("".join(lines))
    got = P.eval_jhmdb(position_features(4), tmp_path / "list.txt", size=(64, 64))
    assert got == pytest.approx(P.pck(preds, gts))
    assert got["PCK@0.2"] > 50
    (tmp_path / "bad.txt").write_text("only-one-field\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        P.eval_jhmdb(position_features(4), tmp_path / "bad.txt")


def test_vip_size_and_eval_vip_pipeline(tmp_path):
    assert P.vip_size(720, 1280) == (448, 880) and P.vip_size(1280, 720) == (880, 448)
    assert P.vip_size(40, 70, long_side=128) == (64, 128)
    img, ann = tmp_path / "Images" / "videos1", tmp_path / "Annotations" / "Category_ids" / "videos1"
    img.mkdir(parents=True)
    ann.mkdir(parents=True)
    gt = np.zeros((40, 70), np.uint8)
    gt[5:25, 10:40], gt[20:38, 45:66] = 3, 12
    for t in range(3):
        Image.fromarray(np.zeros((40, 70, 3), np.uint8)).save(img / f"{t:06d}.jpg")
        Image.fromarray(gt).save(ann / f"{t:06d}.png")
    (tmp_path / "vip.txt").write_text("Images/videos1 Annotations/Category_ids/videos1\n")
    got = P.eval_vip(position_features(8), tmp_path / "vip.txt", long_side=128)
    pred = P.resize_nearest(frame0_prediction(gt, (64, 128), (8, 16), 20), gt.shape).numpy()
    assert got["mIoU"] == pytest.approx(P.miou(3 * P.confusion(gt, pred)))
    assert 0.5 < got["mIoU"] < 1.0


def test_overlay_and_read_pair_list_errors(tmp_path):
    frame = torch.full((3, 2, 2), 100, dtype=torch.uint8)
    out = P.overlay(frame, torch.tensor([[0, 1], [2, 0]]), alpha=0.5)
    assert torch.equal(out[:, 0, 0], frame[:, 0, 0])
    assert out[:, 0, 1].tolist() == [114, 50, 50]  # id 1 = (128, 0, 0)
    with pytest.raises(FileNotFoundError, match="VIP file list"):
        P.read_pair_list(tmp_path / "none.txt", "VIP")
    (tmp_path / "l.txt").write_text("a b\n")
    with pytest.raises(FileNotFoundError, match="l.txt:1"):
        P.read_pair_list(tmp_path / "l.txt", "VIP")


# ---- first-frame labels and final resizes in the official order (issue 10, item 7) ----
def cv2_nearest(label: np.ndarray, size) -> np.ndarray:
    """cv2 INTER_NEAREST written as integers: source index floor(i * in / out)."""
    (h0, w0), (h, w) = label.shape, size
    return label[(np.arange(h) * h0) // h][:, (np.arange(w) * w0) // w]


def pil_nearest(label: np.ndarray, size) -> np.ndarray:
    return np.array(Image.fromarray(label).resize(size[::-1], Image.NEAREST))


def reduce_by_16(label: np.ndarray, num: int) -> torch.Tensor:
    """One-hot, then cv2 INTER_LINEAR by exactly 1/16 (no antialiasing): each cell centre
    (16 i + 7.5, 16 j + 7.5) averages the 2 x 2 pixels around it."""
    onehot = (label[None] == np.arange(num)[:, None, None]).astype(np.float32)
    return torch.from_numpy(sum(onehot[:, 7 + a::16, 7 + b::16] for a in (0, 1) for b in (0, 1))
                            / 4)


def cell_features(stride: int, dim: int = 32):
    """Random features per grid cell, the same in every frame: with top-1, every frame copies
    frame 0's grid labels cell for cell (a cell matches itself at 1, any other cell below)."""
    def fn(x):
        h, w = x.shape[-2] // stride, x.shape[-1] // stride
        f = torch.randn(dim, h, w, generator=torch.Generator().manual_seed(0))
        return f[None].expand(len(x), -1, -1, -1)
    return fn


def thin_labels(h: int, w: int) -> np.ndarray:
    """1-pixel lines of three ids and a block: which columns a resize keeps changes the grid."""
    label = np.zeros((h, w), np.uint8)
    label[:, ::5], label[:, 2::7], label[:, 3::11] = 1, 2, 3
    label[h // 5:h // 2, w // 4:w // 2] = 4
    return label


def test_resize_nearest_pil_and_cv2():
    label = torch.arange(448 * 880, dtype=torch.int32).view(448, 880)
    want = pil_nearest(label.numpy(), (720, 1280))
    assert np.array_equal(P.resize_nearest(label, (720, 1280)).numpy(), want)
    exact = torch.nn.functional.interpolate(label[None, None].double(), size=(720, 1280),
                                            mode="nearest-exact")[0, 0].int()
    assert (exact.numpy() != want).sum() > 1000  # pixel centres in floats are not PIL
    for (h0, w0), size in [((720, 1280), (448, 880)), ((480, 854), (480, 880)),
                           ((480, 880), (480, 854)), ((240, 320), (480, 640))]:
        x = torch.arange(h0 * w0).view(h0, w0)
        assert np.array_equal(P.resize_nearest(x, size, "cv2").numpy(),
                              cv2_nearest(x.numpy(), size))
    x = torch.arange(720 * 1280).view(720, 1280)
    assert not torch.equal(P.resize_nearest(x, (448, 880), "cv2"),
                           P.resize_nearest(x, (448, 880)))
    batch = torch.randint(0, 5, (2, 3, 48, 64), dtype=torch.uint8)
    out = P.resize_nearest(batch, (20, 30), "cv2")
    assert out.shape == (2, 3, 20, 30) and out.dtype == torch.uint8
    assert torch.equal(out[1, 2], P.resize_nearest(batch[1, 2], (20, 30), "cv2"))
    with pytest.raises(ValueError, match="how"):
        P.resize_nearest(batch, (20, 30), "bilinear")


def test_eval_davis_first_frame_resized_before_reduction(tmp_path):
    """480 x 854 DAVIS at 480 x 880: the first annotation is nearest-resized to 480 x 880,
    then reduced to the 30 x 55 grid (official order), not reduced at its native size."""
    root, gt0 = tmp_path / "davis", thin_labels(480, 854)
    (root / "ImageSets/2017").mkdir(parents=True)
    (root / "ImageSets/2017/val.txt").write_text("seq\n")
    (root / "JPEGImages/480p/seq").mkdir(parents=True)
    for t in range(3):
        Image.new("RGB", (854, 480)).save(root / f"JPEGImages/480p/seq/{t:05d}.jpg")
        P.write_label_png(root / f"Annotations/480p/seq/{t:05d}.png", gt0)
    kw = dict(size=(480, 880), topk=1, context=2)
    # CropMAE: the DAVIS_480_880 copy (PIL NEAREST), scored at 480 x 880
    scores, preds = P.eval_davis(cell_features(16), root, **kw)
    official = P.soft_to_label(reduce_by_16(pil_nearest(gt0, (480, 880)), 5), (480, 880))
    native = P.soft_to_label(P.label_to_onehot(gt0, 5, (30, 55)), (480, 880))
    assert not torch.allclose(reduce_by_16(pil_nearest(gt0, (480, 880)), 5),
                              P.label_to_onehot(gt0, 5, (30, 55)))
    assert (official != native).float().mean() > 0.05  # the two orders disagree
    for t in range(3):
        assert torch.equal(preds[0][2][t].long(), official), t
    gt = np.stack([pil_nearest(gt0, (480, 880))] * 3)
    assert scores == P.davis_jf([gt], [np.stack([official.numpy().astype(np.uint8)] * 3)])
    # T-CoRe: native GT; the loader's cv2 resize, predictions cv2-resized back to 480 x 854
    _, preds = P.eval_davis(cell_features(16), root, gt_at_eval_size=False, **kw)
    official = P.soft_to_label(reduce_by_16(cv2_nearest(gt0, (480, 880)), 5), (480, 880))
    back = cv2_nearest(official.numpy(), (480, 854))
    assert np.array_equal(preds[0][2][1].numpy(), back)


def test_eval_vip_first_frame_and_final_resize_official_order(tmp_path):
    """720 x 1280 VIP: frame 0 cv2-nearest-resized to 448 x 880 then reduced to 28 x 55;
    predictions PIL-NEAREST-resized to the GT size (eval_vip)."""
    gt0 = thin_labels(720, 1280) * 4 + 3  # class ids 3..19
    img, ann = tmp_path / "Images/videos1", tmp_path / "Annotations/Category_ids/videos1"
    img.mkdir(parents=True)
    ann.mkdir(parents=True)
    for t in range(3):
        Image.new("RGB", (1280, 720)).save(img / f"{t:06d}.jpg")
        Image.fromarray(gt0).save(ann / f"{t:06d}.png")
    (tmp_path / "vip.txt").write_text("Images/videos1 Annotations/Category_ids/videos1\n")
    got = P.eval_vip(cell_features(16), tmp_path / "vip.txt", topk=1, context=2)["mIoU"]
    pred = P.soft_to_label(reduce_by_16(cv2_nearest(gt0, (448, 880)), 20), (448, 880))
    pred = pil_nearest(pred.numpy().astype(np.uint8), (720, 1280))
    assert got == pytest.approx(P.miou(3 * P.confusion(gt0, pred)), abs=1e-12)
    old = P.soft_to_label(P.label_to_onehot(gt0, 20, (28, 55)), (448, 880))  # native reduction
    old = torch.nn.functional.interpolate(old[None, None].float(), size=(720, 1280),
                                          mode="nearest-exact")[0, 0].numpy()
    assert abs(got - P.miou(3 * P.confusion(gt0, old))) > 1e-3


def test_pixel_features_are_the_patches():
    """The raw-pixel baseline: channel c*p*p + i*p + j of cell (y, x) is pixel (c, y*p + i,
    x*p + j), so propagation compares whole p x p RGB patches."""
    x = torch.arange(2 * 3 * 16 * 24, dtype=torch.float32).view(2, 3, 16, 24)
    f = P.pixel_features(x, 8)
    assert f.shape == (2, 192, 2, 3)
    assert torch.equal(f[1, :, 1, 2], x[1, :, 8:16, 16:24].reshape(-1))
    assert torch.equal(f[0, 64 + 8 * 3 + 5, 0, 1], x[0, 1, 3, 13])


def test_benchmark_drivers_run_without_tf32(tmp_path):
    """Every propagation driver evaluates in full fp32 (training may have turned TF32 on):
    the feature function sees the flag off, and it is restored afterwards."""
    root = synthetic.davis(tmp_path / "d", sequences=1, frames=3)
    seen, before = [], torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        def feat(x):
            seen.append(torch.backends.cuda.matmul.allow_tf32)
            return P.pixel_features(x, 8)
        P.eval_davis(feat, root, (96, 160))
        assert seen and not any(seen) and torch.backends.cuda.matmul.allow_tf32
        assert all(hasattr(f, "__wrapped__") for f in (P.eval_davis, P.eval_jhmdb, P.eval_vip))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
