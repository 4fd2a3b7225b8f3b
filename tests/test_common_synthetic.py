"""common/synthetic.py: formats readable by the real readers, class cues, determinism, cache."""
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import gaussian_blur

from common import data, synthetic as syn, video

FRAMES = 16


def files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return syn.images(tmp_path_factory.mktemp("img") / "ds", per_class_train=6, per_class_val=3)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    return syn.videos(tmp_path_factory.mktemp("vid") / "ds", frames=FRAMES,
                      per_class_train=2, per_class_val=1)


@pytest.fixture(scope="module")
def davis_root(tmp_path_factory):
    return syn.davis(tmp_path_factory.mktemp("davis") / "ds", sequences=3, frames=6)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SSL_REFS_CACHE", str(tmp_path))
    assert syn.cache_root() == tmp_path
    monkeypatch.delenv("SSL_REFS_CACHE")
    assert syn.cache_root() == Path.home() / ".cache/ssl-refs/synthetic"


# ---- images ----

def test_images_is_an_image_folder(image_root):
    for split, count in (("train", 6), ("val", 3)):
        ds = data.image_folder(image_root / split)
        assert ds.classes == sorted(syn.SHAPES) == list(syn.SHAPES)
        assert np.bincount(ds.targets).tolist() == [count] * len(syn.SHAPES)
        img, label = ds[len(ds) - 1]
        assert img.size == (64, 64) and img.mode == "RGB" and label == len(syn.SHAPES) - 1


def test_images_png_is_the_rendered_image(image_root):
    """Ties the in-memory renders used below to the files: sub-seed (seed, split, class, n)."""
    img, _ = syn._image(np.random.default_rng([0, 1, 3, 2]), syn.SHAPES[3], 64)
    assert np.array_equal(np.array(Image.open(image_root / f"val/{syn.SHAPES[3]}/0002.png")), img)


def test_images_deterministic(tmp_path):
    a = syn.images(tmp_path / "a", seed=0, size=32, per_class_train=2, per_class_val=1)
    b = syn.images(tmp_path / "b", seed=0, size=32, per_class_train=2, per_class_val=1)
    c = syn.images(tmp_path / "c", seed=1, size=32, per_class_train=2, per_class_val=1)
    fa, fc = files(a), files(c)
    assert len(fa) == 8 * 3 and fa == files(b)
    assert fa.keys() == fc.keys() and all(fa[k] != fc[k] for k in fa)
    assert Image.open(a / "train/star/0000.png").size == (32, 32)


def _renders(split: int, n: int):
    out = [(syn._image(np.random.default_rng([0, split, c, i]), shape, 64), c)
           for c, shape in enumerate(syn.SHAPES) for i in range(n)]
    imgs = np.stack([img for (img, _), _ in out]).astype(np.float32)
    masks = torch.stack([_normalised_mask(alpha) for (_, alpha), _ in out])
    return imgs, masks, np.array([c for _, c in out])


def _normalised_mask(alpha: np.ndarray) -> torch.Tensor:
    """The silhouette cropped to its bounding box, resized to 16x16 (position/scale removed)."""
    ys, xs = np.nonzero(alpha > 0.5)
    crop = torch.from_numpy(alpha[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    return F.interpolate(crop[None, None], size=(16, 16), mode="bilinear")[0, 0].flatten()


def _nearest_mean_accuracy(x_tr, y_tr, x_te, y_te) -> float:
    means = torch.stack([x_tr[y_tr == c].mean(0) for c in range(len(syn.SHAPES))])
    return (torch.cdist(x_te, means).argmin(1).numpy() == y_te).mean()


def test_images_class_is_in_the_shape_not_the_colour():
    imgs_tr, masks_tr, y_tr = _renders(0, 30)
    imgs_te, masks_te, y_te = _renders(1, 15)
    colour = lambda imgs: torch.from_numpy(imgs.mean((1, 2)))  # noqa: E731  mean RGB
    colour_acc = _nearest_mean_accuracy(colour(imgs_tr), y_tr, colour(imgs_te), y_te)
    shape_acc = _nearest_mean_accuracy(masks_tr, y_tr, masks_te, y_te)
    assert colour_acc < 0.3 and shape_acc > 0.9, (colour_acc, shape_acc)  # chance: 0.125
    # all silhouettes have the same area at the same scale, so the pixel count says nothing
    areas = [syn._draw(np.zeros((64, 64, 3)), s, 32, 32, 16, 0.3, (1, 1, 1)).sum()
             for s in syn.SHAPES]
    assert max(areas) / min(areas) < 1.03 and abs(np.mean(areas) / (np.pi * 12.8 ** 2) - 1) < 0.02


# ---- videos ----

def test_draw_angle_turns_clockwise_on_screen():
    """The object's right half (u > 0) ends below the centre after +90 degrees (y points down)."""
    img = np.zeros((64, 64, 3))
    alpha = syn._draw(img, "disk", 32, 32, 20, np.pi / 2, (1, 0, 0), (0, 1, 0), lambda u, v: u > 0)
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    green = img[..., 1]
    assert abs((alpha * xs).sum() / alpha.sum() - 32) < 0.1  # the disk is centred
    assert (green * ys).sum() / green.sum() > 37  # half-disk centroid: 32 + 4 * 16 / (3 pi)
    assert abs((green * xs).sum() / green.sum() - 32) < 0.5


def test_video_lists_agree(video_root):
    classes = [line.split() for line in (video_root / "classInd.txt").read_text().splitlines()]
    assert classes == [[str(i + 1), m] for i, m in enumerate(syn.MOTIONS)]
    for train, count in ((True, 16), (False, 8)):
        csv = data.read_video_csv(video_root / ("train.csv" if train else "val.csv"))
        ucf = data.read_ucf101_split(video_root, 1, train)
        assert len(csv) == count and csv == ucf
        assert all(os.path.isfile(r.path) and syn.MOTIONS[r.label] == Path(r.path).parent.name
                   for r in csv)
    ucf_labels = [int(line.split()[1]) - 1 for line in
                  (video_root / "trainlist01.txt").read_text().splitlines()]
    assert ucf_labels == [r.label for r in data.read_video_csv(video_root / "train.csv")]
    records, folder_classes = data.read_class_folders(video_root)
    assert folder_classes == list(syn.MOTIONS) and len(records) == 24


def motion(frames: np.ndarray) -> str:
    """The motion class measured on decoded (T, H, W, 3) frames. Least squares on the
    brightness-constancy equation I_t + grad(I) . v = 0 over the object's pixels, with
    v = (vx, vy) + spin * perp(x - c) + zoom * (x - c), says which motion dominates; the
    direction of a translation comes from the centroid of the changed pixels."""
    grey = frames.astype(np.float32).mean(-1)
    f = gaussian_blur(torch.from_numpy(grey)[:, None], 9, 1.5)[:, 0].numpy()
    ys, xs = np.mgrid[0:f.shape[1], 0:f.shape[2]].astype(np.float32)
    region = frames.astype(np.float32).std(0).sum(-1) > 20  # where the object passes
    x, y = xs - xs[region].mean(), ys - ys[region].mean()
    gy, gx = np.gradient((f[1:] + f[:-1]) / 2, axis=(1, 2))
    basis = np.stack([gx, gy, gy * x - gx * y, gx * x + gy * y], -1)[:, region].reshape(-1, 4)
    it = np.diff(f, axis=0)[:, region].reshape(-1)
    vx, vy, spin, zoom = np.linalg.lstsq(basis, -it, rcond=None)[0]  # spin > 0: clockwise
    radius = np.sqrt(region.sum() / np.pi)
    kind = np.argmax([np.hypot(vx, vy), abs(spin) * radius, abs(zoom) * radius])  # px / frame
    if kind == 1:
        return "rotate_cw" if spin > 0 else "rotate_ccw"
    if kind == 2:
        return "zoom_in" if zoom > 0 else "zoom_out"
    changed = np.abs(np.diff(grey, axis=0)) > 15
    area, t = changed.sum((1, 2)) + 1e-6, np.arange(len(changed))
    vx, vy = (np.polyfit(t, (changed * c).sum((1, 2)) / area, 1, w=area)[0] for c in (xs, ys))
    if abs(vx) > abs(vy):
        return "move_right" if vx > 0 else "move_left"
    return "move_down" if vy > 0 else "move_up"


def test_videos_decode_and_show_their_motion(video_root):
    records, _ = data.read_class_folders(video_root)
    for r in records:
        meta = video.video_meta(r.path)
        assert (meta.num_frames, meta.width, meta.height, meta.fps) == (FRAMES, 64, 64, 25)
        frames = video.read_frames(r.path, list(range(FRAMES))).numpy()
        assert frames.shape == (FRAMES, 64, 64, 3)
        assert motion(frames) == syn.MOTIONS[r.label], r.path


def test_videos_deterministic(tmp_path):
    kw = dict(frames=8, per_class_train=1, per_class_val=0)
    a, b = syn.videos(tmp_path / "a", **kw), syn.videos(tmp_path / "b", **kw)
    c = syn.videos(tmp_path / "c", seed=1, **kw)
    fa, fb = files(a), files(b)
    assert fa.keys() == fb.keys()
    assert all(fa[k] == fb[k] for k in fa if k.endswith((".csv", ".txt")))
    for m in syn.MOTIONS:
        rel = f"{m}/{m}_000.mp4"
        va, vb, vc = (video.read_frames(r / rel, range(8)).float() for r in (a, b, c))
        # x264 output may differ in a few bytes from run to run; the pictures do not
        assert (va - vb).abs().mean() < 0.5 and (va - vc).abs().mean() > 10


# ---- motion-only videos ----

def _object_track(clip: np.ndarray) -> tuple:
    """Per frame of a (T, H, W, 3) uint8 clip on the flat grey background: the set of the two
    most frequent object colours (its stripes), and the centroid (x, y) and area of the
    pixels that are not grey."""
    looks, cents, areas = [], [], []
    ys, xs = np.mgrid[0:clip.shape[1], 0:clip.shape[2]]
    for f in clip.astype(int):
        obj = np.abs(f - syn.MOTION_GREY).sum(-1) > 30
        colours, counts = np.unique(f[obj], axis=0, return_counts=True)
        looks.append({tuple(c) for c in colours[np.argsort(-counts)[:2]]})
        cents.append(((xs * obj).sum() / obj.sum(), (ys * obj).sum() / obj.sum()))
        areas.append(obj.sum())
    return looks, np.array(cents), np.array(areas)


def test_motion_videos_keep_only_the_motion():
    """The object's appearance (its stripe colours) is re-drawn exactly every `segment`
    frames on a grey background shared by all videos; its centroid follows its class (down,
    up, left or right, or a growth), and sideways goes both ways over videos, so a
    horizontal flip maps each class onto itself."""
    signs = set()
    for c, m in enumerate(syn.FLIP_MOTIONS):
        for n in range(6 if m == "move_sideways" else 2):
            clip = syn._motion_clip(np.random.default_rng([0, c, n, 7]), m, 64, 32, segment=4)
            looks, cents, areas = _object_track(clip)
            assert (clip[:, 0, 0] == syn.MOTION_GREY).all() or (clip[:, -1, -1] ==
                                                                 syn.MOTION_GREY).all()
            new = [not (a & b) for a, b in zip(looks, looks[1:])]  # (T - 1,) a new look
            k = int(np.argmax(new))  # the first change: then one every 4 frames exactly
            assert k < 4 and new == [(i - k) % 4 == 0 for i in range(31)], (m, n, new)
            v = cents[-1] - cents[0]  # px over the video
            grow = areas[-4:].mean() / areas[:4].mean()
            if m == "zoom_in":
                assert grow > 2 and np.hypot(*v) < 6, (m, grow, v)
                continue
            assert 0.6 < grow < 1.6 and np.hypot(*v) > 20, (m, grow, v)
            if m == "move_sideways":
                assert abs(v[0]) > 2 * abs(v[1]), v
                signs.add(np.sign(v[0]))
            else:
                assert abs(v[1]) > 2 * abs(v[0]) and np.sign(v[1]) == (1 if m == "move_down"
                                                                       else -1), (m, v)
    assert signs == {-1, 1}


def test_motion_videos_layout_and_determinism(tmp_path):
    kw = dict(frames=8, per_class_train=2, per_class_val=1)
    a, b = syn.motion_videos(tmp_path / "a", **kw), syn.motion_videos(tmp_path / "b", **kw)
    train, val = data.read_video_csv(a / "train.csv"), data.read_video_csv(a / "val.csv")
    assert [r.label for r in train] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [r.label for r in val] == [0, 1, 2, 3]
    ucf = data.read_ucf101_split(a, 1, False)
    assert [(r.path, r.label) for r in ucf] == [(r.path, r.label) for r in val]
    rel = "move_up/move_up_0002.mp4"
    assert (video.video_meta(a / rel).num_frames, video.video_meta(a / rel).width) == (8, 64)
    clip = syn._motion_clip(np.random.default_rng([0, 2, 2, 7]), "move_up", 64, 8, 2)
    va, vb = (video.read_frames(r / rel, range(8)).float() for r in (a, b))
    assert (va - vb).abs().mean() < 0.5  # x264 may differ in a few bytes, not the pictures
    assert (va - torch.from_numpy(clip).float()).abs().mean() < 3  # the rendered clip


# ---- DAVIS ----

def test_davis_palette():
    pal = syn.davis_palette()
    assert len(pal) == 768
    assert pal[:27] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128,
                        0, 128, 128, 128, 128, 128, 64, 0, 0]
    assert pal[-3:] == [224, 224, 192]  # id 255, the VOC "void" colour


def test_davis_layout(davis_root):
    seqs = (davis_root / "ImageSets/2017/val.txt").read_text().split()
    assert len(seqs) == 3
    assert sorted(seqs) == sorted(p.name for p in (davis_root / "JPEGImages/480p").iterdir())
    for seq in seqs:
        jpgs = sorted((davis_root / "JPEGImages/480p" / seq).iterdir())
        pngs = sorted((davis_root / "Annotations/480p" / seq).iterdir())
        assert [p.stem for p in jpgs] == [p.stem for p in pngs] == [f"{t:05d}" for t in range(6)]
        frames = [np.array(Image.open(p)) for p in jpgs]
        masks = [Image.open(p) for p in pngs]
        assert all(m.mode == "P" and m.getpalette() == syn.davis_palette() for m in masks)
        labels = np.stack([np.array(m) for m in masks])
        assert frames[0].shape == (96, 160, 3) and labels.shape == (6, 96, 160)
        k = labels.max()
        assert k in (2, 3) and set(np.unique(labels[0])) == set(range(k + 1))
        for obj in range(1, k + 1):  # the mask sits on an object whose colours stay the same
            first, last = (frames[t][labels[t] == obj].mean(0) for t in (0, 5))
            assert np.abs(first - last).max() < 30, (seq, obj, first, last)
        moved = [np.argwhere(labels[t] == 1).mean(0) for t in (0, 5)]
        assert np.abs(moved[0] - moved[1]).max() > 1  # objects move


def test_davis_deterministic(tmp_path):
    a, b = (syn.davis(tmp_path / n, sequences=2, frames=3) for n in "ab")
    c = syn.davis(tmp_path / "c", seed=1, sequences=2, frames=3)
    fa, fc = files(a), files(c)
    assert len(fa) == 2 * 3 * 2 + 1 and fa == files(b)
    assert all(fa[k] != fc[k] for k in fa if k.endswith((".jpg", ".png")))


def test_camouflage_defeats_colour_matching(tmp_path):
    """The camouflage set's claim: raw-pixel label propagation, which the plain set lets
    succeed, fails on it (same seed, size and length; measured 0.67 vs 0.28)."""
    from common import propagation
    jf = {}
    for style in ("plain", "camouflage"):
        root = syn.davis(tmp_path / style, seed=3, sequences=3, frames=12, style=style)
        scores, _ = propagation.eval_davis(lambda x: propagation.pixel_features(x, 8), root,
                                           (96, 160))
        jf[style] = scores["J&F-Mean"]
    assert jf["plain"] > 0.55 and jf["camouflage"] < 0.4, jf


def test_camouflage_objects_wear_the_background_colours():
    """Every object and the background hold both of the frame's two colour clusters (2-means
    of the pixels), so a patch's colour does not tell object from background."""
    for i in range(4):
        imgs, labels, k = syn._camouflage(np.random.default_rng([7, i]), 96, 160, 4)
        px = imgs[0].reshape(-1, 3).astype(float)
        centres = px[[px.sum(1).argmin(), px.sum(1).argmax()]]
        for _ in range(10):  # Lloyd's iterations
            near = np.linalg.norm(px[:, None] - centres[None], axis=2).argmin(1)
            centres = np.stack([px[near == j].mean(0) for j in range(2)])
        assert np.linalg.norm(centres[0] - centres[1]) > 60
        for region in range(k + 1):  # 0: background
            share = near[labels[0].ravel() == region].mean()
            assert 0.05 < share < 0.95, (i, region, share)


def test_camouflage_images_and_videos(tmp_path):
    imgs = syn.camouflage_images(tmp_path / "img", seed=5, train=2, val=1, frames=3)
    assert sorted(p.relative_to(imgs).as_posix() for p in imgs.rglob("*.jpg")) == [
        f"{split}/synth{i:03d}/{t:05d}.jpg" for split, i in
        [("train", 0), ("train", 1), ("val", 2)] for t in range(3)]
    same = syn.davis(tmp_path / "davis", seed=5, sequences=2, frames=3, style="camouflage")
    assert (imgs / "train/synth001/00002.jpg").read_bytes() == \
        (same / "JPEGImages/480p/synth01/00002.jpg").read_bytes()  # drawn as davis draws them
    vids = syn.camouflage_videos(tmp_path / "vid", seed=5, videos=2, frames=6)
    assert (vids / "train.csv").read_text() == "000.mp4 0\n001.mp4 0\n"
    clip = video.read_clip(vids / "001.mp4", list(range(6)))
    assert clip.shape == (6, 96, 160, 3) and clip.dtype == torch.uint8
    with pytest.raises(ValueError, match="style"):
        syn.davis(tmp_path / "x", style="dark")


# ---- cache ----

def test_cache_reuses_and_regenerates(monkeypatch, tmp_path):
    monkeypatch.setenv("SSL_REFS_CACHE", str(tmp_path))
    root = syn.davis(sequences=1, frames=2)
    assert root.parent == tmp_path and root.name.startswith(f"davis-v{syn.VERSION}-s0-")
    mask = root / "Annotations/480p/synth00/00001.png"
    before, stamp = mask.read_bytes(), mask.stat().st_mtime_ns
    assert syn.davis(sequences=1, frames=2) == root and mask.stat().st_mtime_ns == stamp
    shutil.rmtree(root)
    assert syn.davis(sequences=1, frames=2) == root and mask.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temp folder left behind


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="even"):
        syn.videos(tmp_path / "v", size=63)
    with pytest.raises(ValueError, match="48x48"):
        syn.davis(tmp_path / "d", size=(32, 64))
    assert list(tmp_path.iterdir()) == []


def test_cache_concurrent_callers_and_empty_root(tmp_path):
    target = tmp_path / "ds"
    with ThreadPoolExecutor(4) as pool:
        roots = list(pool.map(lambda _: syn.davis(target, sequences=2, frames=3), range(4)))
    assert roots == [target] * 4 and len(files(target)) == 13
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]
    (tmp_path / "empty").mkdir()
    root = syn.images(tmp_path / "empty", size=32, per_class_train=1, per_class_val=1)
    assert len(files(root)) == 16 and oct(root.stat().st_mode & 0o777) == "0o755"
