"""Small datasets in real on-disk formats for the demos and tests (DESIGN.md §4): `images()`
(ImageFolder, 8 shapes), `videos()` (8 motions, mp4 + Kinetics/UCF101 lists), `davis()`, `ytvos()`.

The class is what augmentations keep (silhouette, motion); colour, position, scale and
background are drawn the same way for every class (silhouettes even share their area), so a
random encoder finds no shortcut. Deterministic from `seed` (a sub-seed per sample), cached
under `cache_root()`, built in a temp folder then renamed: a crash or concurrent callers (DDP
ranks) never leave a half-written dataset.
"""
from __future__ import annotations

import colorsys
import functools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

VERSION = 1  # of the video and DAVIS sets
IMAGES_VERSION = 2  # 2: large central objects, colour inside the jitter range
SHAPES = ("crescent", "cross", "disk", "ell", "ring", "square", "star", "triangle")
MOTIONS = ("move_down", "move_left", "move_right", "move_up",
           "rotate_ccw", "rotate_cw", "zoom_in", "zoom_out")  # sorted: label = index
_STEP = {"move_down": (0, 1), "move_left": (-1, 0), "move_right": (1, 0), "move_up": (0, -1)}


def cache_root() -> Path:
    """`$SSL_REFS_CACHE` if set, else `~/.cache/ssl-refs/synthetic`."""
    return Path(os.environ.get("SSL_REFS_CACHE") or Path.home() / ".cache/ssl-refs/synthetic")


def _cached(root: Optional[os.PathLike], name: str, build: Callable[[Path], None]) -> Path:
    """Return `root` (default `cache_root()/name`) if it holds data, else build it atomically."""
    root = Path(root) if root is not None else cache_root() / name
    if root.is_dir() and any(root.iterdir()):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.replace(tmp, root)  # atomic; replaces an empty folder, fails on a full one
        except OSError:
            if not (root.is_dir() and any(root.iterdir())):
                raise
            # another process finished first: use its copy (identical, same seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


# ---- drawing -----------------------------------------------------------------------------

def _polygon(u: np.ndarray, v: np.ndarray, pts) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the points (u, v)."""
    inside = np.zeros(u.shape, bool)
    x0, y0 = pts[-1]
    for x1, y1 in pts:
        crosses = (y0 > v) != (y1 > v)
        inside ^= crosses & (u < x0 + (v - y0) * (x1 - x0) / (y1 - y0 + 1e-12))
        x0, y0 = x1, y1
    return inside


def _star(n: int, r_in: float) -> list:
    a = np.pi * np.arange(2 * n) / n - np.pi / 2
    r = np.where(np.arange(2 * n) % 2, r_in, 1.0)
    return list(zip(r * np.cos(a), r * np.sin(a)))


_POLYGONS = {
    "cross": [(.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1), (-.3, .3),
              (-1, .3), (-1, -.3), (-.3, -.3), (-.3, -1)],
    "ell": [(-1, -1), (-.3, -1), (-.3, .3), (1, .3), (1, 1), (-1, 1)],
    "square": [(-.8, -.8), (.8, -.8), (.8, .8), (-.8, .8)],
    "star": _star(5, 0.45),
    "triangle": _star(3, 1.0)[::2],
}


def _raw_inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r2 = u * u + v * v
    if shape == "disk":
        return r2 <= 1
    if shape == "ring":
        return (r2 <= 1) & (r2 >= 0.55 ** 2)
    if shape == "crescent":
        return (r2 <= 1) & ((u - 0.5) ** 2 + v * v > 0.8 ** 2)
    return _polygon(u, v, _POLYGONS[shape])


@functools.cache
def _normalise(shape: str) -> tuple[float, float, float, float]:
    """(scale, u0, v0, extent): `_raw_inside(shape, u * scale + u0, v * scale + v0)` has its
    centroid at 0, the area of a disk of radius 0.8, and reaches `extent` from the centroid."""
    g = (np.arange(600) + 0.5) / 200 - 1.5
    u, v = np.meshgrid(g, g)
    inside = _raw_inside(shape, u, v)
    scale = np.sqrt(inside.mean() * 9.0 / (np.pi * 0.8 ** 2))
    u0, v0 = u[inside].mean(), v[inside].mean()
    extent = np.hypot(u[inside] - u0, v[inside] - v0).max() / scale
    return float(scale), float(u0), float(v0), float(extent)


def _draw(img: np.ndarray, shape: str, cx: float, cy: float, radius: float, angle: float,
          c1, c2=None, pattern: Optional[Callable] = None, ss: int = 4) -> np.ndarray:
    """Paint `shape` (turned by `angle`, clockwise on screen) into float (H, W, 3) `img`, with
    `ss` x `ss` supersampling; return its (H, W) coverage. `pattern(u, v) -> bool` picks `c2`
    over `c1` in object coordinates, so the texture moves, turns and scales with the object."""
    h, w, _ = img.shape
    alpha = np.zeros((h, w), np.float32)
    e = 1.6 * radius  # > every extent
    x0, x1 = max(int(cx - e), 0), min(int(cx + e) + 2, w)
    y0, y1 = max(int(cy - e), 0), min(int(cy + e) + 2, h)
    if x0 >= x1 or y0 >= y1:
        return alpha
    xs = x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss - cx
    ys = y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss - cy
    x, y = np.meshgrid(xs, ys)
    k, u0, v0, _ = _normalise(shape)
    u = (x * np.cos(angle) + y * np.sin(angle)) * k / radius + u0
    v = (y * np.cos(angle) - x * np.sin(angle)) * k / radius + v0
    inside = _raw_inside(shape, u, v)[..., None].astype(np.float32)
    colour = np.where(pattern(u, v)[..., None], c2, c1) if pattern else np.asarray(c1)
    pool = lambda a: a.reshape(y1 - y0, ss, x1 - x0, ss, -1).mean((1, 3))  # noqa: E731
    a, paint = pool(inside), pool(inside * colour)
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - a) + paint
    alpha[y0:y1, x0:x1] = a[..., 0]
    return alpha


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random colour mixed with a second one by a gradient, stripes or a plaid."""
    c0, c1 = rng.uniform(0, 255, (2, 3))
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    a, phase, freq = rng.uniform(0, 2 * np.pi), rng.uniform(0, 2 * np.pi), rng.uniform(2, 6)
    proj = x * np.cos(a) + y * np.sin(a)
    t = [(proj - proj.min()) / np.ptp(proj), 0.5 + 0.5 * np.sin(2 * np.pi * freq * proj + phase),
         0.5 + 0.25 * (np.sin(2 * np.pi * freq * x + phase) + np.sin(2 * np.pi * freq * y))
         ][rng.integers(3)]
    return c0 + (c1 - c0) * rng.uniform(0.2, 0.7) * t[..., None]


def _colour(rng: np.random.Generator, away_from: np.ndarray, dist: float = 100.0) -> np.ndarray:
    """A uniform RGB colour at least `dist` from `away_from` (rejection sampling)."""
    while True:
        c = rng.uniform(0, 255, 3)
        if np.linalg.norm(c - away_from) >= dist:
            return c


def _to_uint8(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noise = rng.normal(0, rng.uniform(0.5, 3), img.shape)
    return np.clip(np.rint(img + noise), 0, 255).astype(np.uint8)


# ---- images ----

OBJECT_RGB, BACKGROUND_GREY = (230.0, 170.0, 60.0), 60.0


def _jittered(rng: np.random.Generator, rgb, hue: float = 0.1,
              brightness: float = 0.3) -> np.ndarray:
    """`rgb` with its hue turned by U(-hue, hue) of a turn and its brightness scaled by
    U(1 - brightness, 1 + brightness): inside the pretraining colour jitter's range
    (ColorJitter(0.4, 0.4, ., 0.1)), so a per-image colour is no cue that survives it."""
    h, lum, sat = colorsys.rgb_to_hls(*(np.asarray(rgb, float) / 255))
    rgb = colorsys.hls_to_rgb((h + rng.uniform(-hue, hue)) % 1, lum, sat)
    return np.array(rgb) * 255 * rng.uniform(1 - brightness, 1 + brightness)


def _image(rng: np.random.Generator, shape: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 image of `shape` and its (H, W) coverage.

    The object is large and central (radius 0.22-0.38 of the side, centre within 0.12 of the
    middle, turned by up to 30 degrees), so every pretraining crop (scale >= 0.2) holds part
    of it; its colour and the flat grey background vary only inside the colour jitter's
    range, the same way for every class. What tells the class is the silhouette; what varies
    within a class (position, scale, rotation, brightness, hue) hurts a random encoder and is
    what the augmentations teach a trained one to ignore."""
    bg = BACKGROUND_GREY * rng.uniform(0.7, 1.3)
    img = np.full((size, size, 3), bg)
    radius = rng.uniform(0.22, 0.38) * size
    cx, cy = size / 2 + rng.uniform(-0.12, 0.12, 2) * size
    angle = np.deg2rad(rng.uniform(-30, 30))
    alpha = _draw(img, shape, cx, cy, radius, angle, _jittered(rng, OBJECT_RGB))
    return _to_uint8(img, rng), alpha


def images(root: Optional[os.PathLike] = None, seed: int = 0, size: int = 64,
           per_class_train: int = 500, per_class_val: int = 100) -> Path:
    """ImageFolder `root/{train,val}/<shape>/<n>.png` of the 8 `SHAPES`; returns `root`.
    The defaults give 4,000 training images (a 1,024-key queue holds a quarter of them) and
    800 validation images (100 per class: a binomial standard error of at most 1.8 points)."""
    def build(tmp: Path) -> None:
        for split, count in (("train", per_class_train), ("val", per_class_val)):
            for c, shape in enumerate(SHAPES):
                (tmp / split / shape).mkdir(parents=True)
                for n in range(count):
                    rng = np.random.default_rng([seed, split == "val", c, n])
                    Image.fromarray(_image(rng, shape, size)[0]).save(
                        tmp / split / shape / f"{n:04d}.png")
    name = f"images-v{IMAGES_VERSION}-s{seed}-{size}px-{per_class_train}x{per_class_val}"
    return _cached(root, name, build)


# ---- videos ------------------------------------------------------------------------------

def _clip(rng: np.random.Generator, motion: str, size: int, frames: int, scale: float = 1.0,
          plain: bool = False, bright: bool = False) -> np.ndarray:
    """(T, H, W, 3) uint8 clip of one striped object doing `motion` on a static background.
    `scale` multiplies the object's size; `plain` flattens the background to its mean colour
    (the random draws are the same either way); `bright` then redraws the colours: a dark flat
    background (each channel U(0, 80)) and a bright one-colour object (U(160, 255)), so the
    object is brighter than the background in every clip (two more draws, so the shapes and
    paths differ from those of the same seed without it)."""
    bg = _background(rng, size, size)
    if plain:
        bg = np.broadcast_to(bg.mean((0, 1)), bg.shape).copy()
    c1 = _colour(rng, bg.mean((0, 1)))
    c2 = _colour(rng, c1, 80.0)
    if bright:  # one colour: the stripes' second colour is the first
        bg = np.broadcast_to(rng.uniform(0, 80, 3), bg.shape).copy()
        c1 = c2 = rng.uniform(160, 255, 3)
    shape, freq, phase = SHAPES[rng.integers(len(SHAPES))], rng.uniform(1.5, 2.5), rng.uniform(0, 6)
    t = np.linspace(0, 1, frames)
    radius = np.full(frames, rng.uniform(0.12, 0.16) * size * scale)
    angle = np.full(frames, rng.uniform(0, 2 * np.pi))
    if motion.startswith("zoom"):
        r0, ratio = rng.uniform(0.08, 0.1) * size * scale, rng.uniform(1.7, 2.2)
        radius = r0 * ratio ** (t if motion == "zoom_in" else 1 - t)
    if motion.startswith("rotate"):
        turn = np.deg2rad(rng.uniform(4, 8)) * (frames - 1)
        angle = angle + (turn if motion == "rotate_cw" else -turn) * t
    d = np.array(_STEP.get(motion, (0, 0)))
    dist = rng.uniform(0.4, 0.55) * size
    m = _normalise(shape)[3] * radius.max()
    lo, hi = m + dist * np.maximum(-d, 0), size - m - dist * np.maximum(d, 0)
    centre = rng.uniform(np.minimum(lo, hi), np.maximum(lo, hi))  # large objects may clip
    out = np.empty((frames, size, size, 3), np.uint8)
    stripes = lambda u, v: np.sin(freq * np.pi * u + phase) > 0  # noqa: E731
    for i in range(frames):
        img = bg.copy()
        cx, cy = centre + d * dist * t[i]
        _draw(img, shape, cx, cy, radius[i], angle[i], c1, c2, stripes, ss=2)
        out[i] = np.clip(np.rint(img), 0, 255)
    return out


def videos(root: Optional[os.PathLike] = None, seed: int = 0, size: int = 64, frames: int = 32,
           fps: float = 25, per_class_train: int = 16, per_class_val: int = 4,
           scale: float = 1.0, plain: bool = False, bright: bool = False) -> Path:
    """Class folders `root/<motion>/<motion>_<n>.mp4` of the 8 `MOTIONS`, plus split files.

    `scale` enlarges the objects and `plain` gives flat backgrounds (a video demo whose
    objective must see the motion, not the background texture, may use them). `bright` (flat
    too) gives one-colour objects brighter than a dark background in every clip: a moving
    edge then has the same sign in every clip, which a small ViT needs to learn the motion
    class from a few hundred clips (with random contrast it does not).

    Kinetics style `train.csv`/`val.csv` (`<class>/<file>.mp4 <label>`, 0-based) and UCF101
    style `classInd.txt`, `trainlist01.txt` (1-based labels), `testlist01.txt` (val videos).
    Videos 0..per_class_train-1 of each class are the training set.
    """
    from common.video import write_video
    if size % 2:
        raise ValueError(f"synthetic.videos: size must be even (H.264 yuv420p), got {size}")

    def build(tmp: Path) -> None:
        lists: dict = {"train": [], "val": []}
        for c, motion in enumerate(MOTIONS):
            for n in range(per_class_train + per_class_val):
                rel = f"{motion}/{motion}_{n:03d}.mp4"
                clip = _clip(np.random.default_rng([seed, c, n]), motion, size, frames, scale,
                             plain, bright)
                write_video(tmp / rel, clip, fps=fps, codec="libx264", gop=8)
                lists["train" if n < per_class_train else "val"].append((rel, c))
        for name, lines in {"train.csv": [f"{p} {c}" for p, c in lists["train"]],
                            "val.csv": [f"{p} {c}" for p, c in lists["val"]],
                            "classInd.txt": [f"{c + 1} {m}" for c, m in enumerate(MOTIONS)],
                            "trainlist01.txt": [f"{p} {c + 1}" for p, c in lists["train"]],
                            "testlist01.txt": [p for p, _ in lists["val"]]}.items():
            (tmp / name).write_text("".join(f"{line}\n" for line in lines))
    name = f"videos-v{VERSION}-s{seed}-{size}px-{frames}f-{per_class_train}x{per_class_val}"
    name += (f"-x{scale:g}" if scale != 1.0 else "") + ("-plain" if plain else "")
    name += "-bright" if bright else ""
    return _cached(root, name, build)


# ---- motion-only videos ------------------------------------------------------------------

MOTION_VERSION = 2  # 2: one grey background for all (1: re-drawn with the object)
MOTION_GREY = 128.0  # the flat background of every motion video
FLIP_MOTIONS = ("move_down", "move_sideways", "move_up", "zoom_in")  # sorted: label = index


def _motion_clip(rng: np.random.Generator, motion: str, size: int, frames: int,
                 segment: int) -> np.ndarray:
    """(T, H, W, 3) uint8 clip whose only constant is the motion of one object.

    Every `segment` frames (from a random phase) the object's shape, its two stripe colours,
    the stripes and its orientation are all drawn anew, on the flat grey background that all
    videos share, so two clips of one video at different times share no appearance (but
    where they overlap in time). What stays is the path:
    a straight move at the video's own speed (0.45-0.6 of the side over the video) and
    direction (the class's, turned by U(-15, 15) degrees; `move_sideways` goes left or right
    at random, so a horizontal flip maps every class onto itself), or a growth by 1.8-2.2x
    (`zoom_in`), from a random start that keeps the object mostly inside the frame."""
    t = np.linspace(0, 1, frames)
    turn = np.deg2rad(rng.uniform(-15, 15))
    d = {"move_down": (0.0, 1.0), "move_up": (0.0, -1.0), "zoom_in": (0.0, 0.0),
         "move_sideways": (float(rng.choice([-1.0, 1.0])), 0.0)}[motion]
    d = np.array([d[0] * np.cos(turn) - d[1] * np.sin(turn),
                  d[0] * np.sin(turn) + d[1] * np.cos(turn)])
    dist = rng.uniform(0.45, 0.6) * size
    if motion == "zoom_in":
        radius = rng.uniform(0.1, 0.12) * size * rng.uniform(1.8, 2.2) ** t
    else:
        radius = np.full(frames, rng.uniform(0.17, 0.22) * size)
    m = 0.8 * radius.max()
    lo, hi = m + dist * np.maximum(-d, 0), size - m - dist * np.maximum(d, 0)
    centre = rng.uniform(np.minimum(lo, hi), np.maximum(lo, hi))
    phase = int(rng.integers(segment))
    out = np.empty((frames, size, size, 3), np.uint8)
    bg = np.full(3, MOTION_GREY)
    for i in range(frames):
        if i == 0 or (i + phase) % segment == 0:  # a new appearance
            c1 = _colour(rng, bg)
            c2 = _colour(rng, c1, 80.0)
            shape, freq = SHAPES[rng.integers(len(SHAPES))], rng.uniform(1.5, 2.5)
            stripe_phase, angle = rng.uniform(0, 6), rng.uniform(0, 2 * np.pi)
            stripes = (lambda f, p: lambda u, v: np.sin(f * np.pi * u + p) > 0)(freq,
                                                                                  stripe_phase)
        img = np.broadcast_to(bg, (size, size, 3)).copy()
        cx, cy = centre + d * dist * t[i]
        _draw(img, shape, cx, cy, radius[i], angle, c1, c2, stripes, ss=2)
        out[i] = np.clip(np.rint(img), 0, 255)
    return out


def motion_videos(root: Optional[os.PathLike] = None, seed: int = 0, size: int = 64,
                  frames: int = 32, fps: float = 25, per_class_train: int = 16,
                  per_class_val: int = 4, segment: int = 2) -> Path:
    """Class folders `root/<motion>/<motion>_<n>.mp4` of the 4 `FLIP_MOTIONS`, in the same
    layout and split files as `videos()` (Kinetics `train.csv`/`val.csv`, UCF101
    `classInd.txt`, `trainlist01.txt`, `testlist01.txt`).

    Built for clip-level instance discrimination (SCE for video): the appearance of the object
    is re-drawn every `segment` frames on one flat grey background shared by all the videos
    (`_motion_clip`), so the one cue that two clips of a video share is its motion, and what
    an instance objective can learn is motion; the classes survive the pretraining's per-clip
    horizontal flip."""
    from common.video import write_video
    if size % 2:
        raise ValueError(f"synthetic.motion_videos: size must be even (H.264 yuv420p), got {size}")

    def build(tmp: Path) -> None:
        lists: dict = {"train": [], "val": []}
        for c, motion in enumerate(FLIP_MOTIONS):
            for n in range(per_class_train + per_class_val):
                rel = f"{motion}/{motion}_{n:04d}.mp4"
                clip = _motion_clip(np.random.default_rng([seed, c, n, 7]), motion, size,
                                    frames, segment)
                write_video(tmp / rel, clip, fps=fps, codec="libx264", gop=8)
                lists["train" if n < per_class_train else "val"].append((rel, c))
        _write_lists(tmp, lists, FLIP_MOTIONS)
    name = (f"motion-videos-v{MOTION_VERSION}-s{seed}-{size}px-{frames}f-"
            f"{per_class_train}x{per_class_val}-seg{segment}")
    return _cached(root, name, build)


def _write_lists(tmp: Path, lists: dict, classes: tuple) -> None:
    """Kinetics `train.csv`/`val.csv` (0-based) and UCF101 split files (1-based) of `lists`."""
    for name, lines in {"train.csv": [f"{p} {c}" for p, c in lists["train"]],
                        "val.csv": [f"{p} {c}" for p, c in lists["val"]],
                        "classInd.txt": [f"{c + 1} {m}" for c, m in enumerate(classes)],
                        "trainlist01.txt": [f"{p} {c + 1}" for p, c in lists["train"]],
                        "testlist01.txt": [p for p, _ in lists["val"]]}.items():
        (tmp / name).write_text("".join(f"{line}\n" for line in lines))


# ---- DAVIS -------------------------------------------------------------------------------

def davis_palette() -> list:
    """The VOC/DAVIS palette (768 ints): id bits spread over the high bits of R, G, B."""
    bit = lambda i, ch: sum(((i >> (3 * j + ch)) & 1) << (7 - j) for j in range(8))  # noqa: E731
    return [bit(i, ch) for i in range(256) for ch in range(3)]


def _pattern(rng: np.random.Generator) -> Callable:
    """A random stripe, checker or dot texture in object coordinates."""
    f, a = rng.uniform(2, 4), rng.uniform(0, np.pi)
    return [lambda u, v: np.sin(f * np.pi * (u * np.cos(a) + v * np.sin(a))) > 0,
            lambda u, v: (np.floor(f * u) + np.floor(f * v)) % 2 == 0,
            lambda u, v: np.sin(f * np.pi * u) * np.sin(f * np.pi * v) > 0.5][rng.integers(3)]


def _render(bg: np.ndarray, objects: list, drift: np.ndarray, pad: int, h: int, w: int,
            frames: int, finish: Callable) -> tuple:
    """(T, H, W, 3) uint8 frames and (T, H, W) uint8 labels (k + 1 where object k covers more
    than half a pixel, later objects on top): each frame an (H, W) window of the padded
    background `bg` panned by `drift` along a half sine, then every object (a dict of `_draw`'s
    shape, r, c1, c2, pattern, and its motion: centre + amp sin(om t + ph), radius x (1 + 0.2
    sin), turn rot t) painted in order, then `finish(float image, t)` -> uint8."""
    imgs = np.empty((frames, h, w, 3), np.uint8)
    labels = np.zeros((frames, h, w), np.uint8)
    for t in range(frames):
        ox, oy = np.rint(pad + drift * np.sin(np.pi * t / frames)).astype(int)
        img = bg[oy:oy + h, ox:ox + w].copy()
        for k, o in enumerate(objects):
            s = np.sin(o["om"] * t + o["ph"])
            cx, cy = o["centre"] + o["amp"] * s[:2]
            alpha = _draw(img, o["shape"], cx, cy, o["r"] * (1 + 0.2 * s[2]), o["rot"] * t,
                          o["c1"], o["c2"], o["pattern"])
            labels[t][alpha > 0.5] = k + 1
        imgs[t] = finish(img, t)
    return imgs, labels


def _sequence(rng: np.random.Generator, h: int, w: int, frames: int):
    """(T, H, W, 3) uint8 frames, (T, H, W) uint8 label maps of K = 2 or 3 textured objects, K."""
    pad = 8
    bg = _background(rng, h + 2 * pad, w + 2 * pad)
    drift = rng.uniform(-pad, pad, 2)
    objects = []
    for _ in range(rng.integers(2, 4)):
        r = rng.uniform(0.12, 0.2) * min(h, w)
        amp = rng.uniform(0.15, 0.35, 2) * (np.array([w, h]) - 2.4 * r)
        centre = rng.uniform(1.2 * r + amp, np.array([w, h]) - 1.2 * r - amp)
        c1 = _colour(rng, bg.mean((0, 1)))
        objects.append(dict(shape=SHAPES[rng.integers(len(SHAPES))], r=r, amp=amp, centre=centre,
                            om=rng.uniform(0.5, 1, 3) * np.pi / frames, ph=rng.uniform(0, 6, 3),
                            rot=rng.uniform(-0.03, 0.03), c1=c1, c2=_colour(rng, c1, 80.0),
                            pattern=_pattern(rng)))
    imgs, labels = _render(bg, objects, drift, pad, h, w, frames,
                           lambda img, t: _to_uint8(img, rng))
    return imgs, labels, len(objects)


def _texture(kind: str, freq: float, angle: float) -> Callable:
    """A two-colour texture `(u, v) -> bool`: "stripes" (at `angle`), "checker" or "dots",
    `freq` cycles per unit of (u, v)."""
    if kind == "stripes":
        return lambda u, v: np.sin(2 * np.pi * freq * (u * np.cos(angle) + v * np.sin(angle))) > 0
    if kind == "checker":
        return lambda u, v: (np.floor(2 * freq * u) + np.floor(2 * freq * v)) % 2 == 0
    return lambda u, v: np.sin(2 * np.pi * freq * u) * np.sin(2 * np.pi * freq * v) > 0.5


CAMOUFLAGE_TEXTURES = ("stripes", "checker", "dots")


def _camouflage(rng: np.random.Generator, h: int, w: int, frames: int):
    """(T, H, W, 3) uint8 frames, (T, H, W) uint8 label maps, K: K = 2 or 3 objects painted in
    the background's two colours, told apart from it only by their texture and silhouette.

    The background is one of `CAMOUFLAGE_TEXTURES`, each object one of the other two (in object
    coordinates, so it moves, turns and scales with it), all at 5-8 px per cycle, the
    object's two colours swapped at random. Along the video the objects cross about 35 % of
    the frame, turn, breathe in scale by +-20 % and hide one another; the camera pans; the
    illumination swings by +-35 % once per video; every frame has Gaussian noise (sigma 6). So
    the colour of a patch tells nothing, the same object patch changes its pixels from frame
    to frame, and copying the first mask, raw-pixel matching and a random encoder all do
    poorly; features that know the textures do well."""
    pad = 16
    ca = rng.uniform(0, 255, 3)
    cb = _colour(rng, ca, 120.0)
    kinds = [CAMOUFLAGE_TEXTURES[i] for i in rng.permutation(3)]
    y, x = np.mgrid[0:h + 2 * pad, 0:w + 2 * pad].astype(float)
    back = _texture(kinds[0], rng.uniform(0.12, 0.2), rng.uniform(0, np.pi))(x, y)
    bg = np.where(back[..., None], cb, ca)
    drift = rng.uniform(-pad, pad, 2)
    disk = _normalise("disk")[0]  # (u, v) units per radius
    objects = []
    for k in range(rng.integers(2, 4)):
        r = rng.uniform(0.16, 0.24) * min(h, w)
        amp = rng.uniform(0.6, 1.0, 2) * 0.35 * (np.array([w, h]) - 2.4 * r)
        centre = rng.uniform(1.2 * r + amp, np.array([w, h]) - 1.2 * r - amp)
        freq = r * rng.uniform(0.12, 0.2) / disk  # 0.12-0.2 cycles per pixel
        objects.append(dict(shape=SHAPES[rng.integers(len(SHAPES))], r=r, amp=amp, centre=centre,
                            om=rng.uniform(0.7, 1, 3) * 2 * np.pi / frames, ph=rng.uniform(0, 6, 3),
                            rot=rng.uniform(-0.05, 0.05),
                            pattern=_texture(kinds[1 + k % 2], freq, rng.uniform(0, np.pi))))
        objects[-1]["c1"], objects[-1]["c2"] = (cb, ca) if rng.random() < 0.5 else (ca, cb)
    light = rng.uniform(0, 2 * np.pi)
    def finish(img: np.ndarray, t: int) -> np.ndarray:  # the light swings, then sensor noise
        img = img * (1 + 0.35 * np.sin(2 * np.pi * t / frames + light))
        return np.clip(np.rint(img + rng.normal(0, 6, img.shape)), 0, 255).astype(np.uint8)
    imgs, labels = _render(bg, objects, drift, pad, h, w, frames, finish)
    return imgs, labels, len(objects)


def _write_frames(img_dir: Path, ann_dir: Path, imgs, labels, stems: list) -> None:
    """Frames as JPEG (quality 90) and label maps as palette PNG, named `stems`."""
    img_dir.mkdir(parents=True)
    ann_dir.mkdir(parents=True)
    for img, lab, stem in zip(imgs, labels, stems):
        Image.fromarray(img).save(img_dir / f"{stem}.jpg", quality=90)
        mask = Image.fromarray(lab)
        mask.putpalette(davis_palette())  # "L" becomes "P", values kept
        mask.save(ann_dir / f"{stem}.png")


def _visible(draw: Callable, rng: np.random.Generator, h: int, w: int, frames: int) -> tuple:
    """`draw(rng, h, w, frames)`'s frames and labels, redrawn until every object covers at
    least 20 pixels of the first frame (a semi-supervised annotation must show it)."""
    while True:
        imgs, labels, k = draw(rng, h, w, frames)
        if np.bincount(labels[0].ravel(), minlength=k + 1)[1:].min() >= 20:
            return imgs, labels


def davis(root: Optional[os.PathLike] = None, seed: int = 0, size: tuple = (96, 160),
          sequences: int = 4, frames: int = 20, style: str = "plain") -> Path:
    """DAVIS-2017 layout: `JPEGImages/480p/<seq>/00000.jpg`, palette PNG `Annotations/480p/`
    (0 background, 1..K objects; every frame annotated), `ImageSets/2017/val.txt`.

    `size` is (H, W); "480p" is only the DAVIS folder name. Every object is visible in frame 0.
    `style`: "plain" (objects in their own colours on a smooth background: colour matching
    solves it) or "camouflage" (`_camouflage`: only learned texture features solve it).
    `JPEGImages/480p` is also an image folder (a class per sequence) to pretrain on.
    """
    if style not in ("plain", "camouflage"):
        raise ValueError(f"synthetic.davis: style is 'plain' or 'camouflage', got {style!r}")
    draw = _camouflage if style == "camouflage" else _sequence
    h, w = size
    if min(h, w) < 48:
        raise ValueError(f"synthetic.davis: frames must be at least 48x48, got {h}x{w}")

    def build(tmp: Path) -> None:
        names = [f"synth{i:02d}" for i in range(sequences)]
        for i, seq in enumerate(names):
            imgs, labels = _visible(draw, np.random.default_rng([seed, i]), h, w, frames)
            _write_frames(tmp / "JPEGImages/480p" / seq, tmp / "Annotations/480p" / seq, imgs,
                          labels, [f"{t:05d}" for t in range(frames)])
        (tmp / "ImageSets/2017").mkdir(parents=True)
        (tmp / "ImageSets/2017/val.txt").write_text("".join(f"{s}\n" for s in names))
    name = f"davis-v{VERSION}-s{seed}-{h}x{w}-{sequences}x{frames}f"
    return _cached(root, name + ("-camouflage" if style == "camouflage" else ""), build)


def camouflage_images(root: Optional[os.PathLike] = None, seed: int = 100,
                      size: tuple = (96, 160), train: int = 120, val: int = 10,
                      frames: int = 10) -> Path:
    """ImageFolder `root/{train,val}/<seq>/<t>.jpg`: the frames of `train` + `val`
    `davis(style="camouflage")`-like sequences (drawn as `davis(seed=seed)` would draw them with
    the same `frames`),
    to pretrain an image model on what the camouflage DAVIS set evaluates."""
    h, w = size

    def build(tmp: Path) -> None:
        for i in range(train + val):
            imgs, _ = _visible(_camouflage, np.random.default_rng([seed, i]), h, w, frames)
            folder = tmp / ("train" if i < train else "val") / f"synth{i:03d}"
            folder.mkdir(parents=True)
            for t, img in enumerate(imgs):
                Image.fromarray(img).save(folder / f"{t:05d}.jpg", quality=90)
    return _cached(root, f"camouflage-images-v{VERSION}-s{seed}-{h}x{w}-{train}x{val}x{frames}f",
                   build)


def camouflage_videos(root: Optional[os.PathLike] = None, seed: int = 0, size: tuple = (96, 160),
                      videos: int = 96, frames: int = 32, fps: float = 25) -> Path:
    """`videos` H.264 clips `root/<n>.mp4` of `_camouflage` sequences (the family of
    `davis(style="camouflage")`, other draws) and a Kinetics-style `train.csv` (`<n>.mp4 0`:
    one dummy class): video pretraining data whose frames look like the evaluation's."""
    from common.video import write_video
    h, w = size
    if h % 2 or w % 2:
        raise ValueError(f"synthetic.camouflage_videos: H and W must be even (H.264), got {size}")

    def build(tmp: Path) -> None:
        for i in range(videos):
            imgs, _, _ = _camouflage(np.random.default_rng([seed, 2000 + i]), h, w, frames)
            write_video(tmp / f"{i:03d}.mp4", imgs, fps=fps, codec="libx264", gop=8)
        (tmp / "train.csv").write_text("".join(f"{i:03d}.mp4 0\n" for i in range(videos)))
    return _cached(root, f"camouflage-videos-v{VERSION}-s{seed}-{h}x{w}-{videos}x{frames}f", build)


YTVOS_CATEGORIES = ("bird", "cat", "dog")  # category ids 1, 2, 3 (sorted names)


def ytvos(root: Optional[os.PathLike] = None, seed: int = 0, size: tuple = (96, 160),
          videos: int = 4, frames: int = 8) -> Path:
    """YouTube-VOS train layout: `JPEGImages/<video>/00000.jpg` (every 5th frame numbered, as
    in YTVOS), palette PNG `Annotations/<video>/` with instance ids 1..K, `meta.json` (each
    object's category and frames), and `val.txt` listing every video but the last (a held-out
    list like TimeT_clean's). Video 0 has 3 objects, categories cat, bird, cat: two instances
    of one category, and instance 1 -> category 2 while instance 2 -> category 1 (the swap
    that an in-place remap gets wrong)."""
    h, w = size

    def build(tmp: Path) -> None:
        meta = {}
        for i in range(videos):
            rng, vid = np.random.default_rng([seed, 1000 + i]), f"synth{i:02d}"
            while True:  # all objects visible in frame 0; video 0 has exactly three
                imgs, labels, k = _sequence(rng, h, w, frames)
                counts = np.bincount(labels[0].ravel(), minlength=k + 1)[1:]
                if counts.min() >= 20 and (i or k == 3):
                    break
            cats = ["cat", "bird", "cat"] if i == 0 else list(rng.choice(YTVOS_CATEGORIES, k))
            _write_frames(tmp / "JPEGImages" / vid, tmp / "Annotations" / vid, imgs, labels,
                          [f"{5 * t:05d}" for t in range(frames)])
            meta[vid] = {"objects": {str(o + 1): {"category": str(cats[o]), "frames": [
                f"{5 * t:05d}" for t in range(frames) if (labels[t] == o + 1).any()]}
                for o in range(k)}}
        (tmp / "meta.json").write_text(json.dumps({"videos": meta}, indent=1))
        (tmp / "val.txt").write_text("".join(f"{v}\n" for v in sorted(meta)[:-1]))
    return _cached(root, f"ytvos-v{VERSION}-s{seed}-{h}x{w}-{videos}x{frames}f", build)


# ---- SoccerNet-v2 ------------------------------------------------------------------------

SOCCERNET_VERSION = 7
TEACHER_DIM = 32  # width of the synthetic per-second teacher features
# The 8 most frequent SoccerNet-v2 classes (their bar and motion: `_soccernet_half`).
SOCCERNET_EVENTS = ("Ball out of play", "Throw-in", "Foul", "Indirect free-kick", "Clearance",
                    "Shots on target", "Shots off target", "Corner")


def _game_time(half: int, position_ms: int) -> str:
    s = position_ms // 1000
    return f"{half} - {s // 60:02d}:{s % 60:02d}"


# an event's class c is a bar (c // 4: 0 horizontal, 1 vertical) and its motion over the 2 s
# it is on screen (c % 4): both survive a squash to a square, a horizontal flip, colour jitter
SOCCERNET_MOTIONS = ("up", "down", "grow", "shrink")


def _soccernet_half(rng: np.random.Generator, frames: int, fps: float, h: int, w: int,
                    events: list) -> np.ndarray:
    """(T, H, W, 3) uint8 frames of one "half": a panning striped pitch with moving "player"
    dots; each visible event (position_ms, class c) shows a bar, horizontal (c < 4) or
    vertical, 90 grey levels brighter than the pitch (random hue), on every frame within 1 s
    of its position, which over those 2 s moves up or down by 0.6 of the height, grows or
    shrinks (x 0.5 -> 1.5 or back; `SOCCERNET_MOTIONS[c % 4]`)."""
    pan = int(rng.integers(w // 2, w))
    base = np.array([60.0, 140.0, 60.0]) * rng.uniform(0.8, 1.2, 3)
    y, x = np.mgrid[0:h, 0:w + pan]
    pitch = base * (1 + 0.12 * (np.sin(2 * np.pi * x / rng.uniform(14, 22)) > 0))[..., None]
    pitch[np.abs(x - (w + pan) / 2) < 1] = 230.0  # the halfway line
    speed = rng.uniform(-1, 1) * pan / max(frames, 1)
    players = [dict(p=rng.uniform([0, 0], [w, h]), v=rng.uniform(-1.5, 1.5, 2),
                    c=_colour(rng, base, 80.0)) for _ in range(6)]
    out = np.empty((frames, h, w, 3), np.uint8)
    luma = np.array([0.299, 0.587, 0.114])
    shown = []
    for ms, c in events:  # bar sizes as fractions of the (squashed, square) frame
        long, thin, col = rng.uniform(0.45, 0.6), rng.uniform(0.12, 0.16), _colour(rng, base, 120)
        shown.append(dict(ms=ms, c=c, cx=rng.uniform(0.3, 0.7) * w, cy=rng.uniform(0.4, 0.6) * h,
                          size=np.array([long * w, thin * h] if c < 4 else [thin * w, long * h]),
                          col=np.clip(col + base @ luma + 90 - col @ luma, 0, 255)))
    cover = lambda a, lo, hi: np.clip(np.minimum(a + 1, hi) - np.maximum(a, lo), 0, 1)  # noqa
    for i in range(frames):
        off = int(np.clip(pan / 2 + speed * (i - frames / 2), 0, pan))
        img = pitch[:, off:off + w].copy()
        for pl in players:
            pl["p"] = (pl["p"] + pl["v"]) % [w, h]
            _draw(img, "disk", pl["p"][0], pl["p"][1], 0.05 * h, 0.0, pl["c"], ss=2)
        t_ms = 1000.0 * i / fps
        for e in shown:
            u = (t_ms - e["ms"]) / 1000  # -1 .. 1 while on screen
            if abs(u) <= 1:
                m = SOCCERNET_MOTIONS[e["c"] % 4]
                cy = e["cy"] + 0.3 * h * u * {"up": -1, "down": 1}.get(m, 0)
                half = e["size"] / 2 * {"grow": 1 + 0.5 * u, "shrink": 1 - 0.5 * u}.get(m, 1)
                a = (cover(np.arange(h), cy - half[1], cy + half[1])[:, None]
                     * cover(np.arange(w), e["cx"] - half[0], e["cx"] + half[0]))[..., None]
                img = img * (1 - a) + a * e["col"]  # exact area coverage of the bar
        out[i] = _to_uint8(img, rng)
    return out


def _teacher_features(rng: np.random.Generator, prototypes: np.ndarray, duration: float,
                      events: list, noise: float = 0.01) -> np.ndarray:
    """(ceil(D), TEACHER_DIM) float32 features at 1 fps, standing in for the Baidu bank (a
    video model fine-tuned on the labels): on each second [s, s + 1) that a visible event's
    +-0.5 s overlaps, the unit prototype of its class, on every other second the unit
    "no event" prototype (the last row of `prototypes`), plus N(0, noise^2) noise everywhere:
    every second has a learnable target."""
    out = noise * rng.standard_normal((math.ceil(duration), prototypes.shape[1]))
    hot = np.full(len(out), len(prototypes) - 1)
    for ms, c in events:
        hot[max(int((ms - 500) // 1000), 0):int((ms + 500) // 1000) + 1] = c
    return (out + prototypes[hot]).astype(np.float32)


def soccernet(root: Optional[os.PathLike] = None, seed: int = 0, games: tuple = (6, 2, 2),
              seconds: tuple = (40, 48), fps: float = 4, size: tuple = (64, 112),
              events_per_minute: float = 8.0, unshown: float = 0.15,
              gap: float = 3.0, teacher_noise: float = 0.01) -> Path:
    """SoccerNet-v2 layout: `<league>/<season>/<game>/{1,2}_224p.mkv` (H.264) and
    `Labels-v2.json`, plus `train.txt`, `valid.txt`, `test.txt` (one `league/season/game` per
    line, as `SoccerNet.utils.getListGames(split)` lists them; `games` = their sizes).

    Each half lasts a random whole number of frames in `seconds` (so durations are not whole
    seconds), at `fps` and `size` = (H, W) ("224p" is only the official file name). Events of
    the 8 `SOCCERNET_EVENTS` (class c: a horizontal or vertical bar moving up or down, growing
    or shrinking) fall at random ms positions at least `gap` s apart and 1.5 s from the ends;
    a fraction `unshown` are "not shown" (labelled, nothing drawn, as events during a replay).
    A visible event is on screen exactly on the frames within 1 s of its position (so that a
    whole 1-s tubelet holds it; the labels keep their +-0.5 s). Each half also has a
    teacher bank `{half}_synthetic_teacher.npy` (`_teacher_features`: 1 fps, like SoccerNet's
    `{half}_baidu_soccer_embeddings.npy`; it knows the visible events, as Baidu's features,
    trained on the labels, do; every second holds its class's or the "no event" prototype,
    plus N(0, teacher_noise^2) noise: little, so that the rows stay apart once z-scored).
    Labels-v2.json holds
    UrlLocal, UrlYoutube, gameHomeTeam, gameAwayTeam, gameDate, gameScore and annotations
    {gameTime "H - MM:SS", label, position (ms string), team, visibility}.
    """
    import json  # local: this section was appended to the module
    from common.video import write_video
    h, w = size
    if h % 2 or w % 2:
        raise ValueError(f"synthetic.soccernet: size must be even (H.264 yuv420p), got {size}")

    def build(tmp: Path) -> None:
        n = 0
        prototypes = np.random.default_rng([seed, 99]).standard_normal(
            (len(SOCCERNET_EVENTS) + 1, TEACHER_DIM))  # the classes', then "no event"
        prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
        for split, count in zip(("train", "valid", "test"), games):
            lines = []
            for _ in range(count):
                rng = np.random.default_rng([seed, n])
                season = f"{2022 + n % 2}-{2023 + n % 2}"
                home, away = f"Synth {2 * n}", f"Synth {2 * n + 1}"
                score = f"{rng.integers(4)} - {rng.integers(4)}"
                date = f"{2022 + n % 2}-{1 + n % 12:02d}-{1 + n % 28:02d}"
                game = f"synth_league/{season}/{date} - 15-00 {home} {score} {away}"
                annotations = []
                for half in (1, 2):
                    frames = int(rng.integers(seconds[0] * fps, seconds[1] * fps + 1))
                    dur = frames / fps
                    count_ev = max(1, int(round(dur / 60 * events_per_minute)))
                    times: list = []
                    for _ in range(100_000 if count_ev * gap < dur - 3 else 0):
                        if len(times) == count_ev:  # rejection: events `gap` s apart
                            break
                        t = rng.uniform(1.5, dur - 1.5)
                        if all(abs(t - u) >= gap for u in times):
                            times.append(t)
                    if len(times) < count_ev:
                        raise ValueError(f"synthetic.soccernet: {count_ev} events {gap:g} s "
                                         f"apart do not fit a {dur:.1f}-s half")
                    events = []
                    for t in sorted(times):
                        ms, c = int(t * 1000), int(rng.integers(len(SOCCERNET_EVENTS)))
                        visible = rng.uniform() >= unshown
                        annotations.append({
                            "gameTime": _game_time(half, ms), "label": SOCCERNET_EVENTS[c],
                            "position": str(ms), "team": ("home", "away")[rng.integers(2)],
                            "visibility": "visible" if visible else "not shown"})
                        if visible:
                            events.append((ms, c))
                    clip = _soccernet_half(rng, frames, fps, h, w, events)
                    write_video(tmp / game / f"{half}_224p.mkv", clip, fps=fps,
                                codec="libx264", gop=8)
                    np.save(tmp / game / f"{half}_synthetic_teacher.npy",
                            _teacher_features(np.random.default_rng([seed, n, half, 7]),
                                              prototypes, dur, events, teacher_noise))
                labels = {"UrlLocal": game + "/", "UrlYoutube": "", "gameHomeTeam": home,
                          "gameAwayTeam": away, "gameDate": f"{date} - 15:00",
                          "gameScore": score, "annotations": annotations}
                (tmp / game / "Labels-v2.json").write_text(json.dumps(labels, indent=4))
                lines.append(game)
                n += 1
            (tmp / f"{split}.txt").write_text("".join(f"{g}\n" for g in lines))
    name = (f"soccernet-v{SOCCERNET_VERSION}-s{seed}-{h}x{w}-{fps:g}fps-"
            f"{'x'.join(map(str, games))}-{seconds[0]}to{seconds[1]}s-{events_per_minute:g}epm-"
            f"u{unshown:g}-g{gap:g}-n{teacher_noise:g}")
    return _cached(root, name, build)
