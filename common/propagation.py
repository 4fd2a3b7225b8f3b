"""Label propagation through a video and the correspondence benchmarks that T-CoRe and CropMAE
share: DAVIS-2017 J&F, JHMDB PCK, VIP mIoU.

`propagate` is the videowalk protocol both methods inherit: frame 0 as long-term memory, the 20
previous frames within a spatial radius as short-term memory, top-k softmax over cosine
affinities, soft labels carried forward. The metrics reproduce the official scripts, edge cases
included: davis2017 (`db_eval_iou`, `db_eval_boundary`, `db_statistics`, semi-supervised mode),
videowalk `eval_pck`, and VIP `fast_hist`. J&F and mIoU are fractions in [0, 1]; PCK is in
percent, as the official scripts report them.

The drivers `eval_davis`, `eval_jhmdb` and `eval_vip` share the videos between the ranks when
they are called on every rank of an initialised process group (under torchrun): video i goes
to rank i % world, each rank keeps only small per-video statistics (DAVIS: J and F per object
and frame; JHMDB: the predicted and true points per frame; VIP: a confusion matrix), these are
gathered to every rank, and every rank returns the scores a single process computes, bit for
bit (same statistics, combined in video order).
"""
import pickle
import struct
import warnings
import zlib
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from . import cli, dist
from .evaluate import full_fp32
from .synthetic import davis_palette


# ---- propagation ----
@torch.no_grad()
def propagate(feats: Tensor, first_label: Tensor, topk: int = 7, temperature: float = 0.7,
              context: int = 20, radius: float = 20.0, chunk: int = 1024) -> Tensor:
    """Propagate `first_label` (K, h, w) through `feats` (T, C, h, w), L2-normalised over C.

    Frame t attends to frame 0 anywhere (long-term) and to frames t-context..t-1 (short-term;
    indices below 0 mean frame 0, as the official code prepends `context` copies of frame 0:
    the duplicates are kept) only at grid distance strictly < `radius` (else -1e10). Affinities
    are divided by `temperature`; top-k over all (1 + context) * h * w keys, softmax over those
    k; the label is the weighted sum of the keys' soft labels, and stays soft for later frames.
    `chunk` queries at a time. Returns float32 (T, K, h, w), frame 0 being `first_label`.
    """
    T, C, h, w = feats.shape
    if first_label.shape[1:] != (h, w):
        raise ValueError(f"propagate: first_label {tuple(first_label.shape)} does not match the "
                         f"feature grid {h}x{w}")
    n, K = h * w, first_label.shape[0]
    f = feats.float().flatten(2).transpose(1, 2)  # (T, n, C)
    labels = f.new_zeros(T, n, K)
    labels[0] = first_label.to(f).flatten(1).t()
    yx = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1)
    yx = yx.flatten(0, 1).to(f.device)
    far = ((yx[:, None] - yx[None]) ** 2).sum(-1).float().sqrt() >= radius  # (n query, n key)
    for t in range(1, T):
        src = [0] + [max(s, 0) for s in range(t - context, t)]
        keys, key_labels = f[src].flatten(0, 1), labels[src].flatten(0, 1)  # (S*n, C), (S*n, K)
        for q in range(0, n, chunk):
            a = (f[t, q:q + chunk] @ keys.T).view(-1, len(src), n)  # (m, S, n)
            a[:, 1:].masked_fill_(far[q:q + chunk, None], -1e10)
            weights, idx = (a.flatten(1) / temperature).topk(topk, dim=1)
            labels[t, q:q + chunk] = torch.einsum("mk,mkc->mc", weights.softmax(1),
                                                  key_labels[idx])
    return labels.view(T, h, w, K).permute(0, 3, 1, 2)


def label_to_onehot(label, num_classes: int, size: tuple[int, int]) -> Tensor:
    """(H, W) int ids -> (K, h, w) float one-hot resized bilinearly without antialiasing
    (align_corners=False), as cv2 INTER_LINEAR in the official loaders."""
    lab = torch.as_tensor(label).long()
    if lab.ndim != 2 or lab.min() < 0 or lab.max() >= num_classes:
        raise ValueError(f"label_to_onehot: expected (H, W) ids in [0, {num_classes}), got shape "
                         f"{tuple(lab.shape)} with ids in [{lab.min()}, {lab.max()}]")
    onehot = F.one_hot(lab, num_classes).permute(2, 0, 1).float()[None]
    return F.interpolate(onehot, size=size, mode="bilinear", align_corners=False,
                         antialias=False)[0]


def soft_to_label(pred: Tensor, size: tuple[int, int]) -> Tensor:
    """(K, h, w) soft labels -> (H, W) int64 ids: bilinear upsampling to `size`, then argmax."""
    up = F.interpolate(pred[None].float(), size=size, mode="bilinear", align_corners=False)
    return up[0].argmax(0)


# ---- DAVIS-2017: files ----
def read_davis(root, split: str = "val", resolution: str = "480p",
               annotations: str = "Annotations") -> list:
    """[(name, [frame .jpg paths], [annotation .png paths])], in `ImageSets/2017/<split>.txt`
    order; `annotations`: the mask folder (DAVIS-2017 unsupervised: Annotations_unsupervised)."""
    root = Path(root)
    listing = root / "ImageSets" / "2017" / f"{split}.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"{listing}: DAVIS split list not found (expected the DAVIS-2017 "
                                f"layout JPEGImages/{resolution}, Annotations/{resolution}, "
                                "ImageSets/2017)")
    out = []
    for lineno, line in enumerate(listing.read_text().splitlines(), 1):
        if not (name := line.strip()):
            continue
        frames = sorted((root / "JPEGImages" / resolution / name).glob("*.jpg"))
        masks = sorted((root / annotations / resolution / name).glob("*.png"))
        for what, files, sub in (("frames", frames, "JPEGImages"), ("masks", masks, annotations)):
            if not files:
                raise FileNotFoundError(f"{listing}:{lineno}: sequence {name!r} has no {what} in "
                                        f"{root / sub / resolution / name}")
        out.append((name, frames, masks))
    if not out:
        raise cli.InputError(f"{listing}: no sequences listed")
    return out


def read_label_png(path) -> np.ndarray:
    """(H, W) uint8 ids of a palette ("P", the palette indices) or grayscale ("L") PNG."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: label PNG not found")
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise cli.InputError(f"{path}: label PNG must be indexed ('P') or 'L', "
                                     f"not {im.mode!r}")
            return np.array(im, dtype=np.uint8)
    except OSError as e:
        raise cli.InputError(f"{path}: unreadable label PNG ({e})") from None


def write_label_png(path, label, palette: Optional[Sequence[int]] = None) -> None:
    """Write (H, W) ids in [0, 255] as an indexed ("P") PNG, with the DAVIS palette by default."""
    a = np.asarray(label)
    if a.ndim != 2 or a.min() < 0 or a.max() > 255:
        raise ValueError(f"{path}: label must be (H, W) ids in [0, 255], got shape {a.shape}")
    im = Image.fromarray(a.astype(np.uint8))
    im.putpalette(list(palette) if palette is not None else davis_palette())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


# ---- DAVIS-2017: metrics ----
def seg2bmap(seg) -> np.ndarray:
    """Boundary map of davis2017 `_seg2bmap` (same size): a pixel differing from its east, south
    or south-east neighbour; the last row compares east only, the last column south only, and
    the bottom-right pixel is 0. Leading dimensions are batch dimensions."""
    s = np.asarray(seg).astype(bool)
    e, so, se = np.zeros_like(s), np.zeros_like(s), np.zeros_like(s)  # east, south, south-east
    e[..., :, :-1] = s[..., :, 1:]
    so[..., :-1, :] = s[..., 1:, :]
    se[..., :-1, :-1] = s[..., 1:, 1:]
    b = (s ^ e) | (s ^ so) | (s ^ se)
    b[..., -1, :] = s[..., -1, :] ^ e[..., -1, :]
    b[..., :, -1] = s[..., :, -1] ^ so[..., :, -1]
    b[..., -1, -1] = False
    return b


def _binary(gt, pred, void) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = np.asarray(gt).astype(bool), np.asarray(pred).astype(bool)
    if gt.shape != pred.shape or gt.ndim not in (2, 3):
        raise ValueError(f"masks must be (H, W) or (T, H, W) of equal shapes, got gt {gt.shape}, "
                         f"pred {pred.shape}")
    if void is not None:  # toolkit semantics: void pixels count in neither mask
        keep = ~np.asarray(void).astype(bool)
        gt, pred = gt & keep, pred & keep
    return gt, pred


def _out(x: np.ndarray):
    return float(x) if x.ndim == 0 else x


def j_measure(gt, pred, void=None):
    """Region similarity J = |gt & pred| / |gt | pred| (1 if the union is empty), per frame."""
    gt, pred = _binary(gt, pred, void)
    inter, union = (gt & pred).sum((-2, -1)), (gt | pred).sum((-2, -1))
    return _out(np.where(union == 0, 1.0, inter / np.maximum(union, 1)))


def _dilate(b: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation of (T, H, W) by skimage `disk(r)` (dx^2 + dy^2 <= r^2), as a convolution."""
    k = torch.arange(-r, r + 1)
    disk = ((k[:, None] ** 2 + k[None] ** 2) <= r * r).float()[None, None]
    x = torch.from_numpy(b).float()[:, None]
    return (F.conv2d(x, disk, padding=r)[:, 0] > 0.5).numpy()


def f_measure(gt, pred, void=None, bound_th: float = 0.008):
    """Boundary F-measure of davis2017 `db_eval_boundary`, per frame. The tolerance is
    ceil(bound_th * image diagonal) pixels, or `bound_th` pixels when >= 1 (an integer)."""
    gt, pred = _binary(gt, pred, void)
    hw = gt.shape[-2:]
    r = int(bound_th) if bound_th >= 1 else int(np.ceil(bound_th * np.linalg.norm(hw)))
    gt_b, fg_b = seg2bmap(gt.reshape(-1, *hw)), seg2bmap(pred.reshape(-1, *hw))
    n_gt, n_fg = gt_b.sum((1, 2)), fg_b.sum((1, 2))
    fg_hit = (fg_b & _dilate(gt_b, r)).sum((1, 2))
    gt_hit = (gt_b & _dilate(fg_b, r)).sum((1, 2))
    # an empty boundary has P (or R) = 1; the other one is then 0 unless both are empty
    p = np.where(n_fg > 0, fg_hit / np.maximum(n_fg, 1), 1.0)
    rec = np.where(n_gt > 0, gt_hit / np.maximum(n_gt, 1), 1.0)
    f = np.where(p + rec > 0, 2 * p * rec / np.maximum(p + rec, 1e-12), 0.0)
    return _out(f.reshape(gt.shape[:-2]))


def db_statistics(per_frame) -> tuple[float, float, float]:
    """(mean, recall, decay) of per-frame values, as davis2017 `db_statistics`: nanmean, mean of
    x > 0.5, and the mean of the first minus the last of 4 bins."""
    x = np.asarray(per_frame, dtype=np.float64)
    # uint8 like the toolkit (wraps beyond 256 frames); +1e-10 rounds halves up
    ids = (np.round(np.linspace(1, len(x), 5) + 1e-10) - 1).astype(np.int64).astype(np.uint8)
    bins = [x[ids[i]:int(ids[i + 1]) + 1] for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty or all-nan bins give nan
        return (float(np.nanmean(x)), float(np.nanmean(x > 0.5)),
                float(np.nanmean(bins[0]) - np.nanmean(bins[3])))


def davis_sequence(gt, pred, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-object, per-frame J and F of one sequence (davis2017 semi-supervised mode): `gt`,
    `pred` int label maps (T, H, W), T >= 3. GT 255 (void) counts as background; the objects
    are 1..max id of GT frame 0; the first and last frames are not scored. Returns float64
    (J, F), each (K, T - 2), row k for object k + 1 (a missing object scores as an empty mask).
    Raises ValueError for unequal shapes, T < 3, or a predicted id above K (the toolkit
    aborts); `index` numbers the sequence in those messages."""
    gt, pred = np.array(gt), np.asarray(pred)
    if gt.shape != pred.shape or gt.ndim != 3 or len(gt) < 3:
        raise ValueError(f"davis_jf: sequence {index}: GT {gt.shape} and prediction {pred.shape} "
                         "must be equal (T, H, W) with T >= 3")
    gt[gt == 255] = 0
    num_objects = int(gt[0].max())
    gt, pred = gt[1:-1], pred[1:-1]
    if (k_res := int(pred.max())) > num_objects:
        raise ValueError(f"davis_jf: sequence {index}: prediction has id {k_res} but GT frame 0 "
                         f"has only {num_objects} objects")
    j = np.zeros((num_objects, len(gt)))
    f = np.zeros((num_objects, len(gt)))
    for obj in range(1, num_objects + 1):
        j[obj - 1] = j_measure(gt == obj, pred == obj)
        f[obj - 1] = f_measure(gt == obj, pred == obj)
    return j, f


def davis_scores(per_sequence: Sequence) -> dict[str, float]:
    """`davis_jf`'s dict from the `davis_sequence` (J, F) pairs of every sequence, in order:
    `db_statistics` per object, then means over all objects of all sequences."""
    stats: dict[str, list] = {"J": [], "F": []}
    for j, f in per_sequence:
        for obj in range(len(j)):
            stats["J"].append(db_statistics(j[obj]))
            stats["F"].append(db_statistics(f[obj]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no object at all gives nan
        j, f = (np.array(stats[m], dtype=np.float64).reshape(-1, 3).mean(0) for m in "JF")
    return {"J&F-Mean": float((j[0] + f[0]) / 2), "J-Mean": float(j[0]), "J-Recall": float(j[1]),
            "J-Decay": float(j[2]), "F-Mean": float(f[0]), "F-Recall": float(f[1]),
            "F-Decay": float(f[2])}


def davis_jf(gt_seqs: Sequence, pred_seqs: Sequence) -> dict[str, float]:
    """DAVIS-2017 semi-supervised scores of int label maps (T, H, W), one array per sequence.

    GT 255 (void) counts as background; the objects are 1..max id of GT frame 0; the first and
    last frames are not scored. A prediction id above that count is an error (the toolkit
    aborts); a missing object scores as an empty mask. Means are over all objects of all
    sequences; "J&F-Mean" is (J-Mean + F-Mean) / 2. Fractions in [0, 1].
    """
    if len(gt_seqs) != len(pred_seqs):
        raise ValueError(f"davis_jf: {len(gt_seqs)} GT sequences but {len(pred_seqs)} predictions")
    return davis_scores([davis_sequence(gt, pred, i)
                         for i, (gt, pred) in enumerate(zip(gt_seqs, pred_seqs))])


# ---- JHMDB ----
# MAT v5 data types and numeric array classes -> numpy dtypes (without byte order)
_MI = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MX = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8",
       15: "u8"}
_MX_NAMES = {1: "cell", 2: "struct", 3: "object", 4: "char", 5: "sparse"}
_MI_MATRIX, _MI_COMPRESSED = 14, 15


def _element(buf: bytes, pos: int, e: str) -> tuple[int, bytes, int]:
    """One data element at `pos`: (type, payload, position of the next element)."""
    (word,) = struct.unpack_from(e + "I", buf, pos)
    if word >> 16:  # small element: size in the upper 16 bits, payload in the next 4 bytes
        return word & 0xFFFF, buf[pos + 4:pos + 4 + (word >> 16)], pos + 8
    mtype, nbytes = struct.unpack_from(e + "II", buf, pos)
    end = pos + 8 + nbytes
    if end > len(buf):
        raise cli.InputError(f"element of {nbytes} bytes at offset {pos} runs past the end")
    return mtype, buf[pos + 8:end], end if mtype == _MI_COMPRESSED else end + (-nbytes % 8)


def _matrix(body: bytes, e: str) -> tuple[str, object]:
    """(name, array) of a miMATRIX payload, or (name, class name) if it is not numeric."""
    _, flags, pos = _element(body, 0, e)
    _, dims, pos = _element(body, pos, e)
    _, name, pos = _element(body, pos, e)
    name, (flags, _) = name.decode("latin-1"), struct.unpack(e + "II", flags)
    cls = flags & 0xFF
    if cls not in _MX or flags & 0x800:  # 0x800: complex
        return name, "complex" if cls in _MX else _MX_NAMES.get(cls, f"class {cls}")
    mtype, data, _ = _element(body, pos, e)  # the real part
    if mtype not in _MI:
        raise cli.InputError(f"variable {name!r}: unsupported data type {mtype}")
    shape = tuple(np.frombuffer(dims, e + "i4"))
    return name, np.frombuffer(data, e + _MI[mtype]).astype(_MX[cls]).reshape(shape, order="F")


def read_mat_v5(path, names: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
    """Numeric variables of a MATLAB v5 .mat file (as JHMDB's `joint_positions.mat`).

    Handles both byte orders, zlib-compressed variables and small elements; arrays come back in
    MATLAB's (column-major) shape, as the class's dtype. Complex, cell, struct, char and sparse
    variables are skipped; asking for one in `names` (which restricts the result) is an error.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot read .mat file ({err})") from None
    if data[:19] == b"MATLAB 7.3 MAT-file":
        raise cli.InputError(f"{path}: MATLAB 7.3 (HDF5) .mat files are not supported, only v5")
    e = {b"IM": "<", b"MI": ">"}.get(data[126:128])
    if len(data) < 128 or not data.startswith(b"MATLAB") or e is None:
        raise cli.InputError(f"{path}: not a MATLAB v5 .mat file")
    found, skipped, pos = {}, {}, 128
    try:
        while pos + 8 <= len(data):
            mtype, body, pos = _element(data, pos, e)
            if mtype == _MI_COMPRESSED:
                mtype, body, _ = _element(zlib.decompress(body), 0, e)
            if mtype == _MI_MATRIX and body:
                name, value = _matrix(body, e)
                (skipped if isinstance(value, str) else found)[name] = value
    except (ValueError, struct.error, zlib.error) as err:
        raise cli.InputError(f"{path}: malformed .mat file ({err})") from None
    if names is None:
        return found
    for n in names:
        if n in skipped:
            raise cli.InputError(f"{path}: variable {n!r} is a {skipped[n]} array, not numeric")
        if n not in found:
            raise cli.InputError(f"{path}: no variable {n!r} "
                                 f"(has {sorted(found) + sorted(skipped)})")
    return {n: found[n] for n in names}


def joint_heatmaps(points, size: tuple[int, int], sigma: float = 0.5) -> Tensor:
    """(J, 2) (x, y) grid coordinates -> (1 + J, h, w): background (1 where every joint map is
    0), then one unnormalised Gaussian per joint, drawn as videowalk `draw_labelmap_np`: a
    (6 sigma + 1)-wide window whose corner is int(pt - 3 sigma), truncated toward zero."""
    h, w = size
    pts = np.asarray(points, dtype=np.float64)
    maps = np.zeros((len(pts) + 1, h, w))
    g = np.arange(0, 6 * sigma + 1, 1, float)
    c = (6 * sigma + 1) // 2
    g = np.exp(-((g[None] - c) ** 2 + (g[:, None] - c) ** 2) / (2 * sigma ** 2))
    for j, (x, y) in enumerate(pts, 1):
        x0, y0 = int(x - 3 * sigma), int(y - 3 * sigma)
        x1, y1 = int(x + 3 * sigma + 1), int(y + 3 * sigma + 1)
        if x0 >= w or y0 >= h or x1 < 0 or y1 < 0:
            continue
        maps[j, max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] = \
            g[max(-y0, 0):min(y1, h) - y0, max(-x0, 0):min(x1, w) - x0]
    maps[0] = maps[1:].sum(0) == 0
    return torch.from_numpy(maps).float()


def heatmaps_to_points(maps: Tensor, topk: int = 5) -> Tensor:
    """(J, h, w) joint maps (background dropped) -> (J, 2) (x, y): mean of the top-k cells
    weighted by their normalised values; (-1, -1) for a map that sums to 0 (`process_pose`)."""
    J, h, w = maps.shape
    flat = maps.reshape(J, h * w).float()
    vals, ids = flat.topk(min(topk, h * w), dim=1)
    vals = vals / vals.sum(1, keepdim=True)
    pts = torch.stack([((ids % w) * vals).sum(1), ((ids // w) * vals).sum(1)], 1)
    pts[flat.sum(1) == 0] = -1
    return pts


def pck(pred, gt, alphas: Sequence[float] = (0.1, 0.2)) -> dict[str, float]:
    """PCK in percent of videowalk `eval_pck`: {"PCK@0.1": ..., ...}.

    `pred`, `gt`: (T, J, 2) (x, y) in pixels, or lists of those (one per video). Frame 0 is
    skipped, and joints with a predicted x < 0. Scale: 0.6 * diagonal of the box around the
    frame's GT joints that count. Counts of d / scale <= alpha are pooled per joint over all
    frames and videos; the score is the mean of the per-joint percentages.
    """
    if not isinstance(pred, (list, tuple)):
        pred, gt = [pred], [gt]
    dists: list = []
    for v, (p, g) in enumerate(zip(pred, gt)):
        p, g = np.asarray(p, dtype=np.float64), np.asarray(g, dtype=np.float64)
        if p.shape != g.shape or p.ndim != 3 or p.shape[-1] != 2:
            raise ValueError(f"pck: video {v}: pred {p.shape} and gt {g.shape} must be (T, J, 2)")
        ok = p[..., 0] >= 0  # (T, J)
        lo = np.minimum(np.where(ok[..., None], g, 1e6).min(1), 1e6)  # box, official init values
        hi = np.maximum(np.where(ok[..., None], g, -1.0).max(1), -1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.linalg.norm(p - g, axis=-1) / (0.6 * np.linalg.norm(hi - lo, axis=-1))[:, None]
        dists.append([d[1:, j][ok[1:, j]] for j in range(p.shape[1])])
    per_joint = [np.concatenate(ds) for ds in zip(*dists)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a joint never counted gives nan
        return {f"PCK@{a}": float(np.nanmean([100.0 * (d <= a).mean() if len(d) else np.nan
                                              for d in per_joint])) for a in alphas}


# ---- VIP ----
def confusion(gt, pred, num_classes: int = 20) -> np.ndarray:
    """(C, C) counts, rows GT, columns prediction; GT ids outside [0, C) are ignored."""
    gt, pred = np.asarray(gt).astype(np.int64).ravel(), np.asarray(pred).astype(np.int64).ravel()
    if gt.shape != pred.shape:
        raise ValueError(f"confusion: GT has {gt.size} pixels, prediction {pred.size}")
    keep = (gt >= 0) & (gt < num_classes)
    gt, pred = gt[keep], pred[keep]
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"confusion: predicted ids must be in [0, {num_classes})")
    return np.bincount(num_classes * gt + pred, minlength=num_classes ** 2).reshape(
        num_classes, num_classes)


def miou(hist: np.ndarray) -> float:
    """Mean over classes of diag / (row + col - diag); classes absent from both are ignored."""
    hist = np.asarray(hist, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.diag(hist) / (hist.sum(0) + hist.sum(1) - np.diag(hist))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(iou))


# ---- benchmark drivers: a feature function in, scores out ----
# `feat_fn(frames)` maps ImageNet-normalised frames (B, 3, H, W) to features (B, C, h, w) on the
# frames' device; the drivers L2-normalise them, propagate, and score as the official scripts.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _picklable(err: BaseException) -> BaseException:
    """`err` if it survives pickling (to travel to the other ranks), else a RuntimeError with
    its type and message."""
    try:
        return pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001  (any exception class may refuse to pickle)
        return RuntimeError(f"{type(err).__name__}: {err}")


def per_video(fn, n: int) -> list:
    """[fn(0), ..., fn(n - 1)] on every rank, the calls shared between the ranks.

    In one process (no initialised group) a plain loop. Called on EVERY rank of an initialised
    process group, rank r computes fn(i) for i = r, r + world, ... only, and the results (small
    picklable objects: statistics, not label maps) are gathered with `all_gather_object` (gloo
    on CPU; nccl on the current CUDA device, which `dist.init` sets); every rank returns the full
    list in video order. An exception on any rank is raised on every rank after the gather (the
    one of the lowest video index; the rank that raised it keeps its traceback), so no rank is
    left waiting in a collective."""
    if not dist.is_dist():
        return [fn(i) for i in range(n)]
    rank, world = dist.rank(), dist.world()
    mine, failed = {}, None
    for i in range(rank, n, world):
        try:
            mine[i] = fn(i)
        except Exception as err:  # noqa: BLE001  (re-raised on every rank below)
            failed = (i, err)
            break
    shared = [None] * world
    torch.distributed.all_gather_object(
        shared, (mine, None if failed is None else (failed[0], _picklable(failed[1]))))
    errors = sorted((e for _, e in shared if e is not None), key=lambda e: e[0])
    if errors:
        if failed is not None and failed[0] == errors[0][0]:
            raise failed[1]
        raise errors[0][1]
    out = {}
    for part, _ in shared:
        out.update(part)
    return [out[i] for i in range(n)]


def read_pair_list(path, what: str) -> list:
    """[(Path, Path)] of a videowalk file list, lines `<a> <b>` relative to the list's folder
    (JHMDB: `<joint_positions.mat> <frames dir>`; VIP: `<Images/videosN> <Category_ids/videosN>`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} file list not found")
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise cli.InputError(f"{path}:{lineno}: expected '<{what} input> <{what} labels>', got "
                             f"{line.strip()!r}")
        a, b = (f if Path(f).is_absolute() else path.parent / f for f in fields)
        for p in (a, b):
            if not Path(p).exists():
                raise FileNotFoundError(f"{path}:{lineno}: {p} does not exist")
        out.append((Path(a), Path(b)))
    if not out:
        raise cli.InputError(f"{path}: empty {what} file list")
    return out


def _frame_files(folder: Path) -> list:
    files = [p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    if not files:
        raise FileNotFoundError(f"{folder}: no frames (.jpg/.png)")
    return sorted(files, key=lambda p: (int(p.stem) if p.stem.isdigit() else -1, p.name))


def load_frames(paths: Sequence, size: tuple[int, int]) -> Tensor:
    """(T, 3, H, W) float frames, RGB, resized bilinearly without antialiasing (cv2
    INTER_LINEAR, as the official loaders) to `size` (H, W), ImageNet-normalised."""
    frames = []
    for p in paths:
        try:
            with Image.open(p) as im:
                frames.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
        except OSError as e:
            raise cli.InputError(f"{p}: unreadable frame ({e})") from None
    x = F.interpolate(torch.stack(frames).float() / 255, size=tuple(size), mode="bilinear",
                      align_corners=False, antialias=False)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@torch.no_grad()
def video_features(feat_fn, paths: Sequence, size: tuple[int, int], device="cpu",
                   batch: int = 5) -> Tensor:
    """(T, C, h, w) fp32 features of the frames `paths`, `batch` frames at a time, L2-normalised
    over C."""
    out = [feat_fn(load_frames(paths[i:i + batch], size).to(device)).float()
           for i in range(0, len(paths), batch)]
    return F.normalize(torch.cat(out), dim=1)


def resize_nearest(label: Tensor, size, how: str = "pil") -> Tensor:
    """(..., H, W) int ids -> (..., *size) by nearest neighbour, as PIL `Image.NEAREST`
    (`how="pil"`: PIL itself, whose source coordinates accumulate in floating point, so no
    closed form matches it everywhere) or as cv2 `INTER_NEAREST` (`how="cv2"`: source index
    floor(i * (1 / (out / in))) in double precision, as cv2's `resizeNN`)."""
    if tuple(label.shape[-2:]) == tuple(size):
        return label
    (H0, W0), (H, W) = label.shape[-2:], size
    flat = torch.as_tensor(label).reshape(-1, H0, W0).cpu()
    if how == "cv2":
        rows = np.minimum(np.floor(np.arange(H) * (1.0 / (H / H0))), H0 - 1).astype(np.int64)
        cols = np.minimum(np.floor(np.arange(W) * (1.0 / (W / W0))), W0 - 1).astype(np.int64)
        out = flat[:, torch.from_numpy(rows)][:, :, torch.from_numpy(cols)]
    elif how == "pil":
        out = torch.stack([torch.from_numpy(np.array(
            Image.fromarray(x.numpy().astype(np.int32)).resize((W, H), Image.NEAREST)))
            for x in flat])
    else:
        raise ValueError(f"resize_nearest: how must be 'pil' or 'cv2', not {how!r}")
    return out.reshape(*label.shape[:-2], H, W).to(label.dtype)


def pixel_features(frames: torch.Tensor, p: int) -> torch.Tensor:
    """The raw-pixel baseline's feature function: each p x p patch's normalised RGB values,
    (B, 3, H, W) -> (B, 3 p^2, H/p, W/p)."""
    return F.unfold(frames, p, stride=p).view(len(frames), -1, frames.shape[-2] // p,
                                              frames.shape[-1] // p)


@full_fp32()
def eval_davis(feat_fn, root, size: tuple[int, int] = (480, 880), topk: int = 7,
               temperature: float = 0.7, radius: float = 20.0, context: int = 20,
               gt_at_eval_size: bool = True, out_dir=None, device="cpu") -> tuple[dict, list]:
    """DAVIS-2017 semi-supervised J&F of `feat_fn` on `root` (val split): frames at `size`;
    the first-frame annotation nearest-resized to `size`, then its one-hot bilinearly reduced
    to the feature grid (the official loader's order); `propagate`, bilinear upsampling, argmax.

    `gt_at_eval_size`: every annotation PIL-NEAREST-resized to `size` first, as CropMAE's
    DAVIS_480_880 copy, and scored there (9 px F tolerance at 480x880). Else (T-CoRe) scored
    at the native GT size: the loader cv2-nearest-resizes the first annotation to `size`, and
    `convert_davis` the predictions back to the GT size. Returns (the `davis_jf` dict, preds),
    preds = [(name, frame paths, pred (T, H, W) uint8 at the scored size)].

    Under an initialised process group, call it on every rank (it gathers): sequence i is
    computed on rank i % world, every rank returns the same scores (those of one process), but
    preds holds this rank's sequences only, in order (rank 0's starts with the first sequence),
    and each rank writes its own sequences' PNGs when `out_dir` is set (indexed
    `out_dir/<seq>/<t:05d>.png` at the scored size). In one process preds holds them all.
    """
    seqs, out = read_davis(root), []

    def sequence(i: int) -> tuple:
        name, frames, masks = seqs[i]
        if len(frames) != len(masks):
            raise cli.InputError(f"{root}: sequence {name!r} has {len(frames)} frames but "
                                 f"{len(masks)} annotations (semi-supervised val annotates all)")
        gt = torch.from_numpy(np.stack([read_label_png(m) for m in masks]))
        gt[gt == 255] = 0  # the toolkit's semi-supervised mode: void counts as background
        if gt_at_eval_size:
            gt = resize_nearest(gt, size)
        feats = video_features(feat_fn, frames, size, device)  # (T, C, h, w)
        first = resize_nearest(gt[0], size, "cv2")  # the loader's resize; no-op on eval-size GT
        first = label_to_onehot(first, int(gt[0].max()) + 1, tuple(feats.shape[-2:]))
        soft = propagate(feats, first.to(feats.device), topk, temperature, context, radius).cpu()
        pred = torch.stack([soft_to_label(s, size) for s in soft])  # (T, H, W) at eval size
        if not gt_at_eval_size:
            pred = resize_nearest(pred, gt.shape[-2:], "cv2")
        pred = pred.to(torch.uint8)
        out.append((name, frames, pred))
        if out_dir is not None:
            for t, p in enumerate(pred):
                write_label_png(Path(out_dir) / name / f"{t:05d}.png", p.numpy())
        return davis_sequence(gt.numpy(), pred.numpy(), i)  # (J, F) per object and frame

    return davis_scores(per_video(sequence, len(seqs))), out


@full_fp32()
def eval_jhmdb(feat_fn, file_list, size: tuple[int, int] = (320, 320), topk: int = 7,
               temperature: float = 0.7, radius: float = 20.0, context: int = 20,
               device="cpu") -> dict:
    """JHMDB PCK of `feat_fn`: frames at `size`, the 15 joints of frame 0 (`pos_img` - 1,
    scaled to the grid) as Gaussian heatmaps plus background, `propagate`, top-5 soft-argmax,
    coordinates mapped back to the original frame size, `pck` (frame 0 skipped). Returns
    `pck`'s dict. Under an initialised process group, call it on every rank: video i is
    computed on rank i % world, the per-frame points are gathered, and every rank returns the
    scores of one process."""
    videos = read_pair_list(file_list, "JHMDB")

    def points(i: int) -> tuple:
        mat, folder = videos[i]
        frames = _frame_files(folder)
        pos = read_mat_v5(mat, ["pos_img"])["pos_img"].astype(np.float64) - 1  # (2, J, T)
        T = min(len(frames), pos.shape[2])
        gt = torch.from_numpy(pos[:, :, :T]).permute(2, 1, 0).float()  # (T, J, 2) pixels
        with Image.open(frames[0]) as im:
            W0, H0 = im.size
        feats = video_features(feat_fn, frames[:T], size, device)
        h, w = feats.shape[-2:]
        scale = torch.tensor([w / W0, h / H0])  # = (320 / W0) / 16 at 320 px, patch 16
        first = joint_heatmaps((gt[0] * scale).numpy(), (h, w)).to(feats.device)
        soft = propagate(feats, first, topk, temperature, context, radius).cpu()
        pts = torch.stack([heatmaps_to_points(s[1:]) for s in soft])  # (T, J, 2) grid units
        return (pts / scale).numpy(), gt.numpy()  # invisible joints (-1) stay negative

    preds, gts = zip(*per_video(points, len(videos)))
    return pck(list(preds), list(gts))


def vip_size(height: int, width: int, long_side: int = 880) -> tuple[int, int]:
    """VIP eval size (H, W): the long side set to `long_side`, the short side scaled and floored
    to a multiple of 64 (720 x 1280 -> 448 x 880)."""
    short, long = min(height, width), max(height, width)
    s = int(short * long_side / long / 64) * 64
    return (s, long_side) if width >= height else (long_side, s)


@full_fp32()
def eval_vip(feat_fn, file_list, long_side: int = 880, topk: int = 10, temperature: float = 0.7,
             radius: float = 20.0, context: int = 20, num_classes: int = 20,
             device="cpu") -> dict:
    """VIP mIoU of `feat_fn`: frames at `vip_size`; frame 0's class ids cv2-nearest-resized to
    that size, one-hot, bilinearly reduced to the grid (the official loader's order);
    `propagate`, argmax at eval size, PIL-NEAREST-resized to the GT size (`eval_vip`); one
    confusion matrix over every annotated frame, frame 0 included. Returns {"mIoU": ...}.
    Under an initialised process group, call it on every rank: video i is computed on rank
    i % world, the per-video confusion matrices are gathered and summed, and every rank
    returns the score of one process."""
    videos = read_pair_list(file_list, "VIP")

    def video_hist(i: int) -> np.ndarray:
        img_dir, ann_dir = videos[i]
        frames = _frame_files(img_dir)
        anns = [ann_dir / f"{f.stem}.png" for f in frames]
        if not anns[0].is_file():
            raise FileNotFoundError(f"{anns[0]}: VIP needs the first frame's annotation")
        gt0 = torch.from_numpy(read_label_png(anns[0])).long()
        size = vip_size(*gt0.shape, long_side)
        feats = video_features(feat_fn, frames, size, device)
        gt0[(gt0 < 0) | (gt0 >= num_classes)] = 0  # ignore ids start as background
        first = label_to_onehot(resize_nearest(gt0, size, "cv2"), num_classes,
                                tuple(feats.shape[-2:]))
        soft = propagate(feats, first.to(feats.device), topk, temperature, context, radius).cpu()
        hist = np.zeros((num_classes, num_classes), np.int64)
        for s, ann in zip(soft, anns):
            if ann.is_file():
                gt = read_label_png(ann)
                pred = resize_nearest(soft_to_label(s, size), gt.shape)
                hist += confusion(gt, pred.numpy(), num_classes)
        return hist

    hist = np.zeros((num_classes, num_classes), np.int64)
    for h in per_video(video_hist, len(videos)):
        hist += h
    return {"mIoU": miou(hist)}


def overlay(frame: Tensor, label: Tensor, alpha: float = 0.5) -> Tensor:
    """(3, H, W) uint8 frame with (H, W) ids painted in the DAVIS palette (0 left as is)."""
    pal = torch.tensor(davis_palette(), dtype=torch.float32).view(256, 3)
    colour = pal[label.long()].permute(2, 0, 1)
    fg = (label > 0)[None]
    out = torch.where(fg, (1 - alpha) * frame.float() + alpha * colour, frame.float())
    return out.round().clamp(0, 255).to(torch.uint8)
