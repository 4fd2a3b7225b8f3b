"""Distributed evaluation counts each sample exactly once: 2-process gloo runs on
splits of 3 samples (which 2 does not divide) give the one-process values, for the
classification evaluations and for the label-propagation benchmarks (DAVIS, JHMDB, VIP), whose
videos the ranks share.

A classifier that always answers class 0, on 3 samples labelled [0, 1, 1], scores 33.33 top-1;
a sampler that pads the split with a repeated sample would score 50.00 on 2 processes, and an
unreadable extra clip replaced by its neighbour (label 1) 25.00: it is left out instead. A
split of one sample leaves the second process an empty share.
"""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common import propagation as P, synthetic
from tests.test_common_propagation import mat_variable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, sys
import torch
from torch import nn
sys.path.insert(0, sys.argv[1])
import sce_image, sigma
from common import data, dist, log, optim, evaluate
from common.data import VideoRecord

cfg = json.load(open(sys.argv[2]))
dev = dist.init("cpu")
amp = optim.Amp("none", dev)
out = {}

class Zero(nn.Module):  # features 0 -> the head's logits are its bias 0 -> argmax class 0
    feat_dim = 4
    def forward(self, x):
        return torch.zeros(len(x), self.feat_dim)

class AlwaysZero(nn.Module):  # logits favouring class 0
    def forward(self, x):
        return torch.tensor([[2.0, 0.0]]).expand(len(x), 2)

a = sce_image.Args(**cfg["sce"])
out["sce_linear"] = sce_image.linear_eval(Zero(), a, dev, amp, log.Logger(None))
s = sigma.Args(**cfg["sigma"])
recs = [VideoRecord(p, y) for p, y in cfg["videos"]]
missing = VideoRecord(cfg["missing"], 1)  # unreadable: left out, not replaced by a neighbour
out["sigma_multi_view"] = sigma.multi_view_test(AlwaysZero(), recs[:2] + [missing] + recs[2:],
                                                s, dev, amp)
loader = sigma.make_loader(sigma.ClipViews(recs, s, "single"), 2, s, train=False)
f, y = evaluate.extract_features(lambda x: x.flatten(1)[:, :8], loader, dev)
out["features"] = {"labels": y.tolist(), "n": len(f)}
one = sigma.make_loader(sigma.ClipViews(recs[:1], s, "single"), 2, s, train=False)
f, y = evaluate.extract_features(lambda x: x.flatten(1)[:, :8], one, dev)  # rank 1 has none
out["one_sample"] = {"labels": y.tolist(), "shape": list(f.shape)}
g = torch.Generator().manual_seed(0)  # the same features on both ranks; 7 queries split 4 + 3
bank, qf = torch.randn(12, 5, generator=g), torch.randn(7, 5, generator=g)
by, qy = torch.randint(0, 3, (12,), generator=g), torch.randint(0, 3, (7,), generator=g)
out["knn"] = [evaluate.knn_classify(bank, by, qf, qy, 3, (1, 3), chunk=2, share=s)
              for s in (True, False)]
out["recall"] = [evaluate.retrieval_recall(qf, qy, bank, by, (1, 2), chunk=2, share=s)
                 for s in (True, False)]
if dist.is_main():
    json.dump(out, open(sys.argv[3], "w"))
dist.cleanup()
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_eval")
    for split, counts in (("train", {"a": 2, "b": 2}), ("val", {"a": 1, "b": 2})):
        for cls, n in counts.items():
            (tmp / "img" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(
                    tmp / "img" / split / cls / f"{i}.png")
    videos = synthetic.videos(tmp / "vid", size=32, frames=16, per_class_train=1,
                              per_class_val=1)
    paths = [line.split()[0] for line in open(videos / "val.csv")][:3]
    import sce_image as S
    import sigma as G
    sce = dataclasses.asdict(S.Args(data=str(tmp / "img"), img_size=32, lin_epochs=0,
                                    lin_batch_size=2, num_workers=0, amp="none",
                                    output_dir=str(tmp / "out")))
    sig = dataclasses.asdict(G.Args(input_size=32, num_frames=8, sampling_rate=2, test_clips=2,
                                    test_crops=1, ft_batch_size=2, num_workers=0, amp="none"))
    cfg = {"sce": sce, "sigma": sig, "missing": str(tmp / "missing.mp4"),
           "videos": [[str(videos / p), y] for p, y in zip(paths, [0, 1, 1])]}
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    (tmp / "script.py").write_text(SCRIPT)
    return tmp


def run(tmp, nproc: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
              "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]
    result = tmp / f"out{nproc}.json"
    proc = subprocess.run(launch + [str(tmp / "script.py"), ROOT, str(tmp / "cfg.json"),
                                    str(result)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result.read_text())


def test_two_processes_count_each_sample_once(setup):
    one, two = run(setup, 1), run(setup, 2)
    assert one["sce_linear"]["linear_top1"] == pytest.approx(100 / 3)
    assert one["sigma_multi_view"]["top1"] == pytest.approx(100 / 3)
    assert one["sigma_multi_view"]["top5"] == 100.0  # 2 classes: always in the top 5
    assert two == one
    assert two["features"] == {"labels": [0, 1, 1], "n": 3}
    assert two["one_sample"] == {"labels": [0], "shape": [1, 8]}
    # kNN and retrieval: each rank scores its slice of the queries, the counts are summed
    assert two["knn"][0] == two["knn"][1] == one["knn"][1]
    assert two["recall"][0] == two["recall"][1] == one["recall"][1]
    assert len({v for v in one["knn"][1].values()}) > 1  # k = 1 and 3 differ: a real check


# ---- label propagation: DAVIS / JHMDB / VIP videos shared between the ranks ----
def propagation_inputs(tmp) -> dict:
    """3 synthetic DAVIS sequences (48 x 64, 5 frames); the same frames as 3 JHMDB videos with
    random joints and as 3 VIP videos with the DAVIS ids as classes; a 1-video VIP list, and
    one whose video 1 has no first annotation."""
    davis = synthetic.davis(tmp / "davis", size=(48, 64), sequences=3, frames=5)
    seqs = [f"JPEGImages/480p/synth{i:02d}" for i in range(3)]
    anns = [f"Annotations/480p/synth{i:02d}" for i in range(3)]
    g, jhmdb = np.random.default_rng(0), []
    head = b"MATLAB 5.0 MAT-file".ljust(116) + bytes(8) + b"\x00\x01IM"
    for i in range(3):
        pts = np.stack([g.uniform(0, 63, (15, 5)), g.uniform(0, 47, (15, 5))]) + 1  # 1-based
        mat = davis / f"joints{i}.mat"
        mat.write_bytes(head + mat_variable("<", "pos_img", pts, 6, 9, "f8"))
        jhmdb.append(f"{mat.name} {seqs[i]}\n")
    (davis / "empty").mkdir(exist_ok=True)
    lists = {"jhmdb": jhmdb, "vip": [f"{s} {a}\n" for s, a in zip(seqs, anns)]}
    lists["vip_one"] = lists["vip"][:1]
    lists["vip_bad"] = [lists["vip"][0], f"{seqs[1]} empty\n", lists["vip"][2]]
    cfg = {"davis": str(davis)}
    for name, lines in lists.items():
        (davis / f"{name}.txt").write_text("".join(lines))
        cfg[name] = str(davis / f"{name}.txt")
    (tmp / "prop.json").write_text(json.dumps(cfg))
    return cfg


def run_propagation(tmp, nproc: int) -> list:
    out = tmp / f"prop{nproc}"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
              "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0"]
    proc = subprocess.run(launch + [os.path.join(ROOT, "tests", "propagation_worker.py"),
                                    str(tmp / "prop.json"), str(out)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_propagation_benchmarks_shared_between_two_processes(tmp_path):
    """Rank r computes videos r, r + 2, ...: both ranks return the one-process scores exactly
    (J&F, PCK, mIoU), rank 0 holds sequences 0 and 2 and rank 1 sequence 1 (the same label maps
    as one process), every sequence's PNGs are written once, a rank without videos still joins,
    and an unreadable video on rank 1 raises the same error on both ranks (no rank left
    waiting)."""
    cfg = propagation_inputs(tmp_path)
    (one,), two = run_propagation(tmp_path, 1), run_propagation(tmp_path, 2)
    assert one["world"] == 1 and [r["world"] for r in two] == [2, 2]
    for key in ("davis", "davis_native", "jhmdb", "vip", "vip_one_video", "vip_error"):
        for r in two:
            assert r[key] == one[key], (key, r["rank"])
    # the scores are real: neither trivial nor perfect
    assert 0.1 < one["davis"]["J&F-Mean"] < 0.99 and 0.1 < one["vip"]["mIoU"] < 0.99
    assert 0 < one["jhmdb"]["PCK@0.2"] < 100
    assert one["vip_error"][0] == "FileNotFoundError" and "first frame" in one["vip_error"][1]
    assert one["davis_pred_order"] == ["synth00", "synth01", "synth02"]
    assert two[0]["davis_pred_order"] == ["synth00", "synth02"]
    assert two[1]["davis_pred_order"] == ["synth01"]
    for r in two:
        for name, digest in r["davis_preds"].items():
            assert digest == one["davis_preds"][name], name
    for name in one["davis_pred_order"]:
        for t in range(5):
            a = P.read_label_png(tmp_path / "prop1" / "davis_pred" / name / f"{t:05d}.png")
            b = P.read_label_png(tmp_path / "prop2" / "davis_pred" / name / f"{t:05d}.png")
            assert np.array_equal(a, b), (name, t)
    # the one-process run is the plain call: the same scores in this process
    assert one["davis"] == pytest.approx(
        P.eval_davis(lambda x: torch.nn.functional.pixel_unshuffle(x, 8), cfg["davis"],
                     size=(48, 64))[0], rel=1e-12)
