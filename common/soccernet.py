"""SoccerNet-v2 action spotting: a benchmark toolkit (the benchmark's formats, its official metric
and the inference protocol of the action-spotting models that report on it), which COMEDIAN
uses and which holds nothing of COMEDIAN's own method.

Formats: the 17 classes in the order of the evaluator's `EVENT_DICTIONARY_V2`; a game folder
`<league>/<season>/<game>/` with `Labels-v2.json` (events of both halves, positions in ms from
the start of their half) and the halves as `{1,2}_224p.mkv` or as 2-fps frame folders
`{1,2}_224p/` (the official extraction); `<split>.txt` game lists (SoccerNet's
`getListGames`); predictions `<game>/results_spotting.json`. Frames are read at 2 fps (frame i
at t = i / 2 s) and the training targets follow the +-0.5 s label encoding on that grid.

Inference (eztorch's protocol, spec §1 "Inference"): sliding windows -> per-token
probabilities at their times -> edge removal (the official end-of-half quirk by default, the
fix as an argument) -> index on the 0.5-s grid -> max merge into a per-half buffer ->
per-class hard or soft NMS -> `results_spotting.json`. `spot` runs it all for any model given
as a function from a batch of windows of frames to per-token scores, then scores the games.

`save_timeline` draws one half's ground truth and merged scores as a PNG.

Metric: `average_map` is the SoccerNet-v2 evaluator (`Evaluation/ActionSpotting.py`) written
anew, equal to it to float precision: tight, loose and at1-at5 average-mAP, with its visible
and unshown variants.

One deviation from the official inference: a half shorter than one window gets a single window
starting at 0 (`window_starts`; the official sampler would start it at floor(D) - W < 0); real
halves are ~45 min, so this never differs there. "spec §n" below is a section of
../shared/specs/comedian.md (its §1 "Inference", §3 and §5 describe the benchmark).
"""
import json
import math
import os
from pathlib import Path
from typing import Callable, NamedTuple, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from . import cli, dist, video

PathLike = Union[str, os.PathLike]

# ---- classes and constants ----
# SoccerNet-v2 action classes, index = the evaluator's EVENT_DICTIONARY_V2 (spec §3). eztorch's
# 18th "No action" column is not a class here.
CLASSES = ("Penalty", "Kick-off", "Goal", "Substitution", "Offside", "Shots on target",
           "Shots off target", "Clearance", "Ball out of play", "Throw-in", "Foul",
           "Indirect free-kick", "Direct free-kick", "Corner", "Yellow card", "Red card",
           "Yellow->red card")
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
NUM_CLASSES = len(CLASSES)  # 17
FPS = 2  # frames are read at 2 fps, the evaluator's grid (spec §0, §5)
STEP = 1.0 / FPS  # 0.5 s: the grid of labels, merged predictions and NMS windows
SPLITS = ("train", "valid", "test", "challenge")  # official split names (spec §3)
METRIC_DELTAS = {"tight": [1, 2, 3, 4, 5], "loose": [5 * k for k in range(1, 13)],
                 **{f"at{k}": [k] for k in range(1, 6)}}  # tolerance widths in seconds


# ---- labels and targets ----
class Annotation(NamedTuple):
    """One event of `Labels-v2.json`: `position_ms` counts from the start of its `half`."""
    half: int  # 1 or 2
    position_ms: int
    label: int  # index into CLASSES
    visible: bool  # False for "not shown" (off screen, e.g. during a replay)


def parse_labels(path: PathLike) -> list:
    """Read a SoccerNet-v2 `Labels-v2.json` into `Annotation`s, in file order.

    Each annotation holds `gameTime` "H - MM:SS", `label`, `position` (a string of ms from the
    half's start), `team` and `visibility` ("visible" / "not shown") (spec §3). The position is
    used when present; without it the time falls back to MM:SS, as the evaluator does. Labels
    outside the 17 classes are skipped (as the evaluator does); a malformed file or entry raises
    cli.InputError (a ValueError) naming the file and the entry.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise cli.InputError(f"{path}: not valid JSON ({e})") from None
    out = []
    for k, a in enumerate(data.get("annotations", [])):
        try:
            game_time = a["gameTime"]
            half = int(game_time.split(" - ")[0])
            if "position" in a:
                position_ms = int(a["position"])
            else:
                minutes, seconds = game_time.split(" - ")[1].split(":")
                position_ms = 1000 * (60 * int(minutes) + int(seconds))
            label = a["label"]
            visible = a.get("visibility", "visible") != "not shown"
        except (KeyError, ValueError, IndexError, AttributeError) as e:
            raise cli.InputError(f"{path}: malformed annotation #{k} {a!r}: {e!r}") from None
        if half not in (1, 2):
            raise cli.InputError(f"{path}: annotation #{k} has half {half}, expected 1 or 2")
        if label in CLASS_INDEX:
            out.append(Annotation(half, position_ms, CLASS_INDEX[label], visible))
    return out


def frame_labels(annotations: Sequence[Annotation], half: int, num_frames: int,
                 radius: float = 0.5, fps: float = FPS) -> torch.Tensor:
    """Training targets of one half on the frame grid: (num_frames, 17) float 0/1.

    Frame i (time t_i = i / fps) is positive for class c when an annotation of c in `half` has
    |pos_s - t_i| <= radius, inclusive (spec §1 Stage 3, pitfall 9). Computed in integer ms
    where the grid allows, so 0.5 s is exactly 0.5 s.
    """
    y = torch.zeros(num_frames, NUM_CLASSES)
    frame_ms = 1000.0 / fps
    radius_ms = radius * 1000.0
    for a in annotations:
        if a.half != half:
            continue
        lo = math.ceil((a.position_ms - radius_ms) / frame_ms - 1e-9)
        hi = math.floor((a.position_ms + radius_ms) / frame_ms + 1e-9)
        lo, hi = max(lo, 0), min(hi, num_frames - 1)
        if lo <= hi:
            y[lo:hi + 1, a.label] = 1.0
    return y


def token_labels(frame_y: torch.Tensor, frames_per_token: int = 2) -> torch.Tensor:
    """OR-reduce frame targets onto tokens of k = `frames_per_token` consecutive frames (2: 1-s
    tokens, eztorch's): (..., T, C) -> (..., T / k, C); token j is positive where one of frames
    kj .. kj + k - 1 is (spec §1 Stage 3, pitfall 2). Raises ValueError when k does not divide
    T."""
    *lead, t, c = frame_y.shape
    k = frames_per_token
    if t % k:
        raise ValueError(f"token_labels: {t} frames is not a multiple of {k}")
    return frame_y.reshape(*lead, t // k, k, c).amax(-2)


def token_times(frame_times: torch.Tensor, frames_per_token: int = 2) -> torch.Tensor:
    """A token's time is the mean of its frames' times (eztorch `BatchReduceTimestamps`), in s:
    (..., T) -> (..., T / k), k = `frames_per_token`. For a clip starting at s on the 2-fps
    grid and 1-s tokens (k = 2), token j is at s + j + 0.25."""
    *lead, t = frame_times.shape
    k = frames_per_token
    return frame_times.reshape(*lead, t // k, k).mean(-1)


# ---- games, halves and frames ----
class Half(NamedTuple):
    """One half of a game: its video (file or 2-fps frame folder), its duration D in s and
    the game's annotations (both halves)."""
    game: str
    half: int
    path: str
    duration: float
    annotations: list


def read_split(root: PathLike, split: str) -> list:
    """Games of `<root>/<split>.txt` (one `league/season/game` per line, blank lines and
    `#` comments skipped), as `SoccerNet.utils.getListGames(split)` lists them. Raises
    FileNotFoundError without the list, cli.InputError (naming file:line) for a game folder
    that does not exist."""
    path = Path(root) / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no game list for split {split!r} (write one game "
                                f"folder per line, e.g. from SoccerNet.utils.getListGames)")
    games = [ln.strip() for ln in path.read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    for k, g in enumerate(games):
        if not (Path(root) / g).is_dir():
            raise cli.InputError(f"{path}:{k + 1}: game folder {Path(root) / g} not found")
    return games


def read_halves(root: PathLike, games: Sequence[str], video_name: str = "224p") -> list:
    """The `Half`s of `games` (game folders under `root`), halves 1 and 2 of each in order:
    `{half}_{video_name}.mkv` or the 2-fps frame folder of that name; D = frames / fps of the
    file (2-fps folders: frames / 2, the official correction). Raises FileNotFoundError for a
    missing video, cli.InputError for malformed labels (`parse_labels`)."""
    out = []
    for game in games:
        annotations = parse_labels(Path(root) / game / "Labels-v2.json")
        for half in (1, 2):
            base = Path(root) / game / f"{half}_{video_name}"
            if base.is_dir():
                path, duration = str(base), video.frame_folder_length(base) / FPS
            elif base.with_suffix(".mkv").is_file():
                path = str(base.with_suffix(".mkv"))
                meta = video.video_meta(path)
                duration = meta.num_frames / meta.fps
            else:
                raise FileNotFoundError(f"{base}.mkv: no such video (nor frame folder)")
            out.append(Half(game, half, path, duration, annotations))
    return out


_DECODED: dict = {}  # read_frames_2fps(cache=True): path -> every 2-fps frame, (N, 3, H, W)


def read_frames_2fps(h: Half, start: float, n: int, cache: bool = False) -> torch.Tensor:
    """Frames start + i / 2 s, i < n, of a half as uint8 (n, 3, H, W): from a file the frame
    on screen at that time (PyAV, seeking once), from a folder file round(2t) (clamped).
    `cache`: decode the whole half once per process and index it (start on the 0.5-s grid;
    for small sets such as the demo's, where decoding would bound the step time). Raises
    video.VideoReadError for an unreadable video or frame."""
    if cache:
        if h.path not in _DECODED:
            _DECODED[h.path] = read_frames_2fps(h, 0.0, max(math.floor(h.duration * FPS), 1))
        frames = _DECODED[h.path]
        first = round(start * FPS)
        return frames[[min(first + i, len(frames) - 1) for i in range(n)]]
    times = [start + i * STEP for i in range(n)]
    if os.path.isdir(h.path):
        x = video.read_frame_folder(h.path, [round(t * FPS) for t in times])
    else:
        x = video.read_frames_at(h.path, times)
    return x.permute(0, 3, 1, 2)


# ---- inference: windows, edge removal, merging, NMS, results ----
def window_starts(duration: float, window: float = 64.0, overlap: float = 32.0) -> list:
    """Start times (s) of the inference windows of a half of `duration` s (eztorch
    `SlidingWindowSoccerNetClipSampler`): k * (window - overlap) for the windows that fit,
    plus one ending at floor(duration) if the half is not covered exactly (at 0 for a half
    shorter than one window: the module's deviation)."""
    stride = window - overlap
    full = int((duration - overlap) // stride)
    starts = [float(k * stride) for k in range(max(full, 0))]
    if (duration - overlap) % stride > 0 or not starts:
        starts.append(float(max(math.floor(duration) - window, 0)))  # deviation: not < 0
    return starts


def half_buffer(duration: float, num_classes: int = NUM_CLASSES, step: float = STEP):
    """Zero-initialised merged-score buffer of a half: (round(D / step) - 1, C) (spec §1
    Inference step 4; Python's round, as the official code)."""
    return torch.zeros(round(duration / step) - 1, num_classes)


def edge_keep(times: torch.Tensor, remove_s: float, half_duration: float,
              official_end: bool = True) -> torch.Tensor:
    """Which tokens of one window keep their predictions, (T,) bool (spec §1 Inference step 3).

    A token at t is dropped when it is within `remove_s` of the window's first token and
    t > remove_s (so the half's start is kept), or within `remove_s` of the window's last
    token and more than `remove_s` before the half's end. `official_end=True` (the default)
    replicates the official end guard, which compares with num_timestamps x token step =
    (2D - 1) x 1 s and therefore never keeps the half's last seconds (spec §7.7); False
    compares with the half duration D, symmetric with the start guard.
    """
    if remove_s <= 0 or times.numel() < 2:
        return torch.ones_like(times, dtype=torch.bool)
    end = (round(half_duration / STEP) - 1) * (times[1] - times[0]) if official_end \
        else half_duration
    before = ((times - times[0]) < remove_s) & (times > remove_s)
    after = ((times[-1] - times) < remove_s) & ((end - times) > remove_s)
    return ~(before | after)


def merge_window(buffer: torch.Tensor, probs: torch.Tensor, times: torch.Tensor,
                 how: str = "max", step: float = STEP) -> torch.Tensor:
    """Merge one window's probabilities (T, C) at token times (T,) into `buffer` (N, C), in
    place, and return it (spec §1 Inference step 4).

    Index = round(t / step), half to even as `torch.round` (so s + j + 0.25 lands on the even
    index 2(s + j)), clamped to [0, N - 1]. Tokens of the window landing on the same index keep
    their max; the window then enters the buffer by elementwise max ("max"), or, "average",
    by the mean with the stored value where that is > 0 (eztorch's option). Raises ValueError
    for another `how`.
    """
    idx = torch.round(times / step).long().clamp(0, buffer.shape[0] - 1)
    probs = probs.to(buffer.dtype)
    window = torch.zeros(buffer.shape, dtype=buffer.dtype)
    hit = torch.zeros(buffer.shape[0], dtype=torch.bool)
    window.scatter_reduce_(0, idx[:, None].expand_as(probs), probs, "amax", include_self=False)
    hit[idx] = True
    old = buffer[hit]
    new = window[hit]
    if how == "max":
        buffer[hit] = torch.where(new > old, new, old)
    elif how == "average":
        buffer[hit] = torch.where(old > 0, (new + old) / 2, new)
    else:
        raise ValueError(f"merge_window: how must be 'max' or 'average', got {how!r}")
    return buffer


def hard_nms(scores: torch.Tensor, window: int, threshold: float = 0.001) -> torch.Tensor:
    """Keep index i of a (N, C) score curve where it is the max of [i - w//2, i + w//2]
    (ties all kept) and >= threshold; `window` in 0.5-s indices (spec §1 Inference step 5).
    Returns a (N, C) bool mask."""
    h = int(window / 2)
    padded = torch.nn.functional.pad(scores.T[None], (h, h), value=-math.inf)[0]  # (C, N+2h)
    local_max = padded.unfold(1, 2 * h + 1, 1).amax(-1).T  # (N, C)
    return (scores >= local_max) & (scores >= threshold)


def soft_nms(scores: torch.Tensor, window: int, threshold: float = 0.001,
             min_weight: float = 0.0) -> torch.Tensor:
    """Soft NMS of one class's (N,) curve; `window` in 0.5-s indices (spec §1 Inference 5).

    Repeatedly emit the largest remaining score s >= threshold at index i (first one on ties),
    multiply the scores at j in [i - ceil(w/2), i + ceil(w/2)] by
    clip(min_weight + (1 - min_weight) |j - i| / (w/2), 0, 1), and set index i to -1.
    Returns the (N,) emitted values, 0 elsewhere; keep those > 0. Raises ValueError for a
    window <= 0.
    """
    if window <= 0:
        raise ValueError(f"soft_nms: window must be positive, got {window}")
    out = torch.zeros_like(scores)
    tmp = scores.clone()
    radius = window / 2.0
    reach = math.ceil(radius)
    n = tmp.shape[0]
    while n:
        i = int(torch.argmax(tmp))
        s = tmp[i].clone()
        if s < threshold:
            break
        out[i] = s
        j = torch.arange(max(i - reach, 0), min(i + reach + 1, n))
        weight = min_weight + (1.0 - min_weight) * (j - i).abs() / radius
        tmp[j] *= weight.clamp(0.0, 1.0).to(tmp.dtype)
        tmp[i] = -1
    return out


def spotting_predictions(buffer: torch.Tensor, half: int, nms: str = "soft", window: int = 20,
                         threshold: float = 0.001, step: float = STEP) -> list:
    """Per-class NMS of one half's merged buffer (N, C) -> prediction dicts of the official
    `results_spotting.json` (spec §1 Inference steps 5-6); index i is at t = i * step.
    Defaults: the documented soft NMS, 10-s window (20 indices), threshold 0.001. Raises
    ValueError for an `nms` other than "hard" / "soft"."""
    if nms == "hard":
        keep = hard_nms(buffer, window, threshold)
    elif nms == "soft":
        emitted = torch.stack([soft_nms(buffer[:, c], window, threshold)
                               for c in range(buffer.shape[1])], 1)
        keep, buffer = emitted > 0, emitted
    else:
        raise ValueError(f"spotting_predictions: nms must be 'hard' or 'soft', got {nms!r}")
    out = []
    for c in range(buffer.shape[1]):
        for i in keep[:, c].nonzero().flatten().tolist():
            t = i * step
            out.append({"gameTime": f"{half} - {int(t / 60):02d}:{int(t % 60):02d}",
                        "label": CLASSES[c], "position": f"{int(t * 1000)}",
                        "half": str(half), "confidence": float(buffer[i, c])})
    return out


def write_results(predictions_root: PathLike, game: str, predictions: list) -> Path:
    """Write `<predictions_root>/<game>/results_spotting.json` ({"UrlLocal", "predictions"}),
    sorted by half then position as the official writer does; returns its path."""
    preds = sorted(predictions, key=lambda p: (int(p["half"]), int(p["position"])))
    path = Path(predictions_root) / game / "results_spotting.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"UrlLocal": game.rstrip("/") + "/", "predictions": preds}, f)
    return path


# ---- the metric ----
# The SoccerNet-v2 action-spotting metric (spec §5; SoccerNet `Evaluation/ActionSpotting.py`),
# reimplemented: each half is vectorised at 2 fps over 120 min, detections are matched to
# ground truth per tolerance, AP is 11-point interpolated over 200 score thresholds, pooled over
# all halves of all games, and the mAPs are averaged over the tolerances (METRIC_DELTAS) by the
# trapezoid rule.

def _label_vectors(path: PathLike, n: int, fps: int):
    """Two (n, 17) arrays: +1 visible / -1 not-shown GT at frame int(fps * pos_s), clamped to
    n - 1, later annotations overwriting earlier ones."""
    vec = [np.zeros((n, NUM_CLASSES)), np.zeros((n, NUM_CLASSES))]
    for a in parse_labels(path):
        frame = min(int(fps * (a.position_ms / 1000)), n - 1)
        vec[a.half - 1][frame, a.label] = 1 if a.visible else -1
    return vec


def _prediction_vectors(path: PathLike, n: int, fps: int):
    """Two (n, 17) arrays of confidences, -1 where no detection (any value >= 0 detects);
    last write wins on a (frame, class)."""
    vec = [np.full((n, NUM_CLASSES), -1.0), np.full((n, NUM_CLASSES), -1.0)]
    with open(path) as f:
        preds = json.load(f)["predictions"]
    for p in preds:
        half = int(p["half"])
        if p["label"] not in CLASS_INDEX or half not in (1, 2):
            continue
        frame = min(int(fps * (int(p["position"]) / 1000)), n - 1)
        vec[half - 1][frame, CLASS_INDEX[p["label"]]] = p["confidence"]
    return vec


def _closest(target: np.ndarray) -> np.ndarray:
    """(n, C): the visibility (+-1) of the nearest GT of each class (midpoint boundaries, spec
    §5.2), -1 everywhere for a class without GT in the half."""
    n = target.shape[0]
    out = np.full(target.shape, -1.0)
    for c in range(target.shape[1]):
        g = np.flatnonzero(target[:, c]).tolist()
        if not g:
            continue
        g = [-g[0]] + g + [2 * n]
        for i in range(1, len(g) - 1):
            out[max(0, (g[i - 1] + g[i]) // 2):min(n, (g[i] + g[i + 1]) // 2), c] = \
                target[g[i], c]
    return out


def _match(target: np.ndarray, closest: np.ndarray, detection: np.ndarray, delta: int):
    """One class of one half. For each GT frame g in order, the highest-scoring unmatched
    detection p with |p - g| <= delta / 2 frames becomes a TP (ties: the earlier frame).
    Returns (K, 3) rows [score, TP, closest[p]] and the visible / unshown GT counts."""
    pred = np.flatnonzero(detection >= 0)
    rows = np.zeros((len(pred), 3))
    rows[:, 0], rows[:, 2] = detection[pred], closest[pred]
    used = np.zeros(len(pred), bool)
    for g in np.flatnonzero(target != 0):
        lo, hi = np.searchsorted(pred, g - delta / 2, "left"), \
            np.searchsorted(pred, g + delta / 2, "right")
        best = -1
        for k in range(lo, hi):
            if not used[k] and (best < 0 or rows[k, 0] > rows[best, 0]):
                best = k
        if best >= 0:
            used[best], rows[best, 1] = True, 1.0
    return rows, int((target > 0).sum()), int((target < 0).sum())


def _ap11(precision: np.ndarray, recall: np.ndarray) -> float:
    """11-point interpolated AP: mean over r in {0, .1, ..., 1} of max{P : R >= r} (0 if none)."""
    ap = 0.0
    for r in np.arange(11) / 10:
        ok = recall >= r
        ap += precision[ok].max() if ok.any() else 0.0
    return ap / 11


def _class_aps(rows: np.ndarray, n_visible: int, n_unshown: int) -> tuple:
    """(AP, AP visible, AP unshown) of one class from its pooled detections over the 200
    thresholds linspace(0, 1, 200): P = TP / #dets >= thr, R = TP / #GT (0/0 -> 0). Visible:
    only detections whose closest GT is visible (closest > 0.5), over the visible GT count;
    unshown: closest < -0.5, over the not-shown count."""
    div = lambda a, b: a / b if b else 0.0  # noqa: E731  (np.nan_to_num of 0/0)
    out = []
    for keep, n_gt in ((np.ones(len(rows), bool), n_visible + n_unshown),
                       (rows[:, 2] > 0.5, n_visible), (rows[:, 2] < -0.5, n_unshown)):
        score, tp = rows[keep, 0], rows[keep, 1]
        p, r = [], []
        for thr in np.linspace(0, 1, 200):
            sel = score >= thr
            n_tp = tp[sel].sum()
            p.append(div(n_tp, int(sel.sum())))
            r.append(div(n_tp, n_gt))
        out.append(_ap11(np.array(p), np.array(r)))
    return tuple(out)


def average_map(labels_root: PathLike, predictions_root: PathLike, games: Sequence[str],
                metric: str = "tight", framerate: int = FPS) -> dict:
    """The SoccerNet-v2 action-spotting metric (spec §5), from `<labels_root>/<game>/
    Labels-v2.json` and `<predictions_root>/<game>/results_spotting.json`.

    `metric`: "tight" (delta in 1..5 s), "loose" (5..60 s by 5) or "at1".."at5" (one delta).
    A delta is the full width of the window: a detection matches within +-delta/2 s. Per class
    and delta, AP is pooled over all halves of `games`; mAP is the mean over the 17 classes (a
    class without GT has AP 0). Returns the evaluator's keys: "a_mAP", "a_mAP_per_class",
    "a_mAP_visible", "a_mAP_per_class_visible", "a_mAP_unshown", "a_mAP_per_class_unshown";
    with several deltas each is the trapezoid average (sum of (m_i + m_{i+1}) / 2 over
    K - 1), and "a_mAP_unshown" is then x 17/13 (only 13 classes have unshown events; the
    per-class values are not scaled); with one delta they are the plain values. One key is
    not the evaluator's: "a_mAP_present", the mean over the classes with an event in `games`
    (on a few games, the 17-class mean mostly counts absent classes at AP 0). Raises
    ValueError for an unknown `metric`, FileNotFoundError for a missing labels or results file.
    """
    if metric not in METRIC_DELTAS:
        raise ValueError(f"average_map: metric must be one of {list(METRIC_DELTAS)}, "
                         f"got {metric!r}")
    n = 120 * 60 * framerate  # frames of a 120-min half
    halves = []  # (target, closest, detection) per half
    for game in games:
        labels = Path(labels_root) / game / "Labels-v2.json"
        preds = Path(predictions_root) / game / "results_spotting.json"
        for p in (labels, preds):
            if not p.is_file():
                raise FileNotFoundError(f"average_map: {p} is missing")
        for target, det in zip(_label_vectors(labels, n, framerate),
                               _prediction_vectors(preds, n, framerate)):
            halves.append((target, _closest(target), det))

    per_delta = []  # per delta: (3, 17) APs [all, visible, unshown]
    for delta in METRIC_DELTAS[metric]:
        aps = np.zeros((3, NUM_CLASSES))
        for c in range(NUM_CLASSES):
            rows, n_vis, n_uns = [np.zeros((0, 3))], 0, 0
            for target, closest, det in halves:
                r, v, u = _match(target[:, c], closest[:, c], det[:, c], delta * framerate)
                rows.append(r)
                n_vis, n_uns = n_vis + v, n_uns + u
            aps[:, c] = _class_aps(np.concatenate(rows), n_vis, n_uns)
        per_delta.append(aps)
    per_delta = np.stack(per_delta)  # (K, 3, 17)
    if len(per_delta) == 1:
        per_class = per_delta[0]
        scale = 1.0
    else:
        per_class = (per_delta[:-1] + per_delta[1:]).sum(0) / 2 / (len(per_delta) - 1)
        scale = 17 / 13
    # trapezoid of the means = mean of the per-class trapezoids (both linear)
    means = per_class.mean(1)
    present = np.any([t.any(0) for t, _, _ in halves], axis=0) if halves else []
    return {"a_mAP": float(means[0]), "a_mAP_present": float(per_class[0][present].mean()),
            "a_mAP_per_class": per_class[0].tolist(),
            "a_mAP_visible": float(means[1]), "a_mAP_per_class_visible": per_class[1].tolist(),
            "a_mAP_unshown": float(means[2] * scale),
            "a_mAP_per_class_unshown": per_class[2].tolist()}


# ---- the spotting driver ----
ScoreFn = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def predict_half(score_fn: ScoreFn, h: Half, window: float = 64.0, batch_size: int = 1,
                 remove_s: float = 12.0, official_end: bool = True, merge: str = "max",
                 cache: bool = False) -> torch.Tensor:
    """Merged per-class scores of one half, (round(D / 0.5) - 1, 17) float32 (spec §1 Inference
    1-4): windows of `window` s overlapping by half of it (`window_starts`, the last ending at
    floor(D)), `batch_size` windows per call of `score_fn`, edge removal (`edge_keep`:
    `remove_s` s, `official_end`), `merge` ("max" / "average", `merge_window`).

    `score_fn` maps the uint8 frames of b windows, (b, F, 3, H, W) with F = window x 2 and
    frame i of a window starting at s shown at s + i / 2 s (`read_frames_2fps`, `cache`), to
    per-token scores (b, T, 17) (probabilities, e.g. a sigmoid), T dividing F; token j is placed
    at the mean time of its F / T frames (`token_times`: s + j + 0.25 for 1-s tokens). It runs
    under `torch.no_grad`; its output may live on any device. Raises ValueError for any other
    shape."""
    buffer = half_buffer(h.duration)
    starts, frames = window_starts(h.duration, window, window / 2), round(window * FPS)
    for i in range(0, len(starts), batch_size):
        chunk = starts[i:i + batch_size]
        x = torch.stack([read_frames_2fps(h, s, frames, cache) for s in chunk])
        scores = score_fn(x).cpu()  # (b, T, 17)
        if scores.shape[0] != len(chunk) or scores.shape[2:] != (NUM_CLASSES,) or \
                frames % scores.shape[1]:
            raise ValueError(f"predict_half: score_fn must return ({len(chunk)}, T, "
                             f"{NUM_CLASSES}) with T dividing the {frames} frames of a "
                             f"{window:g}-s window, got {tuple(scores.shape)}")
        for s, p in zip(chunk, scores):
            times = token_times(s + torch.arange(frames, dtype=torch.float64) * STEP,
                                frames // len(p))
            keep = edge_keep(times, remove_s, h.duration, official_end)
            merge_window(buffer, p[keep], times[keep], merge)
    return buffer


def spot(score_fn: ScoreFn, root: PathLike, games: Sequence[str], predictions_root: PathLike,
         metrics: Sequence[str] = ("tight", "loose"), video_name: str = "224p",
         window: float = 64.0, batch_size: int = 1, remove_s: float = 12.0,
         official_end: bool = True, merge: str = "max", nms: str = "soft", nms_window: int = 20,
         nms_threshold: float = 0.001, cache: bool = False) -> tuple:
    """Spot actions in `games` (game folders under `root`) with `score_fn` and score them:
    each half through `predict_half` (`window`, `batch_size`, `remove_s`, `official_end`,
    `merge`, `cache`), per-class NMS (`spotting_predictions`: `nms`, `nms_window` in 0.5-s
    indices, `nms_threshold`), `<predictions_root>/<game>/results_spotting.json` per game,
    then `average_map` against `<root>/<game>/Labels-v2.json` for each of `metrics`.

    Under an initialised process group call it on every rank: game i is predicted on rank
    i % world, the ranks wait for each other, and rank 0 alone scores. Returns ({metric: the
    `average_map` dict} on rank 0, {} on the others; {(game, half): merged buffer (N, 17)} of
    this rank's games). Raises what `read_halves` and `average_map` raise."""
    buffers = {}
    for game in games[dist.rank()::dist.world()]:
        preds = []
        for h in read_halves(root, [game], video_name):
            buffers[(game, h.half)] = buf = predict_half(
                score_fn, h, window, batch_size, remove_s, official_end, merge, cache)
            preds += spotting_predictions(buf, h.half, nms, nms_window, nms_threshold)
        write_results(predictions_root, game, preds)
    dist.barrier()
    if not dist.is_main():
        return {}, buffers
    return {m: average_map(root, predictions_root, games, m) for m in metrics}, buffers


def save_timeline(path: PathLike, h: Half, curves: dict, title: str) -> None:
    """A labelled PNG of one half: for each class with events, a ground-truth row (filled
    tick: visible, hollow: not shown) and one row per model of `curves` ({name: (N, 17)
    merged buffer}) with its per-second score (0-1, the max of the second's two 0.5-s
    indices) as bars scaled to the row's max (printed); time in seconds. `title` heads it."""
    classes = sorted({a.label for a in h.annotations if a.half == h.half})
    font = ImageFont.load_default()
    px, left, top, row = 8, 170, 44, 22  # px per second, margins, row height
    width = max(left + int(px * h.duration) + 20, 560)
    height = top + len(classes) * (row * (1 + len(curves)) + 10) + 34
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((4, 4), f"{title}: {h.game}, half {h.half}", "black", font=font)
    d.text((4, 20), "ground truth (green; hollow = not shown) and merged scores (bars, each row "
                    "scaled to its max)", "black", font=font)
    y = top
    for c in classes:
        d.text((4, y + 5), f"{CLASSES[c][:20]}: truth", "black", font=font)
        for a in h.annotations:
            if a.half == h.half and a.label == c:
                x = left + px * a.position_ms / 1000
                d.rectangle([x - 2, y + 3, x + 2, y + row - 3], outline="green",
                            fill="green" if a.visible else None)
        for name, buf in curves.items():
            y += row
            per_s = torch.nn.functional.pad(buf[:, c], (0, buf.shape[0] % 2)).view(-1, 2).amax(1)
            top = max(per_s.max().item(), 1e-6)  # each row scaled to its own max, printed
            d.text((4, y + 5), f"  {name} (max {top:.2f})", "black", font=font)
            d.line([left, y + row - 2, width - 10, y + row - 2], fill="lightgray")
            for t, v in enumerate((per_s / top).tolist()):
                x = left + px * (t + 0.5)
                d.rectangle([x - px / 2 + 1, y + row - 2 - (row - 4) * v, x + px / 2 - 1,
                             y + row - 2], fill="blue")
        y += row + 10
    for t in range(0, int(h.duration) + 1, 5):
        x = left + px * t
        d.line([x, y, x, y + 4], fill="black")
        d.text((x - 4, y + 6), str(t), "black", font=font)
    d.text((4, y + 6), "time (s)", "black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
