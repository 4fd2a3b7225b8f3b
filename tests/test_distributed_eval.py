"""Distributed evaluation counts each sample exactly once: 2-process gloo runs on
splits of 3 samples (which 2 does not divide) give the one-process values.

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
from PIL import Image

from common import synthetic

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
