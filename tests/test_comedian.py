"""comedian.py (foundation): the synthetic SoccerNet set it trains on (labels parse, videos
decode, events on screen at the labelled times, the bars and motions that carry their class,
the teacher bank), the token-level SCE loss by hand and its limits, and the temporal mask
counts. The SoccerNet toolkit (metric, NMS, labels, windows, results, spotting driver) is
tested in test_common_soccernet.py."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import comedian as C
from common import soccernet, synthetic, video


# ---- synthetic SoccerNet ----
def test_synthetic_soccernet(tmp_path):
    root = synthetic.soccernet(tmp_path / "sn", seed=3, games=(2, 1, 1), seconds=(14, 16))
    splits = {s: (root / f"{s}.txt").read_text().split("\n")[:-1]
              for s in ("train", "valid", "test")}
    assert [len(v) for v in splits.values()] == [2, 1, 1]
    seen, banks = 0, []
    for game in sum(splits.values(), []):
        assert len(Path(game).parts) == 3  # league/season/game
        raw = json.loads((root / game / "Labels-v2.json").read_text())
        assert raw["UrlLocal"] == game + "/"
        ann = soccernet.parse_labels(root / game / "Labels-v2.json")
        assert len(ann) == len(raw["annotations"]) > 0
        for a, r in zip(ann, raw["annotations"]):  # gameTime agrees with position
            s = a.position_ms // 1000
            assert r["gameTime"] == f"{a.half} - {s // 60:02d}:{s % 60:02d}"
            assert r["team"] in ("home", "away") and soccernet.CLASSES[a.label] in \
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
            # event's +-0.5 s overlaps holds its class prototype, every other second the
            # "no event" one (unit vectors + N(0, 0.01^2) noise)
            feats = np.load(root / game / f"{half}_synthetic_teacher.npy")
            assert feats.shape == (math.ceil(meta.num_frames / 4), synthetic.TEACHER_DIM)
            hot = {s for a in ann if a.half == half and a.visible
                   for s in range((a.position_ms - 500) // 1000, (a.position_ms + 500) // 1000 + 1)}
            unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
            cold = [s for s in range(len(feats)) if s not in hot]
            rest = unit[cold].mean(0) / np.linalg.norm(unit[cold].mean(0))
            assert all(unit[s] @ rest > 0.6 for s in cold) and all(unit[s] @ rest < 0.6 for s in hot)
            banks.append((root / game / f"{half}_synthetic_teacher.npy", cold))
    assert seen >= 4
    assert sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) < 10 * 2**20
    # what stage 2 sees (z-scored, PCA, unit rows: centred on the mean row) still has one
    # "no event" direction, not noise (at N(0, 0.1^2) noise this mean cosine was 0.10)
    pca = C.fit_pca([f for f, _ in banks], 512)
    z = F.normalize(torch.cat([((torch.from_numpy(np.load(f).astype(np.float64)) - pca["mean"])
                                / pca["std"] @ pca["components"])[cold] for f, cold in banks]),
                    dim=1)
    assert (z @ z.T).mean() > 0.8
    with pytest.raises(ValueError, match="do not fit"):  # too dense: an error, not a hang
        synthetic.soccernet(tmp_path / "dense", games=(1, 0, 0), events_per_minute=60.0)


def test_synthetic_soccernet_event_motion():
    """The class is the bar and its motion: on screen exactly within 1 s of the event, a
    horizontal (classes 0-3) or vertical bar that moves up or down by 0.6 of the height or
    grows or shrinks 3x in area between -0.75 s and +0.75 s (found as what differs from the
    same half drawn without the event)."""
    for c in range(8):
        f1, f0 = (synthetic._soccernet_half(np.random.default_rng(c), 24, 4, 64, 112, ev)
                  .astype(float) for ev in ([(3000, c)], []))
        bar = np.abs(f1 - f0).sum(-1) > 100  # (T, H, W); the bar is 90 grey levels up
        assert not bar[[7, 17]].any() and all(bar[i].sum() > 60 for i in range(8, 17))
        ys, xs = np.nonzero(bar[12])
        assert ((np.ptp(xs) + 1) / 112 > (np.ptp(ys) + 1) / 64) == (c < 4)
        rise = np.nonzero(bar[9])[0].mean() - np.nonzero(bar[15])[0].mean()  # rows up, px
        grow = bar[15].sum() / bar[9].sum()
        want = {0: (rise > 0.5 * 0.6 * 64 * 0.75, True), 1: (rise < -0.5 * 0.6 * 64 * 0.75, True),
                2: (abs(rise) < 3, grow > 2.5), 3: (abs(rise) < 3, grow < 1 / 2.5)}[c % 4]
        assert all(want), (c, rise, grow)


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
