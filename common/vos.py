"""Unsupervised video object segmentation (SIGMA Tab. 4, the "Time Does Tell" protocol, spec
vos.md): a frozen encoder's dense features of a clip are standardised, reduced by PCA, upsampled
to the frame size and clustered by k-means; clusters are matched to the GT labels (Hungarian
with K = #labels: "clustering"; precision-based many-to-one with K = 10: "overclustering") and
scored by mIoU pooled over the clip's frames, background included; fractions in [0, 1].
`eval_vos` shares the clips between torchrun ranks as `propagation.eval_davis` does, and every
rank returns what one process computes (frames and k-means draw from the seed and clip index).
"""
import contextlib
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from . import cli, log
from .evaluate import full_fp32
from .propagation import MEAN, overlay, per_video, read_davis, read_label_png, resize_nearest

STD_OFFICIAL = (0.228, 0.224, 0.225)  # TT:video_transformations.py:240-280, a typo for 0.229
STD_CORRECT = (0.229, 0.224, 0.225)
FRAMES = {"davis": 16, "ytvos": 4}  # SIGMA's clip lengths (spec §1, index.html:330)
IGNORE = 255


# ---- data ----
def read_ytvos(root, split_list=None) -> list:
    """[(name, [frame .jpg], [mask .png], {instance id: category id})] of a YouTube-VOS train
    layout (JPEGImages/<video>/, Annotations/<video>/, meta.json), by sorted name (TT:
    data_loader.py:575-577); `split_list` (TimeT_clean's val.txt: one id a line) selects, else
    all. Category id = 1 + index in the sorted category names of meta.json (spec §2). Frames and
    masks pair by rank (TT:data_loader.py:595-614): equal counts, else cli.InputError."""
    meta_path = (root := Path(root)) / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: YouTube-VOS meta.json not found (expected "
                                "JPEGImages/<video>, Annotations/<video>, meta.json)")
    try:
        meta = json.loads(meta_path.read_text())["videos"]
        cats = {v["objects"][o]["category"] for v in meta.values() for o in v["objects"]}
        if bad := [o for v in meta.values() for o in v["objects"] if not 0 < int(o) < IGNORE]:
            raise ValueError(f"object ids {bad[:3]} outside 1..254")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise cli.InputError(f"{meta_path}: not a YouTube-VOS meta.json ({e!r})") from None
    cat_id = {c: i + 1 for i, c in enumerate(sorted(cats))}  # TT:data_loader.py:453-464
    if split_list is not None:
        lines = Path(split_list).read_text().splitlines()
        first = {}  # a name listed twice is evaluated once
        for i, n in enumerate(lines, 1):
            if n.strip():
                first.setdefault(n.strip(), i)
        names = sorted(first.items())
    else:
        names = [(p.name, 0) for p in sorted((root / "JPEGImages").glob("*")) if p.is_dir()]
    out = []
    for name, lineno in names:
        where = f"{split_list}:{lineno}: " if lineno else ""
        frames = sorted((root / "JPEGImages" / name).glob("*.jpg"))
        masks = sorted((root / "Annotations" / name).glob("*.png"))
        if not frames or len(frames) != len(masks) or name not in meta:
            raise cli.InputError(f"{where}{root / 'JPEGImages' / name}: {len(frames)} frames, "
                                 f"{len(masks)} masks in Annotations/{name}, "
                                 f"{'' if name in meta else 'not '}in meta.json")
        out.append((name, frames, masks, {int(o): cat_id[d["category"]]
                                          for o, d in meta[name]["objects"].items()}))
    if not out:
        raise cli.InputError(f"{split_list or root / 'JPEGImages'}: no videos")
    return out


def to_categories(masks: np.ndarray, remap: dict, path="") -> np.ndarray:
    """Instance ids (T, H, W) -> category ids by `remap`, into a copy (pitfall 7: the official
    in-place loop remaps twice); 0, 255 stay; an id not in `remap`: cli.InputError."""
    lut = np.arange(256, dtype=np.uint8)
    for inst, cat in remap.items():
        lut[inst] = cat
    if extra := set(np.unique(masks).tolist()) - set(remap) - {0, IGNORE}:
        raise cli.InputError(f"{path}: instance ids {sorted(extra)} not in meta.json")
    return lut[masks]


def sample_frames(n: int, num_frames: int, rng: np.random.Generator) -> list:
    """`num_frames` sorted random frame indices of a video of `n` frames, distinct when
    n >= num_frames, else drawn with replacement (UNIFORM mode, TT:data_loader.py:617-627)."""
    return sorted(rng.choice(n, num_frames, replace=n < num_frames).tolist())


def load_clip(frames: Sequence, masks: Sequence, size: int = 224,
              std: Sequence = STD_OFFICIAL) -> tuple:
    """(x (T, 3, S, S) float normalised with ImageNet mean and `std`, gt (T, S, S) uint8 ids):
    a squash to S x S, PIL bilinear for frames and PIL nearest for masks (spec §2,
    TT:video_transformations.py:56-94, 240-280)."""
    x = []
    for p in frames:
        try:
            with Image.open(p) as im:
                x.append(np.array(im.convert("RGB").resize((size, size), Image.BILINEAR)))
        except OSError as e:
            raise cli.InputError(f"{p}: unreadable frame ({e})") from None
    x = torch.from_numpy(np.stack(x)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    gt = resize_nearest(torch.from_numpy(np.stack([read_label_png(m) for m in masks])),
                        (size, size))
    return x, gt


# ---- clustering (spec §4, TT:clustering.py:20-80) ----
@contextlib.contextmanager
def _serial(device):
    """One CPU thread inside: on small matrices threads only synchronise (100x slower on 2 busy
    cores, measured); the thread count is restored on exit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if torch.device(device).type == "cpu" else threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pca_fit(x: Tensor, dim: int = 50) -> Callable[[Tensor], Tensor]:
    """Fit StandardScaler (per-dimension mean, population std; a constant dimension keeps
    scale 1) then PCA to min(dim, D) directions (faiss PCAMatrix without whitening:
    covariance eigenvectors by decreasing eigenvalue) on x (N, D); returns the map (..., D) ->
    (..., dim), float32, fitted in float64."""
    x = x.double()
    mean, std = x.mean(0), x.std(0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    z = (x - mean) / std  # centred: PCAMatrix's own mean is 0 here
    with _serial(x.device):
        evals, evecs = torch.linalg.eigh(z.T @ z / len(z))
    proj = evecs[:, evals.argsort(descending=True)[:dim]]
    return lambda y: (((y.double() - mean) / std) @ proj).float()


def kmeans(x: Tensor, k: int, niter: int = 50, nredo: int = 5, seed: int = 1,
           max_points: int = 256, chunk: int = 1 << 16) -> Tensor:
    """Labels (N,) int64 of Euclidean k-means of x (N, D) as faiss.Kmeans(d, k, niter, nredo,
    seed): train on a random subsample of at most max_points * k points, `nredo` restarts from
    k distinct random points, `niter` Lloyd steps each, keep the lowest training inertia; an
    empty cluster moves to the point farthest from its centroid (sklearn; faiss's +-1/1024
    split cannot separate duplicates at the origin); then all points go to their nearest
    centroid, `chunk` at a time. Draws from a CPU generator seeded `seed`: deterministic on any
    device (faiss's own RNG is not reproduced). ValueError when N < k."""
    x, n, g = x.float(), len(x), torch.Generator().manual_seed(seed)
    if n < k:
        raise ValueError(f"kmeans: {n} points for {k} clusters")
    train = x[torch.randperm(n, generator=g)[:max_points * k].to(x.device)] \
        if n > max_points * k else x
    sqdist = lambda a, c: (a * a).sum(1, keepdim=True) - 2 * a @ c.T + (c * c).sum(1)  # noqa
    best, best_obj = None, float("inf")
    with _serial(x.device):
        for _ in range(nredo):
            c = train[torch.randperm(len(train), generator=g)[:k].to(x.device)].clone()
            for _ in range(niter):
                d = sqdist(train, c)  # (M, k)
                onehot = F.one_hot(d.argmin(1), k).float()
                counts, sums = onehot.sum(0), onehot.T @ train  # no atomics: deterministic
                c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
                if (empty := (counts == 0).nonzero().flatten()).numel():  # farthest points
                    c[empty] = train[d.min(1).values.argsort(descending=True)[:len(empty)]]
            obj = float(sqdist(train, c).min(1).values.clamp_min(0).sum())
            if obj < best_obj:
                best, best_obj = c, obj
    return torch.cat([sqdist(x[i:i + chunk], best).argmin(1) for i in range(0, n, chunk)])


def cluster_clip(feats: Tensor, k: int, size: Optional[int] = 224, project=None,
                 **kmeans_kw) -> Tensor:
    """Cluster ids (T, S, S) of one clip's dense features (T, h, w, D): `project` (default: a
    `pca_fit` on this clip's tokens, i.e. per clip, spec pitfall 5), bilinear upsampling of
    the projected features to S x S (align_corners False, TT:clustering.py:48-52; size None:
    token resolution), `kmeans` over all T * S * S vectors (spec §4.3)."""
    T, h, w, D = feats.shape
    z = (project or pca_fit(feats.reshape(-1, D)))(feats.reshape(-1, D))
    z = z.view(T, h, w, -1).permute(0, 3, 1, 2)
    if size is not None and (h, w) != (size, size):
        z = F.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)
    return kmeans(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), k, **kmeans_kw).view(
        T, *z.shape[-2:])


# ---- matching and mIoU (spec §5, TT:metrics.py:209-505) ----
def linear_sum_assignment(cost) -> list:
    """Minimum-cost assignment of a (n, m) cost matrix: [(row, col)] of min(n, m) pairs,
    sorted by row. The O(n^2 m) shortest augmenting path method with potentials (Kuhn-Munkres,
    as e-maxx writes it), on the transpose when n > m."""
    a = np.asarray(cost, dtype=np.float64)
    if a.shape[0] > a.shape[1]:
        return sorted((r, c) for c, r in linear_sum_assignment(a.T))
    n, m = a.shape
    u, v, match, way = np.zeros(n + 1), np.zeros(m + 1), np.zeros(m + 1, int), np.zeros(m + 1, int)
    for i in range(1, n + 1):  # add row i, then augment along a shortest path
        match[0], j0 = i, 0
        minv, used = np.full(m + 1, np.inf), np.zeros(m + 1, bool)
        while match[j0]:
            used[j0], i0 = True, match[j0]
            cur = a[i0 - 1] - u[i0] - v[1:]
            better = ~used[1:] & (cur < minv[1:])
            minv[1:][better], way[1:][better] = cur[better], j0
            j1 = int(np.argmin(np.where(used[1:], np.inf, minv[1:]))) + 1
            delta = minv[j1]
            u[match[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
        while j0:
            j1 = way[j0]
            match[j0], j0 = match[j1], j1
    return sorted((match[j] - 1, j - 1) for j in range(1, m + 1) if match[j])


def cluster_miou(clusters, gt, num_clusters: Optional[int] = None, matching: str = "hungarian",
                 precision_based: bool = True) -> dict:
    """Match one clip's cluster ids to its GT labels and score it (spec §5). clusters, gt: int
    label maps of equal shape (T, H, W), tensors or arrays, frames pooled. GT 255 is ignored
    (the spec's recommendation; the official clip-wise path has none). G = sorted GT labels,
    P = cluster ids present (in [0, num_clusters) when given). "hungarian":
    linear_sum_assignment(1 - IoU) on |G| x |P|, unmatched clusters -> 0; "many_to_one": each
    cluster -> argmax_g Prec(g, p) (IoU unless precision_based), ties to the smallest label.
    Returns {"miou": mean over G of IoU_g, background included, "iou": {g: IoU_g}, "pred": the
    relabelled (T, H, W) int64 array}. ValueError: shapes, matching, ids, no pixel but 255."""
    c, y = np.asarray(torch.as_tensor(clusters).cpu()), np.asarray(torch.as_tensor(gt).cpu())
    if c.shape != y.shape or matching not in ("hungarian", "many_to_one"):
        raise ValueError(f"cluster_miou: shapes {c.shape} vs {y.shape}, matching {matching!r}")
    keep = y != IGNORE
    if not keep.any():
        raise ValueError("cluster_miou: no labelled pixel (all 255)")
    c, yk = c.astype(np.int64), y[keep].astype(np.int64)
    if c.size and (c.min() < 0 or (num_clusters is not None and c.max() >= num_clusters)):
        raise ValueError(f"cluster_miou: cluster ids outside [0, {num_clusters or 'inf'})")
    G, P = np.unique(yk), np.unique(c[keep])
    gi, pi = np.searchsorted(G, yk), np.searchsorted(P, c[keep])
    tp = np.bincount(gi * len(P) + pi, minlength=len(G) * len(P)).reshape(len(G), len(P))
    gsum, psum = tp.sum(1, keepdims=True), tp.sum(0, keepdims=True)
    iou = tp / np.maximum(gsum + psum - tp, 1e-8)  # TT:metrics.py:434-479
    lut = np.zeros(int(c.max()) + 1, np.int64)  # clusters unmatched or only on 255 -> 0
    if matching == "hungarian":
        for i, j in linear_sum_assignment(1 - iou):
            lut[P[j]] = G[i]
    else:
        score = tp / np.maximum(psum, 1e-8) if precision_based else iou
        lut[P] = G[score.argmax(0)]  # first maximum: ties to the smallest label
    pred = lut[c]
    pk = pred[keep]
    out = {int(g): float(((yk == g) & (pk == g)).sum() / ((yk == g) | (pk == g)).sum())
           for g in G}
    return {"miou": float(np.mean(list(out.values()))), "iou": out, "pred": pred}


def batch_mean(values: Sequence, batch: int = 16) -> float:
    """The official dataset score: the mean over consecutive batches of `batch` clips of the
    mean within each (TT:evaluation.py:310, 482)."""
    return float(np.mean([np.mean(values[i:i + batch]) for i in range(0, len(values), batch)]))


# ---- benchmark driver ----
@full_fp32()
@torch.no_grad()
def eval_vos(feature_fn, root, dataset: str = "davis", k_values: Sequence = ("gt", 10),
             frames: Optional[int] = None, seed: int = 1, size: int = 224,
             std: Sequence = STD_OFFICIAL, pca_dim: int = 50, pca_batch: int = 1,
             split_list=None, davis_annotations: str = "Annotations", device="cpu",
             picture: Optional[str] = None, **kmeans_kw) -> dict:
    """Tab. 4 mIoU of `feature_fn` (normalised clip (T, 3, S, S) on `device` -> dense features
    (T, h, w, D); a tubelet model repeats its tokens along time) on DAVIS-2017 val (instance
    ids as they are) or YouTube-VOS (`read_ytvos`, category ids). One clip per video:
    `frames` (default FRAMES[dataset]) by `sample_frames` with rng (seed, video index),
    `load_clip`, `cluster_clip` at S (k-means seed `seed`). k_values: "gt" = clustering (K =
    #GT labels incl. background, Hungarian); an int K = overclustering (precision-based
    many-to-one), named "overclustering" for K = 10, else "overclustering_k<K>". pca_batch:
    consecutive clips sharing one standardisation + PCA fit (1: per clip, default; 16: the
    official loader batch, pitfall 5). Returns {setting: {"miou": plain mean over clips,
    "miou_batch16": official mean of batch means}, "videos": [{"name", "frames", setting:
    mIoU}]} on every rank; the rank holding video 0 writes `picture` (`save_picture`)."""
    if dataset not in FRAMES:
        raise ValueError(f"eval_vos: dataset must be 'davis' or 'ytvos', not {dataset!r}")
    videos = read_ytvos(root, split_list) if dataset == "ytvos" else [
        (n, f, m, None) for n, f, m in read_davis(root, annotations=davis_annotations)]
    for name, fr, ms, _ in videos:  # frames and masks pair by rank (spec §2)
        if len(fr) != len(ms):
            raise cli.InputError(f"{ms[0].parent}: {len(ms)} masks for the {len(fr)} frames of "
                                 f"{fr[0].parent} (they pair by rank)")
    num_frames = frames or FRAMES[dataset]
    names = ["clustering" if k == "gt" else "overclustering" if k == 10 else
             f"overclustering_k{k}" for k in k_values]

    def unit(u: int) -> list:
        clips = []
        for i in range(u * pca_batch, min((u + 1) * pca_batch, len(videos))):
            name, fr, ms, remap = videos[i]
            idx = sample_frames(len(fr), num_frames, np.random.default_rng([seed, i]))
            x, gt = load_clip([fr[t] for t in idx], [ms[t] for t in idx], size, std)
            if remap is not None:
                gt = torch.from_numpy(to_categories(gt.numpy(), remap, ms[idx[0]].parent))
            if not (gt != IGNORE).any() or ((gt == 0) | (gt == IGNORE)).all() and \
                    (gt == IGNORE).any():  # nothing to score, or binary 0/255 masks
                raise cli.InputError(f"{ms[idx[0]].parent}: the masks of frames {idx} hold only "
                                     f"0 and {IGNORE} (ignored): instance ids 1..N expected")
            feats = feature_fn(x.to(device)).float()
            clips.append((i, name, idx, x, gt, feats))
        project = pca_fit(torch.cat([f.flatten(0, 2) for *_, f in clips]), pca_dim)
        out = []
        for i, name, idx, x, gt, feats in clips:
            rec, maps = {"name": name, "frames": idx}, {}
            for k, setting in zip(k_values, names):
                K = len(np.setdiff1d(np.unique(gt.numpy()), [IGNORE])) if k == "gt" else int(k)
                pred = cluster_clip(feats, K, size, project, seed=seed, **kmeans_kw).cpu()
                res = cluster_miou(pred, gt, K, "hungarian" if k == "gt" else "many_to_one")
                rec[setting], maps[setting] = res["miou"], res["pred"]
            if i == 0 and picture:
                save_picture(picture, x, std, gt, maps, idx, f"Unsupervised VOS ({dataset}, "
                             f"mIoU {', '.join(f'{s} {rec[s]:.3f}' for s in names)}): {name}")
            out.append(rec)
        return out

    per_clip = [r for part in per_video(unit, -(-len(videos) // pca_batch)) for r in part]
    res = {s: {"miou": float(np.mean([r[s] for r in per_clip])),
               "miou_batch16": batch_mean([r[s] for r in per_clip])} for s in names}
    return {**res, "videos": per_clip}


def save_picture(path, x: Tensor, std: Sequence, gt: Tensor, maps: dict, idx: list, title: str,
                 n: int = 6) -> None:
    """Labelled PNG of n of a clip's frames (video frame numbers `idx`): the frames, the GT,
    and each setting's matched prediction, in the DAVIS palette (a matched cluster takes its
    GT label's colour, unmatched ones none)."""
    ts = np.linspace(0, len(x) - 1, min(n, len(x))).round().astype(int)
    img = x[ts] * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)
    img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    rows = [img.float() / 255] + [torch.stack([overlay(img[j], torch.as_tensor(lab[t]), 0.6)
                                               for j, t in enumerate(ts)]).float() / 255
                                  for lab in [gt, *maps.values()]]
    log.save_grid(rows, path, title, ["frames", "ground truth", *(f"{s} (matched)" for s in maps)],
                  [f"frame {idx[t]}" for t in ts])


def vos_metrics(feature_fn, davis: str = "", ytvos: str = "", out_dir: Optional[str] = None,
                **kw) -> dict:
    """{"vos_<dataset>_<setting>_miou": plain mean, "..._miou_batch16": the official mean of
    batch means} of `eval_vos` on the roots given (a
    YouTube-VOS root's val.txt, when present, selects its videos); with `out_dir`, the first
    video's picture as out_dir/vos_<dataset>.png. Call on every rank under torchrun."""
    if not (davis or ytvos):
        raise cli.InputError("no VOS benchmark root given (--vos-davis / --vos-ytvos)")
    out = {}
    for name, root in (("davis", davis), ("ytvos", ytvos)):
        if root:
            lst = Path(root) / "val.txt" if name == "ytvos" else None
            res = eval_vos(feature_fn, root, name, split_list=lst if lst and lst.is_file()
                           else None, picture=out_dir and str(Path(out_dir) / f"vos_{name}.png"),
                           **kw)
            for s, v in res.items():  # the plain mean, and the official mean of batch means
                if s != "videos":
                    out.update({f"vos_{name}_{s}_miou": v["miou"],
                                f"vos_{name}_{s}_miou_batch16": v["miou_batch16"]})
    return out
