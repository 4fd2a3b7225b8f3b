import json
import os
import subprocess
import sys

import torch

from common import dist

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_single_process_is_a_world_of_one():
    assert dist.init("cpu") == torch.device("cpu")
    assert (dist.is_dist(), dist.rank(), dist.world(), dist.is_main()) == (False, 0, 1, True)
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(dist.all_reduce(t.clone(), "mean"), t)
    assert torch.equal(dist.all_gather(t), t)
    x = torch.ones(2, requires_grad=True)
    dist.all_gather_grad(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(2))


def test_seed_all_is_reproducible():
    dist.seed_all(3)
    a = torch.rand(4)
    dist.seed_all(3)
    assert torch.equal(a, torch.rand(4))


def test_two_process_gloo(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=0", "--rdzv_backend=c10d", "--rdzv_endpoint=localhost:0",
           os.path.join(HERE, "dist_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    for r, res in enumerate(ranks):
        assert (res["rank"], res["world"], res["is_main"]) == (r, 2, r == 0)
        assert res["seed"] == 7 + r
        assert res["sum"] == 3.0 and res["mean"] == 1.5
        assert res["gathered"] == [0.0, 0.0, 1.0, 1.0]
        assert res["gathered_grad_value"] == [1.0, 10.0, 2.0, 20.0]
        # d/dx_r of sum_k (k+1) * <gather(x), w> = (1 + 2) * w[2r:2r+2]
        assert res["grad"] == [3.0 * (2 * r + 1), 3.0 * (2 * r + 2)]
    assert ranks[0]["draw"] != ranks[1]["draw"]  # per-rank seeds differ
    for res in ranks:  # each rank resumes its own RNG stream from rank 0's checkpoint
        assert res["rng_resumed"] == res["rng_expected"]
    assert ranks[0]["rng_expected"] != ranks[1]["rng_expected"]
    assert proc.stdout.count("printed once by rank") == 1
    assert all(res["nan_stopped"] and res["nan_no_grad"] for res in ranks)  # rank 1's NaN
    # rank 0's BN batch mean is 1 + 1.5 = 2.5; momentum 0.1 from 0 gives 0.25 on every rank
    assert all(res["bn_mean"] == [0.25, 0.25] and res["bn_weight_kept"] for res in ranks)
    for r in range(2):  # the process group's threads are gone once cleanup() returns
        t = json.load(open(tmp_path / f"threads{r}.json"))
        assert t["after_cleanup"] == t["before_init"], t


WAIT = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
from common import dist
dist.init("cpu")
print("group", dist.is_dist(), dist.world(), flush=True)
if dist.world() == 2 and dist.rank() == 1:
    time.sleep(8)  # the slow rank: rank 0 must give up after DIST_TIMEOUT_MIN
t0 = time.time()
try:
    dist.all_reduce(__import__("torch").ones(1))
    print("reduced", round(time.time() - t0, 1), flush=True)
except Exception as e:
    print("timed out", round(time.time() - t0, 1), type(e).__name__, flush=True)
    os._exit(0)
"""


def test_forced_group_of_one_and_the_collective_timeout(tmp_path):
    """FORCE_PROCESS_GROUP=1 makes torchrun's world of one a real group; DIST_TIMEOUT_MIN
    bounds how long a collective waits for a slow rank (0.05 min = 3 s here)."""
    script = tmp_path / "wait.py"
    script.write_text(WAIT)
    base = [sys.executable, "-m", "torch.distributed.run", "--rdzv_backend=c10d",
            "--rdzv_endpoint=localhost:0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FORCE_PROCESS_GROUP": "1"}
    one = subprocess.run(base + ["--nproc_per_node=1", str(script), ROOT], env=env,
                         capture_output=True, text=True, timeout=120)
    assert "group True 1" in one.stdout and "reduced" in one.stdout, one.stderr[-2000:]
    env.pop("FORCE_PROCESS_GROUP")
    alone = subprocess.run(base + ["--nproc_per_node=1", str(script), ROOT], env=env,
                           capture_output=True, text=True, timeout=120)
    assert "group False 1" in alone.stdout, alone.stderr[-2000:]
    two = subprocess.run(base + ["--nproc_per_node=2", str(script), ROOT],
                         env={**env, "DIST_TIMEOUT_MIN": "0.05"}, capture_output=True,
                         text=True, timeout=120)
    waited = [float(line.split()[2]) for line in two.stdout.splitlines()
              if line.startswith("timed out")]
    assert waited and 2 < waited[0] < 7.5, two.stdout + two.stderr[-2000:]
