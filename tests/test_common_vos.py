"""common/vos.py: matching and mIoU against the spec's worked example and hand-made maps,
the Hungarian method against brute force, k-means and PCA, the clip sampling and loading, the
YouTube-VOS reader (category remap by value), and a 2-process evaluation against 1 process."""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common import cli, propagation, synthetic, vos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GT = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2])


def clip(a):  # 12 pixels as one clip of 2 frames of 2 x 3: frames are pooled anyway
    return np.asarray(a).reshape(2, 2, 3)


# ---- matching and mIoU ----
def test_spec_worked_example():
    hung = vos.cluster_miou(clip([0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]), clip(GT), 3)
    assert hung["miou"] == pytest.approx(0.7556, abs=5e-5)
    assert hung["iou"] == pytest.approx({0: 4 / 6, 1: 3 / 5, 2: 1.0})
    over = clip([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    m2o = vos.cluster_miou(over, clip(GT), 4, "many_to_one")
    assert m2o["miou"] == pytest.approx(0.6944, abs=5e-5)
    assert m2o["iou"] == pytest.approx({0: 5 / 6, 1: 2 / 4, 2: 3 / 4})
    assert m2o["pred"].ravel().tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    iou_based = vos.cluster_miou(over, clip(GT), 4, "many_to_one", precision_based=False)
    assert iou_based["miou"] == pytest.approx(m2o["miou"])  # "the same here" (spec §5)


def test_perfect_permuted_and_merged_clusterings():
    g = torch.from_numpy(clip(GT))
    assert vos.cluster_miou(g, g)["miou"] == 1.0
    perm = torch.tensor([2, 0, 1])[g]  # the same partition under other ids: Hungarian finds it
    assert vos.cluster_miou(perm, g, 3)["miou"] == 1.0
    assert vos.cluster_miou(perm, g, 3, "many_to_one")["miou"] == 1.0
    split = clip([0, 0, 0, 3, 3, 3, 1, 1, 4, 2, 5, 5])  # each label cut in two: 6 clusters
    assert vos.cluster_miou(split, clip(GT), 6, "many_to_one")["miou"] == 1.0  # merged back
    hung = vos.cluster_miou(split, clip(GT), 6)  # the larger half of each object is matched,
    # the other clusters fall to background: bg = 6 of 8 pixels, objects 2 of 3
    assert hung["iou"] == pytest.approx({0: 6 / 8, 1: 2 / 3, 2: 2 / 3})


def test_background_only_empty_frames_ignore_and_missing_clusters():
    bg = np.zeros((3, 4, 4), np.int64)
    two = np.zeros((3, 4, 4), np.int64)
    two[:, :2] = 1
    assert vos.cluster_miou(two, bg)["miou"] == 1.0  # the unmatched cluster becomes 0
    assert vos.cluster_miou(two, bg, 2, "many_to_one")["iou"] == {0: 1.0}
    # an object in frame 0 only; frames 1-2 background only: pooled over the clip
    gt = np.zeros((3, 4, 4), np.int64)
    gt[0, :2] = 1  # 8 object pixels, 40 background
    pred = np.zeros_like(gt)
    pred[0, :2], pred[1, :1] = 1, 1  # 4 false positives in an empty frame
    res = vos.cluster_miou(pred, gt, 2)
    assert res["iou"] == pytest.approx({0: 36 / 40, 1: 8 / 12})
    # labels absent from the GT are not scored; 255 pixels count nowhere
    gt255 = gt.copy()
    gt255[1, :1] = 255
    assert vos.cluster_miou(pred, gt255, 2)["iou"] == pytest.approx({0: 1.0, 1: 1.0})
    # fewer clusters than labels (pitfall 9): the unmatched label scores 0
    assert vos.cluster_miou(np.zeros(12, np.int64).reshape(2, 2, 3), clip(GT), 3)["iou"] == \
        pytest.approx({0: 0.5, 1: 0.0, 2: 0.0})
    for bad in [dict(clusters=np.full((1, 2, 2), 0), gt=np.full((1, 2, 2), 255)),  # nothing
                dict(clusters=np.zeros((0, 2, 2)), gt=np.zeros((0, 2, 2))),  # no frame
                dict(clusters=np.zeros((1, 2, 2)), gt=np.zeros((1, 2, 3))),  # shapes
                dict(clusters=np.full((1, 2, 2), 3), gt=np.zeros((1, 2, 2)), num_clusters=3)]:
        with pytest.raises(ValueError):
            vos.cluster_miou(**bad)


@pytest.mark.parametrize("shape", [(n, n) for n in range(1, 7)] + [(2, 5), (5, 2), (3, 6),
                                                                     (6, 4), (1, 4)])
def test_hungarian_against_brute_force(shape):
    rng = np.random.default_rng(shape[0] * 10 + shape[1])
    n, m = shape
    for trial in range(6):  # real costs, then integer costs with many ties
        cost = rng.random(shape) if trial % 2 else rng.integers(0, 3, shape).astype(float)
        pairs = vos.linear_sum_assignment(cost)
        rows, cols = zip(*pairs)
        assert len(pairs) == min(n, m) and len(set(rows)) == len(set(cols)) == min(n, m)
        assert list(rows) == sorted(rows)
        if n <= m:
            best = min(sum(cost[i, p[i]] for i in range(n))
                       for p in itertools.permutations(range(m), n))
        else:
            best = min(sum(cost[p[j], j] for j in range(m))
                       for p in itertools.permutations(range(n), m))
        assert sum(cost[i, j] for i, j in pairs) == pytest.approx(best, abs=1e-12)


def test_batch_mean_is_the_mean_of_batch_means():
    assert vos.batch_mean([1.0, 2.0, 3.0], 2) == pytest.approx((1.5 + 3.0) / 2)
    assert vos.batch_mean(list(range(30)), 16) == pytest.approx((7.5 + 22.5) / 2)


# ---- clustering ----
def blobs(seed=0, n=600, k=4, d=5):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 20
    labels = torch.arange(n) % k
    return centres[labels] + torch.randn(n, d, generator=g), labels


def same_partition(a, b) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_recovers_blobs_deterministically():
    x, y = blobs()
    lab = vos.kmeans(x, 4)
    assert same_partition(lab, y)
    assert torch.equal(lab, vos.kmeans(x, 4))  # the same seed, the same labels
    sub = vos.kmeans(x, 4, max_points=20, seed=3)  # trained on 80 of the 600 points
    assert same_partition(sub, y) and torch.equal(sub, vos.kmeans(x, 4, max_points=20, seed=3))
    twins = torch.cat([torch.zeros(50, 3), torch.ones(30, 3)])  # duplicates: empty clusters
    assert same_partition(vos.kmeans(twins, 2), torch.arange(80) >= 50)
    with pytest.raises(ValueError, match="3 points for 4 clusters"):
        vos.kmeans(x[:3], 4)


def test_pca_standardises_then_keeps_the_leading_directions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g)
    z = vos.pca_fit(x, 5)(x)
    assert z.shape == (500, 5) and z.mean(0).abs().max() < 1e-4
    cov = (z.T @ z / 500).double()
    var = cov.diag()
    assert (var[:-1] >= var[1:]).all()  # decreasing variance, no whitening
    assert (cov - torch.diag(var)).abs().max() < 1e-3 * var[0]  # uncorrelated
    scaled = vos.pca_fit(x * torch.arange(1, 9.0), 5)(x * torch.arange(1, 9.0))
    assert torch.allclose(scaled.abs(), z.abs(), atol=1e-3)  # the scaler removes the units
    assert vos.pca_fit(x, 50)(x).shape == (500, 8)  # at most D directions


def test_cluster_clip_upsamples_features_before_kmeans():
    f = torch.zeros(2, 4, 4, 6)
    f[:, :, 2:, 0] = 5.0  # right half of the token grid differs
    f += 0.01 * torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    lab = vos.cluster_clip(f, 2, size=32)
    assert lab.shape == (2, 32, 32)
    left, right = lab[..., :12], lab[..., 20:]  # away from the bilinear seam
    assert (left == left[0, 0, 0]).all() and (right == right[0, 0, 0]).all()
    assert left[0, 0, 0] != right[0, 0, 0]
    assert vos.cluster_clip(f, 2, size=None).shape == (2, 4, 4)  # token resolution


# ---- data ----
def test_sample_frames():
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = vos.sample_frames(30, 16, rng)
        assert idx == sorted(set(idx)) and len(idx) == 16 and max(idx) < 30
        short = vos.sample_frames(5, 16, rng)  # with replacement
        assert len(short) == 16 and short == sorted(short) and set(short) <= set(range(5))
    a, b = (vos.sample_frames(30, 4, np.random.default_rng([1, 7])) for _ in range(2))
    assert a == b


def test_load_clip_squashes_and_normalises(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 20:] = 255
    Image.fromarray(img).save(tmp_path / "f.jpg", quality=100)
    lab = np.zeros((20, 40), np.uint8)
    lab[:, 20:] = 7
    propagation.write_label_png(tmp_path / "m.png", lab)
    x, gt = vos.load_clip([tmp_path / "f.jpg"], [tmp_path / "m.png"], size=16)
    assert x.shape == (1, 3, 16, 16) and gt.shape == (1, 16, 16)
    assert set(gt.unique().tolist()) == {0, 7} and (gt[0, :, :8] == 0).all()
    assert x[0, 0, 0, 0].item() == pytest.approx((0 - 0.485) / 0.228, abs=0.02)  # official std
    y, _ = vos.load_clip([tmp_path / "f.jpg"], [tmp_path / "m.png"], 16, vos.STD_CORRECT)
    assert y[0, 0, 0, 0].item() == pytest.approx(x[0, 0, 0, 0].item() * 0.228 / 0.229)


@pytest.fixture(scope="module")
def ytvos(tmp_path_factory):
    return synthetic.ytvos(tmp_path_factory.mktemp("yt") / "ytvos", size=(48, 64), videos=4,
                           frames=5)


def test_read_ytvos_remaps_instances_to_categories(ytvos, tmp_path):
    every = vos.read_ytvos(ytvos)
    listed = vos.read_ytvos(ytvos, ytvos / "val.txt")
    assert [v[0] for v in every] == [f"synth{i:02d}" for i in range(4)]
    assert [v[0] for v in listed] == [f"synth{i:02d}" for i in range(3)]
    name, frames, masks, remap = every[0]
    assert remap == {1: 2, 2: 1, 3: 2}  # cat, bird, cat; categories sorted: bird 1, cat 2
    assert [p.name for p in frames] == [f"{5 * t:05d}.jpg" for t in range(5)]
    raw = np.stack([propagation.read_label_png(m) for m in masks])
    cat = vos.to_categories(raw, remap)
    assert set(np.unique(raw).tolist()) == {0, 1, 2, 3}
    assert (cat[raw == 1] == 2).all() and (cat[raw == 2] == 1).all() and \
        (cat[raw == 3] == 2).all() and (cat[raw == 0] == 0).all()
    with pytest.raises(cli.InputError, match="instance ids \\[4\\] not in meta.json"):
        vos.to_categories(np.full((1, 2, 2), 4, np.uint8), remap, "x.png")
    (tmp_path / "list.txt").write_text("synth00\n\nnope\n")
    with pytest.raises(cli.InputError, match="list.txt:3: .*nope.*not in meta.json"):
        vos.read_ytvos(ytvos, tmp_path / "list.txt")
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        vos.read_ytvos(tmp_path)
    for bad in ('{"videos": 3}', '{"videos": {"v": {"objects": {"a": {"category": "c"}}}}}',
                '{"videos": {"v": {"objects": {"300": {"category": "c"}}}}}'):
        (tmp_path / "meta.json").write_text(bad)  # not a dict, a key not an id, id > 254
        with pytest.raises(cli.InputError, match="meta.json: not a YouTube-VOS meta.json"):
            vos.read_ytvos(tmp_path)
    (tmp_path / "twice.txt").write_text("synth01\nsynth00\nsynth01\n")
    assert [v[0] for v in vos.read_ytvos(ytvos, tmp_path / "twice.txt")] == ["synth00", "synth01"]


def test_eval_vos_composes_the_public_pieces(ytvos, tmp_path):
    """Video 0's clustering score is sample_frames -> load_clip -> remap -> features ->
    cluster_clip -> cluster_miou; the picture has 4 labelled rows."""
    fn = TestFeatures()
    res = vos.eval_vos(fn, ytvos, "ytvos", frames=3, size=32, picture=str(tmp_path / "p.png"))
    name, frames, masks, remap = vos.read_ytvos(ytvos)[0]
    idx = vos.sample_frames(len(frames), 3, np.random.default_rng([1, 0]))
    x, gt = vos.load_clip([frames[t] for t in idx], [masks[t] for t in idx], 32)
    gt = vos.to_categories(gt.numpy(), remap)
    k = len(np.unique(gt))
    want = vos.cluster_miou(vos.cluster_clip(fn(x), k, 32), gt, k)["miou"]
    assert res["videos"][0] == {"name": name, "frames": idx, "clustering": want,
                                "overclustering": res["videos"][0]["overclustering"]}
    assert res["clustering"]["miou"] == pytest.approx(
        np.mean([v["clustering"] for v in res["videos"]]))
    assert 0.05 < res["clustering"]["miou"] < 1 and 0.05 < res["overclustering"]["miou"] <= 1
    with Image.open(tmp_path / "p.png") as im:
        assert im.height > 4 * 32 and im.width > 3 * 32
    with pytest.raises(FileNotFoundError, match="DAVIS split list not found"):
        vos.eval_vos(fn, tmp_path, "davis")


def test_eval_vos_refuses_unpaired_frames_and_masks_without_ids(tmp_path):
    """Frames and masks pair by rank, so unequal counts are an error (not a shifted pairing);
    masks holding only 0 and 255 (binary masks, all ignored) would score a perfect 1.0."""
    davis = synthetic.davis(tmp_path / "d", size=(48, 64), sequences=1, frames=4)
    seq = davis / "JPEGImages" / "480p" / "synth00"
    (seq / "00000.jpg").unlink()
    with pytest.raises(cli.InputError, match="4 masks for the 3 frames"):
        vos.eval_vos(TestFeatures(), davis, "davis", frames=2, size=32)
    davis = synthetic.davis(tmp_path / "e", size=(48, 64), sequences=1, frames=4)
    for m in (davis / "Annotations" / "480p" / "synth00").glob("*.png"):
        lab = propagation.read_label_png(m)
        propagation.write_label_png(m, np.where(lab > 0, 255, 0).astype(np.uint8))
    with pytest.raises(cli.InputError, match="hold only 0 and 255"):
        vos.eval_vos(TestFeatures(), davis, "davis", frames=2, size=32)


class TestFeatures:
    """Raw 8 x 8 pixel patches as dense features (T, S/8, S/8, 192)."""
    __test__ = False

    def __call__(self, x):
        return torch.nn.functional.pixel_unshuffle(x, 8).permute(0, 2, 3, 1)


def test_two_processes_equal_one(ytvos, tmp_path):
    """Videos shared between 2 gloo ranks (3 DAVIS videos: 2 does not divide them): every rank
    returns the one-process result exactly, also with PCA fitted on batches of 2 clips; the
    picture is written once, by the rank holding video 0."""
    davis = synthetic.davis(tmp_path / "davis", size=(48, 64), sequences=3, frames=5)
    (tmp_path / "cfg.json").write_text(json.dumps({"davis": str(davis), "ytvos": str(ytvos)}))
    out = {}
    for n in (1, 2):
        (tmp_path / f"o{n}").mkdir()
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
             "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
             os.path.join(ROOT, "tests", "vos_worker.py"), str(tmp_path / "cfg.json"),
             str(tmp_path / f"o{n}")], env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[n] = [json.loads((tmp_path / f"o{n}" / f"rank{r}.json").read_text())
                  for r in range(n)]
    (one,), two = out[1], out[2]
    assert [r["world"] for r in two] == [2, 2]
    for r in two:
        assert {k: v for k, v in r.items() if k != "world"} == \
            {k: v for k, v in one.items() if k != "world"}
    assert len(one["davis"]["videos"]) == 3 and one["davis"] != one["davis_batch2"]
    assert set(one["ytvos"]) == {f"vos_ytvos_{s}_miou{b}" for b in ("", "_batch16")
                                 for s in ("clustering", "overclustering")}
    assert (tmp_path / "o2" / "davis_rank0.png").is_file()
    assert not (tmp_path / "o2" / "davis_rank1.png").exists()
