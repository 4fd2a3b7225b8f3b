"""comedian.py (evaluation foundation): the SoccerNet-v2 metric on hand-made games against
hand-computed APs, hard and soft NMS on hand-made curves, the +-0.5 s label encoding and token
OR-reduction, the sliding-window edge removal and merge, the results writer, and the synthetic
SoccerNet set (labels parse, videos decode, events on screen at the labelled times)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import comedian as C
from common import synthetic, video

GOAL, CORNER = C.CLASS_INDEX["Goal"], C.CLASS_INDEX["Corner"]


# ---- helpers: hand-made games ----
def _write_game(root: Path, game: str, labels: list, preds: list) -> None:
    """labels: (half, ms, label, visibility); preds: (half, ms, label, confidence)."""
    (root / "labels" / game).mkdir(parents=True, exist_ok=True)
    (root / "preds" / game).mkdir(parents=True, exist_ok=True)
    ann = [{"gameTime": f"{h} - {ms // 60000:02d}:{ms // 1000 % 60:02d}", "label": lab,
            "position": str(ms), "team": "home", "visibility": vis} for h, ms, lab, vis in labels]
    (root / "labels" / game / "Labels-v2.json").write_text(json.dumps(
        {"UrlLocal": game + "/", "UrlYoutube": "", "gameHomeTeam": "A", "gameAwayTeam": "B",
         "gameDate": "", "gameScore": "0 - 0", "annotations": ann}))
    pr = [{"gameTime": "", "label": lab, "position": str(ms), "half": str(h), "confidence": s}
          for h, ms, lab, s in preds]
    (root / "preds" / game / "results_spotting.json").write_text(
        json.dumps({"UrlLocal": game, "predictions": pr}))


def _metric(tmp_path, labels, preds, metric):
    _write_game(tmp_path, "lg/season/g1", labels, preds)
    return C.average_map(tmp_path / "labels", tmp_path / "preds", ["lg/season/g1"], metric)


def _goal_ap(res, key="a_mAP_per_class"):
    return res[key][GOAL]


# ---- metric ----
def test_metric_ap_precision_is_max_over_thresholds(tmp_path):
    # FP at 0.9, TP at 0.8, one GT: P = 1/2 at R = 1, so every 11-point sample is 1/2
    r = _metric(tmp_path, [(1, 10000, "Goal", "visible")],
                [(1, 10000, "Goal", 0.8), (1, 30000, "Goal", 0.9)], "tight")
    assert _goal_ap(r) == pytest.approx(0.5)
    assert r["a_mAP"] == pytest.approx(0.5 / 17)  # 16 classes without GT contribute 0
    assert r["a_mAP_visible"] == pytest.approx(0.5 / 17)
    assert r["a_mAP_unshown"] == 0.0
    assert len(r["a_mAP_per_class"]) == 17 and sum(r["a_mAP_per_class"]) == pytest.approx(0.5)


def test_metric_tolerance_and_frame_floor(tmp_path):
    # GT at 10.0 s = frame 20; 10.999 s floors to frame 21 (within +-1 frame at delta 1 s)
    r = _metric(tmp_path, [(1, 10000, "Goal", "visible")], [(1, 10999, "Goal", 0.7)], "at1")
    assert _goal_ap(r) == pytest.approx(1.0)
    # 11.0 s = frame 22: outside delta 1 (+-0.5 s), inside delta >= 2
    for metric, ap in [("at1", 0.0), ("at2", 1.0), ("at5", 1.0)]:
        r = _metric(tmp_path, [(1, 10000, "Goal", "visible")], [(1, 11000, "Goal", 0.7)], metric)
        assert _goal_ap(r) == pytest.approx(ap), metric
    # tight: mAPs 0,1,1,1,1 -> trapezoid (0.5 + 1 + 1 + 1) / 4
    assert _goal_ap(r := _metric(tmp_path, [(1, 10000, "Goal", "visible")],
                                 [(1, 11000, "Goal", 0.7)], "tight")) == pytest.approx(0.875)
    assert r["a_mAP"] == pytest.approx(0.875 / 17)


def test_metric_loose(tmp_path):
    # 20 s away: matched from delta 40 s on (5 of the 12 loose deltas) -> 4.5 / 11
    r = _metric(tmp_path, [(1, 100000, "Goal", "visible")], [(1, 120000, "Goal", 0.6)], "loose")
    assert _goal_ap(r) == pytest.approx(4.5 / 11)


def test_metric_greedy_matching_per_gt(tmp_path):
    # GTs at frames 20 and 22; preds at 21 (0.9) and 19 (0.5); delta 1 s = +-1 frame.
    # GT 20 takes the higher 21, GT 22 then has nothing: 1 TP, 1 FP, 2 GT.
    # P(thr<=.5)=1/2, R=1/2; P(.5<thr<=.9)=1, R=1/2 -> r in 0..0.5 give 1, the rest 0: 6/11
    r = _metric(tmp_path, [(1, 10000, "Goal", "visible"), (1, 11000, "Goal", "visible")],
                [(1, 10500, "Goal", 0.9), (1, 9500, "Goal", 0.5)], "at1")
    assert _goal_ap(r) == pytest.approx(6 / 11)


def test_metric_ties_go_to_earlier_frame(tmp_path):
    # equal scores at frames 19 and 21 for GT 20: the earlier (19) is taken, so 21 is left
    # for GT 22 -> 2 TP, AP 1 (taking 21 would leave GT 22 unmatched)
    r = _metric(tmp_path, [(1, 10000, "Goal", "visible"), (1, 11000, "Goal", "visible")],
                [(1, 9500, "Goal", 0.6), (1, 10500, "Goal", 0.6)], "at1")
    assert _goal_ap(r) == pytest.approx(1.0)


def test_metric_zero_confidence_counts_and_last_write_wins(tmp_path):
    r = _metric(tmp_path, [(1, 10000, "Goal", "visible")], [(1, 10000, "Goal", 0.0)], "at1")
    assert _goal_ap(r) == pytest.approx(1.0)  # confidence 0 is a detection (thr 0)
    # two preds on frame 20: the later 0.2 overwrites 0.9; with a 0.5 FP elsewhere AP = 1/2
    r = _metric(tmp_path, [(1, 10000, "Goal", "visible")],
                [(1, 10000, "Goal", 0.9), (1, 10400, "Goal", 0.2), (1, 50000, "Goal", 0.5)],
                "at1")
    assert _goal_ap(r) == pytest.approx(0.5)


def test_metric_halves_do_not_mix_and_pool_over_games(tmp_path):
    r = _metric(tmp_path, [(1, 10000, "Goal", "visible")], [(2, 10000, "Goal", 0.9)], "at1")
    assert _goal_ap(r) == 0.0
    # pooled over two games: game 1 a TP at 0.9, game 2 a GT missed and a FP at 0.95
    _write_game(tmp_path, "lg/s/a", [(1, 10000, "Goal", "visible")], [(1, 10000, "Goal", 0.9)])
    _write_game(tmp_path, "lg/s/b", [(2, 10000, "Goal", "visible")], [(2, 90000, "Goal", 0.95)])
    r = C.average_map(tmp_path / "labels", tmp_path / "preds", ["lg/s/a", "lg/s/b"], "at1")
    # thr<=.9: P 1/2 R 1/2; .9<thr<=.95: P 0 R 0 -> r 0..0.5: 1/2, rest 0 -> 3/11
    assert _goal_ap(r) == pytest.approx(3 / 11)


def test_metric_unshown_scaling_and_visibility_split(tmp_path):
    labels, preds = [(1, 10000, "Goal", "not shown")], [(1, 10000, "Goal", 0.8)]
    r = _metric(tmp_path, labels, preds, "tight")
    assert r["a_mAP"] == pytest.approx(1 / 17)
    assert r["a_mAP_visible"] == 0.0  # the detection's closest GT is not shown
    assert r["a_mAP_unshown"] == pytest.approx(1 / 17 * 17 / 13)  # x 17/13 when averaged
    assert r["a_mAP_per_class_unshown"][GOAL] == pytest.approx(1.0)  # per class: unscaled
    r = _metric(tmp_path, labels, preds, "at3")
    assert r["a_mAP_unshown"] == pytest.approx(1 / 17)  # single delta: no scaling


def test_metric_class_without_gt(tmp_path):
    # Corner detections without Corner GT: AP 0 for Corner (in every variant), Goal untouched
    r = _metric(tmp_path, [(1, 10000, "Goal", "visible")],
                [(1, 10000, "Goal", 0.8), (1, 20000, "Corner", 0.9), (2, 5000, "Corner", 0.4)],
                "tight")
    assert r["a_mAP_per_class"][CORNER] == 0.0
    assert r["a_mAP_per_class_unshown"][CORNER] == 0.0
    assert _goal_ap(r) == pytest.approx(1.0) and r["a_mAP"] == pytest.approx(1 / 17)


def test_closest_map():
    t = np.zeros((10, 2))
    t[2, 0], t[6, 0] = 1, -1
    out = C._closest(t)
    assert out[:, 0].tolist() == [1, 1, 1, 1, -1, -1, -1, -1, -1, -1]
    assert (out[:, 1] == -1).all()  # no GT: -1 everywhere


def test_metric_rejects_bad_metric_and_missing_file(tmp_path):
    with pytest.raises(ValueError):
        _metric(tmp_path, [], [], "at6")
    with pytest.raises(FileNotFoundError):
        C.average_map(tmp_path, tmp_path, ["nope"])


# ---- labels ----
def test_parse_labels_and_frame_encoding(tmp_path):
    _write_game(tmp_path, "g", [(1, 1250, "Goal", "visible"), (1, 3000, "Corner", "not shown"),
                                (2, 1000, "Goal", "visible"), (1, 500, "Not a class", "visible")],
                [])
    ann = C.parse_labels(tmp_path / "labels/g/Labels-v2.json")
    assert ann == [C.Annotation(1, 1250, GOAL, True), C.Annotation(1, 3000, CORNER, False),
                   C.Annotation(2, 1000, GOAL, True)]
    y = C.frame_labels(ann, half=1, num_frames=10)  # frames at 0, 0.5, ..., 4.5 s
    assert y.shape == (10, 17) and y.sum() == 5
    assert y[:, GOAL].nonzero().flatten().tolist() == [2, 3]  # |1.25 - t| <= .5: t = 1, 1.5
    assert y[:, CORNER].nonzero().flatten().tolist() == [5, 6, 7]  # 2.5, 3, 3.5 (inclusive)
    tok = C.token_labels(y[None])  # (1, 5, 17)
    assert tok.shape == (1, 5, 17)
    assert tok[0, :, GOAL].tolist() == [0, 1, 0, 0, 0]
    assert tok[0, :, CORNER].tolist() == [0, 0, 1, 1, 0]
    assert C.token_times(torch.tensor([5.0, 5.5, 6.0, 6.5])).tolist() == [5.25, 6.25]
    with pytest.raises(ValueError):
        C.token_labels(torch.zeros(3, 17))


def test_parse_labels_malformed(tmp_path):
    p = tmp_path / "Labels-v2.json"
    p.write_text(json.dumps({"annotations": [{"gameTime": "1 - 00:01", "label": "Goal",
                                              "position": "abc"}]}))
    with pytest.raises(ValueError, match="#0"):
        C.parse_labels(p)
    p.write_text(json.dumps({"annotations": [{"gameTime": "1 - 01:05", "label": "Goal"}]}))
    assert C.parse_labels(p) == [C.Annotation(1, 65000, GOAL, True)]  # MM:SS fallback


# ---- NMS ----
def test_hard_nms():
    s = torch.tensor([0.1, 0.5, 0.2, 0.3, 0.9, 0.3, 0.0, 0.0, 0.4, 0.4, 0.0, 0.0005])[:, None]
    keep = lambda w, thr=0.001: C.hard_nms(s, w, thr)[:, 0].nonzero().flatten().tolist()  # noqa
    assert keep(4) == [1, 4, 8, 9]  # ties both kept
    assert keep(4, 0.45) == [1, 4]
    assert keep(2) == [1, 4, 8, 9]  # 11 is a local max but under the threshold
    assert keep(2, 0.0) == [1, 4, 8, 9, 11]
    assert keep(8) == [4, 9]  # 8 sees the 0.9 at 4 (distance 4), 9 does not


def test_soft_nms():
    s = torch.tensor([0.2, 0.8, 0.6, 0.1, 0.7, 0.0])
    out = C.soft_nms(s, window=4, threshold=0.001)
    assert torch.allclose(out, torch.tensor([0.1, 0.8, 0.3, 0.025, 0.7, 0.0]))
    out = C.soft_nms(s, window=4, threshold=0.05)
    assert torch.allclose(out, torch.tensor([0.1, 0.8, 0.3, 0.0, 0.7, 0.0]))
    out = C.soft_nms(torch.tensor([0.9, 0.6, 0.5]), window=3)  # radius 1.5: weights 2/3, 1
    assert torch.allclose(out, torch.tensor([0.9, 0.6 * 2 / 3 * 2 / 3, 0.5]))
    assert torch.equal(s, torch.tensor([0.2, 0.8, 0.6, 0.1, 0.7, 0.0]))  # input untouched


# ---- sliding windows ----
def test_window_starts():
    assert C.window_starts(150) == [0, 32, 64, 86]
    assert C.window_starts(160) == [0, 32, 64, 96]
    assert C.window_starts(150.7) == [0, 32, 64, 86]
    assert C.window_starts(20, 8, 4) == [0, 4, 8, 12]
    assert C.window_starts(21.5, 8, 4) == [0, 4, 8, 12, 13]
    assert C.window_starts(5, 8, 4) == [0]


def test_edge_keep():
    t = lambda s: s + torch.arange(8) + 0.25  # noqa: E731
    assert C.edge_keep(t(0), 2, 20).tolist() == [True] * 6 + [False] * 2  # start of half kept
    assert C.edge_keep(t(6), 2, 20).tolist() == [False] * 2 + [True] * 4 + [False] * 2
    # end of half: the fix keeps the last seconds, the official guard (default) drops them
    assert C.edge_keep(t(12), 2, 20, official_end=False).tolist() == [False] * 2 + [True] * 6
    assert C.edge_keep(t(12), 2, 20).tolist() == [False] * 2 + [True] * 4 + [False] * 2
    assert C.edge_keep(t(6), 0, 20).all()


def test_merge_window():
    buf = C.half_buffer(10.0, num_classes=1)
    assert buf.shape == (19, 1)
    ta, tb = torch.arange(4) + 0.25, torch.arange(4) + 2.25  # windows starting at 0 and 2
    C.merge_window(buf, torch.tensor([0.1, 0.2, 0.3, 0.4])[:, None], ta)
    C.merge_window(buf, torch.tensor([0.5, 0.1, 0.6, 0.7])[:, None], tb)
    expect = torch.zeros(19)
    expect[[0, 2, 4, 6, 8, 10]] = torch.tensor([0.1, 0.2, 0.5, 0.4, 0.6, 0.7])
    assert torch.allclose(buf[:, 0], expect)  # j + 0.25 -> even index (half to even)
    avg = C.half_buffer(10.0, num_classes=1)
    C.merge_window(avg, torch.tensor([0.1, 0.2, 0.3, 0.4])[:, None], ta, how="average")
    C.merge_window(avg, torch.tensor([0.5, 0.1, 0.6, 0.7])[:, None], tb, how="average")
    assert torch.allclose(avg[[4, 6, 8], 0], torch.tensor([0.4, 0.25, 0.6]))
    # clamping and within-window max: 9.75 -> round(19.5) = 20 -> 18; 9.5 -> 19 -> 18
    C.merge_window(buf, torch.tensor([0.3, 0.9])[:, None], torch.tensor([9.75, 9.5]))
    assert buf[18, 0] == pytest.approx(0.9)


def test_predictions_writer_roundtrip(tmp_path):
    buf = torch.zeros(200, 17)
    buf[24, GOAL], buf[125, CORNER], buf[126, CORNER] = 0.9, 0.7, 0.6
    hard = C.spotting_predictions(buf, half=2, nms="hard", window=4)
    assert [(p["label"], p["position"], p["gameTime"]) for p in hard] == [
        ("Goal", "12000", "2 - 00:12"), ("Corner", "62500", "2 - 01:02")]
    assert hard[0]["half"] == "2" and hard[0]["confidence"] == pytest.approx(0.9)
    soft = C.spotting_predictions(buf, half=1, window=4)  # 126 decays to 0.6 * 1/2
    assert [(p["position"], round(p["confidence"], 6)) for p in soft if p["label"] == "Corner"] \
        == [("62500", 0.7), ("63000", 0.3)]
    path = C.write_results(tmp_path / "preds", "lg/s/g", hard + soft)
    data = json.loads(path.read_text())
    assert data["UrlLocal"] == "lg/s/g/"
    assert [(p["half"], p["position"]) for p in data["predictions"]] == [
        ("1", "12000"), ("1", "62500"), ("1", "63000"), ("2", "12000"), ("2", "62500")]
    _write_game(tmp_path, "lg/s/g", [(2, 12000, "Goal", "visible"),
                                     (2, 62500, "Corner", "visible")], [])
    C.write_results(tmp_path / "preds", "lg/s/g", hard)
    r = C.average_map(tmp_path / "labels", tmp_path / "preds", ["lg/s/g"], "at1")
    assert r["a_mAP"] == pytest.approx(2 / 17)


# ---- synthetic SoccerNet ----
def test_synthetic_soccernet(tmp_path):
    root = synthetic.soccernet(tmp_path / "sn", seed=3, games=(2, 1, 1), seconds=(14, 16))
    splits = {s: (root / f"{s}.txt").read_text().split("\n")[:-1]
              for s in ("train", "valid", "test")}
    assert [len(v) for v in splits.values()] == [2, 1, 1]
    seen = 0
    for game in sum(splits.values(), []):
        assert len(Path(game).parts) == 3  # league/season/game
        raw = json.loads((root / game / "Labels-v2.json").read_text())
        assert raw["UrlLocal"] == game + "/"
        ann = C.parse_labels(root / game / "Labels-v2.json")
        assert len(ann) == len(raw["annotations"]) > 0
        for a, r in zip(ann, raw["annotations"]):  # gameTime agrees with position
            s = a.position_ms // 1000
            assert r["gameTime"] == f"{a.half} - {s // 60:02d}:{s % 60:02d}"
            assert r["team"] in ("home", "away") and C.CLASSES[a.label] in \
                synthetic.SOCCERNET_EVENTS
        for half in (1, 2):
            path = root / game / f"{half}_224p.mkv"
            meta = video.video_meta(path)
            assert 14 * 4 <= meta.num_frames <= 16 * 4 and (meta.height, meta.width) == (64, 112)
            frames = video.read_frames(path, list(range(meta.num_frames))).float().numpy()

            def area(i):  # pixels far from the frame's dominant (pitch) colour
                f = frames[min(max(i, 0), len(frames) - 1)]
                return int((np.linalg.norm(f - np.median(f.reshape(-1, 3), 0), axis=-1)
                            > 80).sum())
            stat = lambda i: area(i) - max(area(i - 6), area(i + 6))  # noqa: E731  (+-1.5 s)
            times = [a.position_ms / 1000 for a in ann if a.half == half]
            for a in ann:
                if a.half == half:
                    shown = stat(round(a.position_ms / 250)) > 100
                    assert shown == a.visible, (game, a)
                    seen += a.visible
            quiet = [i for i in range(meta.num_frames) if all(abs(i / 4 - t) > 2.2 for t in times)]
            assert all(stat(i) < 100 for i in quiet)
            # the teacher bank: 1 fps, ceil(D) rows; a second [s, s + 1) that a visible
            # event's +-0.5 s overlaps holds its class prototype (norm 1 + N(0, 0.1^2) noise)
            feats = np.load(root / game / f"{half}_synthetic_teacher.npy")
            assert feats.shape == (math.ceil(meta.num_frames / 4), synthetic.TEACHER_DIM)
            hot = {s for a in ann if a.half == half and a.visible
                   for s in range((a.position_ms - 500) // 1000, (a.position_ms + 500) // 1000 + 1)}
            norms = np.linalg.norm(feats, axis=1)
            assert all(norms[s] > 0.75 for s in hot) and \
                all(norms[s] < 0.9 for s in range(len(feats)) if s not in hot)
    assert seen >= 4
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) < 10 * 2**20


# ---- stage 2: token SCE loss and temporal masking ----

def test_sce_token_loss_by_hand():
    """B = 1, T = 2, one queue vector, all in 2-D: the loss written out element by element."""
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    p = F.normalize(torch.tensor([[[1.0, 1.0], [1.0, 0.0]]]), dim=-1)
    queue = torch.tensor([[0.0, -1.0]])
    lam, tau, tau_m = 0.5, 0.1, 0.05
    total = 0.0
    for i in range(2):
        cand = [p[0, 0], p[0, 1], queue[0]]
        lq = torch.stack([q[0, i] @ c for c in cand]) / tau
        lk = torch.stack([p[0, i] @ c for c in cand]) / tau_m
        lk[i] = -math.inf  # self masked in the target
        w = (1 - lam) * lk.softmax(0)
        w[i] += lam
        total += -(w * lq.log_softmax(0)).sum()
    got = C.sce_token_loss(q, p, queue, lam, tau, tau_m)
    assert got.item() == pytest.approx(total.item() / 2, rel=1e-6)


def test_sce_token_loss_masks_other_clips_and_lam1_is_infonce():
    """Changing another clip's teacher features leaves a clip's loss unchanged (other clips
    only enter through the queue); lam = 1 is InfoNCE over own-clip tokens + queue."""
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(2, 3, 4, generator=g), dim=-1)
    p = F.normalize(torch.randn(2, 3, 4, generator=g), dim=-1)
    queue = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    alone = C.sce_token_loss(q[:1], p[:1], queue)
    p2 = p.clone()
    p2[1] = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    both = C.sce_token_loss(q, p2, queue)
    other = C.sce_token_loss(q[1:], p2[1:], queue)
    assert both.item() == pytest.approx((alone.item() + other.item()) / 2, rel=1e-6)
    logits = torch.cat([q[0] @ p[0].T, q[0] @ queue.T], 1) / 0.1
    infonce = F.cross_entropy(logits, torch.arange(3))
    assert C.sce_token_loss(q[:1], p[:1], queue, lam=1.0).item() == pytest.approx(
        infonce.item(), rel=1e-6)
    with pytest.raises(ValueError, match="must both be"):
        C.sce_token_loss(q, p[:, :2], queue)


def test_temporal_mask_counts():
    """64 tokens at ratio 0.25: floor(0.25 x 128) = 32 frames = 16 tokens dropped per clip, a
    different random subset per clip, kept indices sorted and unique."""
    keep = C.temporal_mask(3, 64, 0.25, torch.Generator().manual_seed(0))
    assert keep.shape == (3, 48) and keep.dtype == torch.int64
    for row in keep:
        assert torch.equal(row, row.sort().values) and len(set(row.tolist())) == 48
    assert not torch.equal(keep[0], keep[1])
    assert C.temporal_mask(2, 5, 0.3).shape == (2, 4)  # floor(0.3 x 10) = 3 frames: 1 whole tube
    assert C.temporal_mask(2, 10, 0.0).shape == (2, 10)
    with pytest.raises(ValueError):
        C.temporal_mask(2, 10, 1.0)
