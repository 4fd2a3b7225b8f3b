"""Run under `torchrun --nproc_per_node=2`: exercises common.dist and writes what each rank saw
to `<out_dir>/rank<r>.json` for tests/test_common_dist.py to compare."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from common import checkpoint, dist, optim  # noqa: E402


def threads() -> int:
    """Threads of this process, C++ ones included (Linux)."""
    return len(os.listdir("/proc/self/task"))


def main(out_dir: str) -> None:
    threads_before = threads()
    dev = dist.init("cpu")
    r, w = dist.rank(), dist.world()
    seed = dist.seed_all(7)
    draw = torch.rand(3).tolist()

    summed = dist.all_reduce(torch.tensor([float(r + 1)]), op="sum").item()
    mean = dist.all_reduce(torch.tensor([float(r + 1)]), op="mean").item()
    gathered = dist.all_gather(torch.full((2,), float(r))).tolist()

    # Each rank's loss uses every rank's slice, weighted by (rank + 1); the gradient reaching
    # rank r's slice is the sum over ranks: sum_k (k + 1) * weights[slice r].
    x = torch.tensor([r + 1.0, 10.0 * (r + 1)], requires_grad=True)
    weights = torch.arange(1.0, 2 * w + 1)
    g = dist.all_gather_grad(x)
    ((r + 1) * (g * weights).sum()).backward()

    # RNG state saved under torchrun keeps every rank's own stream, through a real file.
    ckpt = os.path.join(out_dir, "rng.pt")
    state = checkpoint.rng_state()
    checkpoint.save(ckpt, {"rng": state})
    expected = torch.rand(2).tolist()
    dist.barrier()
    torch.manual_seed(1234)
    checkpoint.set_rng_state(checkpoint.load(ckpt)["rng"])
    resumed = torch.rand(2).tolist()

    # A NaN loss on rank 1 only stops both ranks before backward (no gradient anywhere).
    lin = torch.nn.Linear(2, 1)
    sgd = torch.optim.SGD(lin.parameters(), lr=0.1)
    loss = lin(torch.ones(1, 2)).sum() * (float("nan") if r == 1 else 1.0)
    try:
        optim.Amp("none", dev).step(loss, sgd)
        stopped = False
    except optim.NonFiniteLoss:
        stopped = True
    no_grad = lin.weight.grad is None

    # BN statistics that differ per rank become rank 0's everywhere; weights are untouched.
    bn = torch.nn.BatchNorm1d(2)
    bn(torch.full((4, 2), float(r + 1)) + torch.arange(4.0)[:, None])  # running_mean differs
    weight = bn.weight.detach().clone()
    dist.broadcast_buffers(bn)
    bn_mean = bn.running_mean.tolist()
    bn_weight_kept = torch.equal(weight, bn.weight)

    dist.barrier()
    with open(os.path.join(out_dir, f"rank{r}.json"), "w") as fh:
        json.dump({"rank": r, "world": w, "device": str(dev), "seed": seed, "draw": draw,
                   "sum": summed, "mean": mean, "gathered": gathered,
                   "gathered_grad_value": g.detach().tolist(), "grad": x.grad.tolist(),
                   "is_main": dist.is_main(), "rng_expected": expected,
                   "rng_resumed": resumed, "nan_stopped": stopped, "nan_no_grad": no_grad,
                   "bn_mean": bn_mean, "bn_weight_kept": bn_weight_kept}, fh)
    dist.print0(f"printed once by rank {r}")
    # An optimiser was built above (it imports torch._dynamo): cleanup must still join gloo's
    # worker threads, or they can abort the process at exit after everything finished.
    dist.cleanup()
    with open(os.path.join(out_dir, f"threads{r}.json"), "w") as fh:
        json.dump({"before_init": threads_before, "after_cleanup": threads()}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
