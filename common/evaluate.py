"""Shared evaluation on frozen features: extraction (DDP-aware), weighted kNN, a quick linear
probe and retrieval recall. Accuracies and recalls are returned in percent. They run their
fp32 matrix products in full fp32 (`full_fp32`), as the official evaluations do under
PyTorch's defaults, even where training enabled TF32."""
import contextlib
import math
from contextlib import nullcontext
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from common import dist


@contextlib.contextmanager
def full_fp32():
    """Within (or as a decorator): fp32 matrix products without TF32, PyTorch's default,
    which `common.dist.init` turns on for training on CUDA; the flag is restored on exit."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@full_fp32()
@torch.no_grad()
def extract_features(fn: Callable[[Tensor], Tensor], loader: Iterable, device: torch.device | str,
                     amp=None) -> tuple[Tensor, Tensor]:
    """Run `fn(x) -> (B, D)` over `loader` under no_grad (and `amp.autocast()` if given).

    Batches are `(x, y)` or `(x, y, index)`. Putting the model in eval mode is the caller's job.
    Under DDP each rank extracts its share (its loader's sampler) and batches MUST carry the
    dataset index as third element: the shares are gathered, padding duplicates dropped, and
    every rank gets all features in dataset (index) order; a rank's share may be empty.
    Batches that are None (every sample unreadable, `data.SafeDataset(replace=False)`) are
    skipped. Returns float32 feats (N, D) and long labels (N,), on `device` (on a GPU the kNN
    and the probe then run there).
    """
    feats, labels, idxs = [], [], []
    for batch in loader:
        if batch is None:  # every sample of the batch was unreadable (SafeDataset, evaluation)
            continue
        with amp.autocast() if amp is not None else nullcontext():
            feats.append(fn(batch[0].to(device, non_blocking=True)).float())
        labels.append(torch.as_tensor(batch[1]).long().to(device))
        if len(batch) > 2:
            idxs.append(torch.as_tensor(batch[2]).long().to(device))
    if not dist.is_dist():
        return torch.cat(feats), torch.cat(labels)
    if len(idxs) != len(feats):
        raise ValueError("extract_features under DDP needs batches (x, y, index): "
                         "the dataset must return each sample's index")
    # Shares may differ in length, and be empty where the world is larger than the split:
    # pad each to the longest (and to the common feature size), gather, cut the padding off.
    dim = dist.all_gather(torch.tensor([feats[0].shape[1] if feats else 0], device=device))
    empty = torch.zeros(0, device=device, dtype=torch.long)
    f = torch.cat(feats) if feats else torch.zeros(0, int(dim.max()), device=device)
    y, idx = (torch.cat(labels), torch.cat(idxs)) if feats else (empty, empty)
    counts = dist.all_gather(torch.tensor([len(idx)], device=device)).tolist()
    m = max(counts)

    def gather(t: Tensor) -> Tensor:
        padded = torch.cat([t, t.new_zeros((m - len(t),) + t.shape[1:])])
        parts = dist.all_gather(padded).split(m)
        return torch.cat([part[:c] for part, c in zip(parts, counts)])

    f, y, idx = gather(f), gather(y), gather(idx)
    order = torch.argsort(idx, stable=True)
    sorted_idx = idx[order]
    first = torch.ones(len(idx), dtype=torch.bool, device=idx.device)
    first[1:] = sorted_idx[1:] != sorted_idx[:-1]  # keep one copy of each index
    keep = order[first]
    return f[keep], y[keep]


def _my_queries(n: int, share: bool) -> range:
    """This rank's contiguous slice of n queries (all of them alone or without `share`)."""
    if not (share and dist.is_dist()):
        return range(n)
    per = math.ceil(n / dist.world())
    return range(min(n, dist.rank() * per), min(n, (dist.rank() + 1) * per))


def _summed(counts: Tensor, share: bool) -> list:
    """Per-rank counts summed over the ranks (when the queries were shared), as floats: the
    evaluation's one host sync."""
    if share and dist.is_dist():
        dist.all_reduce(counts, "sum")
    return counts.tolist()


@full_fp32()
@torch.no_grad()
def knn_classify(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor,
                 num_classes: int, k: Iterable[int] = (20, 200), T: float = 0.07,
                 chunk: int = 1024, share: bool = True) -> dict[str, float]:
    """Weighted kNN (InstDisc/DINO): cosine similarity on L2-normalised features, the top-k
    neighbours vote with weight exp(sim/T) for their class; top-1 accuracy per k (k clipped to
    the bank size). Runs on the bank's device, `chunk` queries at a time; with `share` under
    DDP each rank takes a slice of the queries and the counts are summed (every rank holds the
    whole bank, as `extract_features` returns it), so the work is done once."""
    k = tuple(k)
    bank = F.normalize(train_f.float(), dim=1)
    test_f = F.normalize(test_f.float().to(bank.device), dim=1)
    train_y, test_y = train_y.to(bank.device), test_y.to(bank.device)
    kmax = min(max(k), len(bank))
    correct = torch.zeros(len(k), device=bank.device)
    mine = _my_queries(len(test_f), share)
    for s in range(mine.start, mine.stop, chunk):
        e = min(s + chunk, mine.stop)
        sim, nbr = (test_f[s:e] @ bank.T).topk(kmax, dim=1)  # (q, kmax), descending
        w = ((sim - sim[:, :1]) / T).exp()  # exp(sim/T) up to a per-query factor (no overflow)
        nbr_y = train_y[nbr]
        for i, kk in enumerate(k):
            kc = min(kk, kmax)
            votes = torch.zeros(len(sim), num_classes, device=bank.device)
            votes.scatter_add_(1, nbr_y[:, :kc], w[:, :kc])
            correct[i] += (votes.argmax(1) == test_y[s:e]).sum()
    counts = _summed(correct, share)
    return {f"knn_top1@{kk}": 100.0 * c / len(test_f) for kk, c in zip(k, counts)}


@full_fp32()
def linear_probe(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, num_classes: int,
                 epochs: int = 100, lr: float = 0.1, batch_size: int = 256, wd: float = 0.0,
                 normalize: bool = True, seed: int = 0) -> dict[str, float]:
    """Quick linear probe on frozen features (demos, monitoring; not a paper protocol).

    Features standardised with the train mean/std (if `normalize`), a Linear layer (weights
    N(0, 0.01^2), bias 0) trained with SGD momentum 0.9, per-step cosine lr, cross-entropy.
    Deterministic given `seed`. Returns test top-1.
    """
    dev = train_f.device
    train_f, test_f = train_f.float(), test_f.float().to(dev)
    train_y, test_y = train_y.long().to(dev), test_y.long().to(dev)
    if normalize:
        mean, std = train_f.mean(0), train_f.std(0, correction=0) + 1e-6
        train_f, test_f = (train_f - mean) / std, (test_f - mean) / std
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the default init must not draw from the global
        head = torch.nn.Linear(train_f.shape[1], num_classes).to(dev)  # RNG of a training run
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    n = len(train_f)
    steps, step = epochs * math.ceil(n / batch_size), 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(dev)
        for s in range(0, n, batch_size):
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            b = perm[s:s + batch_size]
            loss = F.cross_entropy(head(train_f[b]), train_y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        acc = (head(test_f).argmax(1) == test_y).float().mean().item()
    return {"linear_top1": 100.0 * acc}


@full_fp32()
@torch.no_grad()
def retrieval_recall(query_f: Tensor, query_y: Tensor, bank_f: Tensor, bank_y: Tensor,
                     ks: Iterable[int] = (1, 5, 10, 20), center: bool = True,
                     chunk: int = 1024, share: bool = True) -> dict[str, float]:
    """R@k (percent): fraction of queries whose k most cosine-similar bank items include one of
    the same label. With `center`, each set is first centred with its own mean (SCE protocol).
    Queries are shared between ranks as in `knn_classify`."""
    ks = tuple(ks)
    q, b = query_f.float(), bank_f.float().to(query_f.device)
    if center:
        q, b = q - q.mean(0), b - b.mean(0)
    q, b = F.normalize(q, dim=1), F.normalize(b, dim=1)
    query_y, bank_y = query_y.to(q.device), bank_y.to(q.device)
    kmax = min(max(ks), len(b))
    hits = torch.zeros(len(ks), device=q.device)
    mine = _my_queries(len(q), share)
    for s in range(mine.start, mine.stop, chunk):
        e = min(s + chunk, mine.stop)
        top = (q[s:e] @ b.T).topk(kmax, dim=1).indices
        match = bank_y[top] == query_y[s:e, None]  # (q, kmax)
        for i, k in enumerate(ks):
            hits[i] += match[:, :k].any(1).sum()
    counts = _summed(hits, share)
    return {f"R@{k}": 100.0 * c / len(q) for k, c in zip(ks, counts)}


def verdict(metric: str, random_init: Sequence[float], trained: Sequence[float],
            n_eval: int | None = None, trained_spread: float | None = None,
            decimals: int = 1) -> dict:
    """The demo's verdict on one downstream metric, by the rule of DESIGN §3: pretrained
    against randomly initialised, one value per training seed / initialisation.

    - Accuracies in percent (`n_eval`, the number of evaluated samples, given): "helps" when
      mean(trained) - mean(random_init) > 3 standard errors of the difference,
      SE^2 = se_r^2 + se_t^2, where a group's se is the larger of the binomial SE of its mean
      accuracy (p (1 - p) / (n_eval k), k values) and its spread / sqrt(k).
    - Other scores (J&F, a-mAP, mIoU; `n_eval` None): "helps" when the difference exceeds
      twice the larger spread.
    A group's spread is the sample std of its values (k >= 2); a single trained run takes
    `trained_spread` (the std of >= 3 seeds measured beforehand, e.g. the README's table) and,
    without it, cannot show anything. Returns {"metric", "random_init", "trained" (the lists),
    "spread": [random, trained], "se" (accuracies), "rule", "helps", "line"}, "line" saying
    it in plain words. Raises ValueError on an empty group."""
    if not random_init or not trained:
        raise ValueError(f"verdict: {metric} needs at least one value per group")
    r, t = torch.tensor(random_init, dtype=torch.float64), torch.tensor(trained,
                                                                         dtype=torch.float64)
    spread = [float(x.std()) if len(x) > 1 else None for x in (r, t)]
    if spread[1] is None:
        spread[1] = trained_spread
    diff = float(t.mean() - r.mean())
    out = {"metric": metric, "random_init": r.tolist(), "trained": t.tolist(), "spread": spread}
    if missing := [w for w, sp in zip(("random inits", "trained seeds (or their measured spread)"),
                                      spread) if sp is None]:
        rule, helps, noise = "needs >= 2 " + " and >= 2 ".join(missing), False, None
    elif n_eval:
        def se(x: Tensor, s: float) -> float:
            p = float(x.mean()) / 100
            return max(100 * math.sqrt(p * (1 - p) / (n_eval * len(x))), s / math.sqrt(len(x)))
        noise = 3 * math.hypot(se(r, spread[0]), se(t, spread[1]))
        out["se"] = noise / 3
        rule, helps = f"trained - random > 3 SE = {noise:.{decimals}f}", diff > noise
    else:
        noise = 2 * max(spread)
        rule, helps = f"trained - random > 2 x larger spread = {noise:.{decimals}f}", diff > noise

    def said(x: Tensor, s) -> str:
        return f"{float(x.mean()):.{decimals}f}" + (f" +- {s:.{decimals}f}" if s is not None
                                                     else "")
    out.update(rule=rule, helps=bool(helps), line=(
        f"pretraining {'helps' if helps else 'does not help clearly'}: {metric} "
        f"{said(r, spread[0])} (random init, {len(r)}) -> {said(t, spread[1])} (trained, "
        f"{len(t)}); {rule}" + ("" if noise is None else f", difference {diff:.{decimals}f}")))
    return out
