"""common/soccernet.py: the SoccerNet-v2 metric on hand-made games against hand-computed APs,
hard and soft NMS on hand-made curves, the +-0.5 s label encoding and token OR-reduction, label
parsing and its errors, the sliding windows, edge removal and merge, the results writer, and
the spotting driver end to end on a 2-fps frame-folder game with an oracle score function."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import cli, soccernet as S

GOAL, CORNER = S.CLASS_INDEX["Goal"], S.CLASS_INDEX["Corner"]


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
    return S.average_map(tmp_path / "labels", tmp_path / "preds", ["lg/season/g1"], metric)


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
    assert r["a_mAP_present"] == pytest.approx(0.5)  # Goal, the one class with an event
    two = _metric(tmp_path, [(1, 10000, "Goal", "visible"), (2, 5000, "Corner", "not shown")],
                  [(1, 10000, "Goal", 0.8), (1, 30000, "Goal", 0.9)], "tight")
    assert two["a_mAP_present"] == pytest.approx((0.5 + 0.0) / 2)  # Corner missed: AP 0


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
    r = S.average_map(tmp_path / "labels", tmp_path / "preds", ["lg/s/a", "lg/s/b"], "at1")
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
    out = S._closest(t)
    assert out[:, 0].tolist() == [1, 1, 1, 1, -1, -1, -1, -1, -1, -1]
    assert (out[:, 1] == -1).all()  # no GT: -1 everywhere


def test_metric_rejects_bad_metric_and_missing_file(tmp_path):
    with pytest.raises(ValueError):
        _metric(tmp_path, [], [], "at6")
    with pytest.raises(FileNotFoundError):
        S.average_map(tmp_path, tmp_path, ["nope"])


# ---- labels ----
def test_parse_labels_and_frame_encoding(tmp_path):
    _write_game(tmp_path, "g", [(1, 1250, "Goal", "visible"), (1, 3000, "Corner", "not shown"),
                                (2, 1000, "Goal", "visible"), (1, 500, "Not a class", "visible")],
                [])
    ann = S.parse_labels(tmp_path / "labels/g/Labels-v2.json")
    assert ann == [S.Annotation(1, 1250, GOAL, True), S.Annotation(1, 3000, CORNER, False),
                   S.Annotation(2, 1000, GOAL, True)]
    y = S.frame_labels(ann, half=1, num_frames=10)  # frames at 0, 0.5, ..., 4.5 s
    assert y.shape == (10, 17) and y.sum() == 5
    assert y[:, GOAL].nonzero().flatten().tolist() == [2, 3]  # |1.25 - t| <= .5: t = 1, 1.5
    assert y[:, CORNER].nonzero().flatten().tolist() == [5, 6, 7]  # 2.5, 3, 3.5 (inclusive)
    tok = S.token_labels(y[None])  # (1, 5, 17)
    assert tok.shape == (1, 5, 17)
    assert tok[0, :, GOAL].tolist() == [0, 1, 0, 0, 0]
    assert tok[0, :, CORNER].tolist() == [0, 0, 1, 1, 0]
    assert S.token_times(torch.tensor([5.0, 5.5, 6.0, 6.5])).tolist() == [5.25, 6.25]
    with pytest.raises(ValueError):
        S.token_labels(torch.zeros(3, 17))


def test_parse_labels_malformed(tmp_path):
    p = tmp_path / "Labels-v2.json"
    p.write_text(json.dumps({"annotations": [{"gameTime": "1 - 00:01", "label": "Goal",
                                              "position": "abc"}]}))
    with pytest.raises(ValueError, match="#0"):
        S.parse_labels(p)
    p.write_text(json.dumps({"annotations": [{"gameTime": "1 - 01:05", "label": "Goal"}]}))
    assert S.parse_labels(p) == [S.Annotation(1, 65000, GOAL, True)]  # MM:SS fallback


def test_malformed_labels_name_the_file(tmp_path):
    bad = tmp_path / "Labels-v2.json"
    bad.write_text('{"annotations": [{"gameTime": "1 - 00:10", "label": "Goal"')
    with pytest.raises(cli.InputError, match="Labels-v2.json: not valid JSON"):
        S.parse_labels(bad)
    bad.write_text(json.dumps({"annotations": [{"gameTime": "3 - 00:10", "label": "Goal",
                                                "position": "10000"}]}))
    with pytest.raises(cli.InputError, match="annotation #0 has half 3"):
        S.parse_labels(bad)


# ---- NMS ----
def test_hard_nms():
    s = torch.tensor([0.1, 0.5, 0.2, 0.3, 0.9, 0.3, 0.0, 0.0, 0.4, 0.4, 0.0, 0.0005])[:, None]
    keep = lambda w, thr=0.001: S.hard_nms(s, w, thr)[:, 0].nonzero().flatten().tolist()  # noqa
    assert keep(4) == [1, 4, 8, 9]  # ties both kept
    assert keep(4, 0.45) == [1, 4]
    assert keep(2) == [1, 4, 8, 9]  # 11 is a local max but under the threshold
    assert keep(2, 0.0) == [1, 4, 8, 9, 11]
    assert keep(8) == [4, 9]  # 8 sees the 0.9 at 4 (distance 4), 9 does not


def test_soft_nms():
    s = torch.tensor([0.2, 0.8, 0.6, 0.1, 0.7, 0.0])
    out = S.soft_nms(s, window=4, threshold=0.001)
    assert torch.allclose(out, torch.tensor([0.1, 0.8, 0.3, 0.025, 0.7, 0.0]))
    out = S.soft_nms(s, window=4, threshold=0.05)
    assert torch.allclose(out, torch.tensor([0.1, 0.8, 0.3, 0.0, 0.7, 0.0]))
    out = S.soft_nms(torch.tensor([0.9, 0.6, 0.5]), window=3)  # radius 1.5: weights 2/3, 1
    assert torch.allclose(out, torch.tensor([0.9, 0.6 * 2 / 3 * 2 / 3, 0.5]))
    assert torch.equal(s, torch.tensor([0.2, 0.8, 0.6, 0.1, 0.7, 0.0]))  # input untouched


# ---- sliding windows ----
def test_window_starts():
    assert S.window_starts(150) == [0, 32, 64, 86]
    assert S.window_starts(160) == [0, 32, 64, 96]
    assert S.window_starts(150.7) == [0, 32, 64, 86]
    assert S.window_starts(20, 8, 4) == [0, 4, 8, 12]
    assert S.window_starts(21.5, 8, 4) == [0, 4, 8, 12, 13]
    assert S.window_starts(5, 8, 4) == [0]


def test_edge_keep():
    t = lambda s: s + torch.arange(8) + 0.25  # noqa: E731
    assert S.edge_keep(t(0), 2, 20).tolist() == [True] * 6 + [False] * 2  # start of half kept
    assert S.edge_keep(t(6), 2, 20).tolist() == [False] * 2 + [True] * 4 + [False] * 2
    # end of half: the fix keeps the last seconds, the official guard (default) drops them
    assert S.edge_keep(t(12), 2, 20, official_end=False).tolist() == [False] * 2 + [True] * 6
    assert S.edge_keep(t(12), 2, 20).tolist() == [False] * 2 + [True] * 4 + [False] * 2
    assert S.edge_keep(t(6), 0, 20).all()


def test_merge_window():
    buf = S.half_buffer(10.0, num_classes=1)
    assert buf.shape == (19, 1)
    ta, tb = torch.arange(4) + 0.25, torch.arange(4) + 2.25  # windows starting at 0 and 2
    S.merge_window(buf, torch.tensor([0.1, 0.2, 0.3, 0.4])[:, None], ta)
    S.merge_window(buf, torch.tensor([0.5, 0.1, 0.6, 0.7])[:, None], tb)
    expect = torch.zeros(19)
    expect[[0, 2, 4, 6, 8, 10]] = torch.tensor([0.1, 0.2, 0.5, 0.4, 0.6, 0.7])
    assert torch.allclose(buf[:, 0], expect)  # j + 0.25 -> even index (half to even)
    avg = S.half_buffer(10.0, num_classes=1)
    S.merge_window(avg, torch.tensor([0.1, 0.2, 0.3, 0.4])[:, None], ta, how="average")
    S.merge_window(avg, torch.tensor([0.5, 0.1, 0.6, 0.7])[:, None], tb, how="average")
    assert torch.allclose(avg[[4, 6, 8], 0], torch.tensor([0.4, 0.25, 0.6]))
    # clamping and within-window max: 9.75 -> round(19.5) = 20 -> 18; 9.5 -> 19 -> 18
    S.merge_window(buf, torch.tensor([0.3, 0.9])[:, None], torch.tensor([9.75, 9.5]))
    assert buf[18, 0] == pytest.approx(0.9)


def test_predictions_writer_roundtrip(tmp_path):
    buf = torch.zeros(200, 17)
    buf[24, GOAL], buf[125, CORNER], buf[126, CORNER] = 0.9, 0.7, 0.6
    hard = S.spotting_predictions(buf, half=2, nms="hard", window=4)
    assert [(p["label"], p["position"], p["gameTime"]) for p in hard] == [
        ("Goal", "12000", "2 - 00:12"), ("Corner", "62500", "2 - 01:02")]
    assert hard[0]["half"] == "2" and hard[0]["confidence"] == pytest.approx(0.9)
    soft = S.spotting_predictions(buf, half=1, window=4)  # 126 decays to 0.6 * 1/2
    assert [(p["position"], round(p["confidence"], 6)) for p in soft if p["label"] == "Corner"] \
        == [("62500", 0.7), ("63000", 0.3)]
    path = S.write_results(tmp_path / "preds", "lg/s/g", hard + soft)
    data = json.loads(path.read_text())
    assert data["UrlLocal"] == "lg/s/g/"
    assert [(p["half"], p["position"]) for p in data["predictions"]] == [
        ("1", "12000"), ("1", "62500"), ("1", "63000"), ("2", "12000"), ("2", "62500")]
    _write_game(tmp_path, "lg/s/g", [(2, 12000, "Goal", "visible"),
                                     (2, 62500, "Corner", "visible")], [])
    S.write_results(tmp_path / "preds", "lg/s/g", hard)
    r = S.average_map(tmp_path / "labels", tmp_path / "preds", ["lg/s/g"], "at1")
    assert r["a_mAP"] == pytest.approx(2 / 17)


# ---- the spotting driver ----
def _frame_folder_game(root, game: str, frames: tuple, labels: list) -> None:
    """A game of 2-fps PNG frame folders `{1,2}_224p/` (the official layout); pixel (0, 0)
    of frame i of half h holds (i, h, 0), so a score function can tell which frame it got."""
    _write_game(root, game, labels, [])
    for half, n in zip((1, 2), frames):
        folder = root / "labels" / game / f"{half}_224p"
        folder.mkdir()
        for i in range(n):
            img = np.zeros((4, 4, 3), np.uint8)
            img[0, 0] = (i, half, 0)
            Image.fromarray(img).save(folder / f"{i + 1:08d}.png")


def test_predict_half_places_each_token_at_its_frames_and_keeps_the_end_quirk(tmp_path):
    # D = 20 s: windows of 8 s at 0, 4, 8, 12 (batches of 3 then 1); token j of the window at
    # s covers frames 2(s + j) and 2(s + j) + 1, lands on index 2(s + j) (t = s + j + 0.25,
    # half to even); its scores say which frames it got: (first + 1) / 1000, (second + 1) / 1000
    _frame_folder_game(tmp_path, "g", (40, 41), [])
    h = S.read_halves(tmp_path / "labels", ["g"])[0]
    assert (h.half, h.duration) == (1, 20.0)
    batches = []

    def score(x):  # (b, 16, 3, 4, 4) uint8 -> (b, 8, 17): classes 0 and 1 say the frames
        batches.append(x.shape[0])
        idx = x[:, :, 0, 0, 0].float()  # (b, 16) frame indices
        return torch.cat([torch.stack([idx[:, 0::2], idx[:, 1::2]], -1).add(1) / 1000,
                          torch.zeros(len(x), 8, 15)], -1)

    for official_end, filled in ((True, 18), (False, 20)):
        buf = S.predict_half(score, h, window=8.0, batch_size=3, remove_s=2.0,
                             official_end=official_end)
        assert buf.shape == (39, 17) and batches[-2:] == [3, 1]
        want = torch.zeros(39, 17)
        m = torch.arange(filled) * 2  # the even indices; the official guard empties 36, 38
        want[m, 0], want[m, 1] = (m + 1).float() / 1000, (m + 2).float() / 1000
        assert torch.equal(buf, want), official_end
    for bad in ((1, 3, 17), (1, 8, 16)):  # 3 tokens do not divide 16 frames; not 17 classes
        with pytest.raises(ValueError, match="T dividing the 16 frames"):
            S.predict_half(lambda x: torch.zeros(bad), h, window=8.0)


def test_spot_with_an_oracle_scores_every_event(tmp_path):
    # the oracle fires 1.0 on the token holding each event's second: every event is found at
    # 1-s tolerance (12.5 s is predicted at 12.0 s, frame 24 vs 25), so at1 a-mAP = 2 / 17
    # (Goal and Corner), visible 2 / 17, unshown 1 / 17 (the half-2 Corner is not shown)
    labels = [(1, 7000, "Goal", "visible"), (1, 12500, "Corner", "visible"),
              (2, 4000, "Goal", "visible"), (2, 15200, "Corner", "not shown")]
    _frame_folder_game(tmp_path, "lg/s/g", (40, 41), labels)
    ann = S.parse_labels(tmp_path / "labels/lg/s/g/Labels-v2.json")

    def oracle(x):  # (b, 16, 3, H, W) -> (b, 8, 17)
        out = torch.zeros(len(x), 8, S.NUM_CLASSES)
        for b in range(len(x)):
            half = int(x[b, 0, 1, 0, 0])
            for j in range(8):
                second = int(x[b, 2 * j, 0, 0, 0]) // 2
                for a in ann:
                    if a.half == half and a.position_ms // 1000 == second:
                        out[b, j, a.label] = 1.0
        return out

    res, buffers = S.spot(oracle, tmp_path / "labels", ["lg/s/g"], tmp_path / "preds",
                          ("at1", "tight"), window=8.0, batch_size=2, remove_s=1.0)
    assert list(res) == ["at1", "tight"] and set(buffers) == {("lg/s/g", 1), ("lg/s/g", 2)}
    assert buffers[("lg/s/g", 2)].shape == (40, 17)
    preds = json.loads((tmp_path / "preds/lg/s/g/results_spotting.json").read_text())
    assert [(p["half"], p["label"], p["position"], p["confidence"])
            for p in preds["predictions"]] == [
        ("1", "Goal", "7000", 1.0), ("1", "Corner", "12000", 1.0),
        ("2", "Goal", "4000", 1.0), ("2", "Corner", "15000", 1.0)]
    assert res["at1"]["a_mAP"] == pytest.approx(2 / 17)
    assert res["at1"]["a_mAP_visible"] == pytest.approx(2 / 17)
    assert res["at1"]["a_mAP_unshown"] == pytest.approx(1 / 17)
    assert res["tight"] == S.average_map(tmp_path / "labels", tmp_path / "preds", ["lg/s/g"])


def test_save_timeline_draws_the_events_and_the_scores_where_they_are(tmp_path):
    # 8 px per second after a 170-px label column, rows of 22 px from y = 44: one class block
    # per class with events (truth row, then a row per curve), 10 px apart
    _frame_folder_game(tmp_path, "g", (40, 41), [(1, 7000, "Goal", "visible"),
                                                 (1, 12500, "Corner", "not shown")])
    h = S.read_halves(tmp_path / "labels", ["g"])[0]
    buf = torch.zeros(39, 17)
    buf[14, GOAL] = 0.5  # t = 7.0 s; the row is scaled to its max, so a full-height bar
    path = tmp_path / "out" / "timeline.png"
    S.save_timeline(path, h, {"model": buf}, "a title")
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (44 + 2 * (22 * 2 + 10) + 34, 560, 3)
    green, blue, white = (0, 128, 0), (0, 0, 255), (255, 255, 255)
    assert tuple(img[44 + 11, 170 + 8 * 7]) == green  # Goal (class 2 first): a filled tick
    assert tuple(img[98 + 11, 270]) == white and tuple(img[98 + 11, 268]) == green  # hollow
    assert tuple(img[66 + 12, 170 + 60]) == blue  # the bar of second 7, full height
    assert tuple(img[66 + 12, 170 + 28]) == white  # second 3: no score, no bar
    assert tuple(img[120 + 12, 170 + 60]) == white  # Corner's curve row stays empty
