import datetime
import math

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from common import evaluate


def blobs(n_per_class, num_classes, dim, spread, seed):
    """Gaussian blobs around fixed random centres (centres depend on dim only)."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[y] + spread * torch.randn(len(y), dim, generator=g), y


# ---- kNN ----

def test_knn_clustered_features_are_perfect_and_k_is_clipped():
    train_f, train_y = blobs(20, 3, 16, 0.3, seed=0)
    test_f, test_y = blobs(10, 3, 16, 0.3, seed=1)
    # k=200 > bank of 60: clipped, so it votes with the whole bank (weighted by similarity)
    assert evaluate.knn_classify(train_f, train_y, test_f, test_y, 3) == {
        "knn_top1@20": 100.0, "knn_top1@200": 100.0}


def test_knn_weighted_vote_differs_from_majority():
    # one class-1 neighbour at cos 1, two class-0 neighbours at cos 0.5
    s = math.sqrt(3) / 2
    bank = torch.tensor([[1.0, 0.0], [0.5, s], [0.5, -s]])
    bank_y = torch.tensor([1, 0, 0])
    q, q_y = torch.tensor([[2.0, 0.0]]), torch.tensor([1])
    # T=0.07: exp(1/.07) = 1.6e6 > 2 exp(.5/.07) = 2.5e3 -> class 1
    assert evaluate.knn_classify(bank, bank_y, q, q_y, 2, k=(3,))["knn_top1@3"] == 100.0
    # T large: weights ~ equal, the majority (class 0) wins
    assert evaluate.knn_classify(bank, bank_y, q, q_y, 2, k=(3,), T=100.0)["knn_top1@3"] == 0.0
    # k=1 only sees the class-1 neighbour whatever T
    assert evaluate.knn_classify(bank, bank_y, q, q_y, 2, k=(1,), T=100.0)["knn_top1@1"] == 100.0


def test_knn_chunking_does_not_change_results():
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(50, 8, generator=g), torch.randn(37, 8, generator=g)
    train_y = torch.randint(0, 4, (50,), generator=g)
    test_y = torch.randint(0, 4, (37,), generator=g)
    args = (train_f, train_y, test_f, test_y, 4, (1, 5, 20))
    full = evaluate.knn_classify(*args, chunk=1024)
    for chunk in (1, 7):
        assert evaluate.knn_classify(*args, chunk=chunk) == full
    assert 0 < full["knn_top1@5"] < 100  # random labels: neither perfect nor empty


# ---- linear probe ----

def test_linear_probe_separable_blobs():
    train_f, train_y = blobs(100, 4, 32, 1.0, seed=0)
    test_f, test_y = blobs(50, 4, 32, 1.0, seed=1)
    res = evaluate.linear_probe(train_f, train_y, test_f, test_y, 4, epochs=30)
    assert res["linear_top1"] > 95.0
    assert evaluate.linear_probe(train_f, train_y, test_f, test_y, 4, epochs=30) == res  # seeded


def test_linear_probe_random_labels_is_near_chance():
    g = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(400, 32, generator=g), torch.randn(400, 32, generator=g)
    train_y = torch.randint(0, 4, (400,), generator=g)
    test_y = torch.randint(0, 4, (400,), generator=g)
    acc = evaluate.linear_probe(train_f, train_y, test_f, test_y, 4, epochs=30)["linear_top1"]
    assert 15.0 < acc < 35.0  # chance is 25 %, std ~2.2 % over 400 test points


# ---- retrieval ----

def test_retrieval_recall_hand_case():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    bank_y = torch.tensor([0, 1, 2, 1])
    # query 0 (label 1): ranks b0 (0), b3 (1) -> first hit at rank 2
    # query 1 (label 2): ranks b1 (1), b3 (1), b2 (2) -> first hit at rank 3
    q = torch.tensor([[1.0, 0.1], [-0.2, 1.0]])
    q_y = torch.tensor([1, 2])
    res = evaluate.retrieval_recall(q, q_y, bank, bank_y, ks=(1, 2, 3, 10), center=False)
    assert res == {"R@1": 0.0, "R@2": 50.0, "R@3": 100.0, "R@10": 100.0}


def test_retrieval_centering_removes_per_set_offsets():
    g = torch.Generator().manual_seed(0)
    q, b = torch.randn(30, 6, generator=g), torch.randn(40, 6, generator=g)
    q_y, b_y = torch.randint(0, 5, (30,), generator=g), torch.randint(0, 5, (40,), generator=g)
    base = evaluate.retrieval_recall(q, q_y, b, b_y)
    shift = 10 * torch.randn(6, generator=g)
    assert evaluate.retrieval_recall(q + shift, q_y, b - 3 * shift, b_y) == base
    assert evaluate.retrieval_recall(q, q_y, b, b_y, chunk=4) == base
    # a query identical to a bank item (after centring) retrieves it first
    assert evaluate.retrieval_recall(b, b_y, b, b_y, ks=(1,)) == {"R@1": 100.0}


# ---- feature extraction ----

def dataset(n=7, dim=5):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, dim, generator=g), torch.arange(n) % 3, torch.arange(n))


def linear_fn():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 4)


class BF16Amp:
    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16)


def test_extract_features_single_process_and_amp():
    ds = dataset()
    fn = linear_fn()
    feats, labels = evaluate.extract_features(fn, DataLoader(ds, batch_size=3), "cpu")
    with torch.no_grad():
        torch.testing.assert_close(feats, fn(ds.tensors[0]))
    assert torch.equal(labels, ds.tensors[1]) and labels.dtype == torch.long

    def probe(x):  # records the context it runs in
        flags = [torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")]
        return torch.tensor([flags], dtype=torch.bfloat16).expand(len(x), 2)

    feats, _ = evaluate.extract_features(probe, DataLoader(ds, batch_size=3), "cpu", amp=BF16Amp())
    assert feats.dtype == torch.float32 and torch.equal(feats, torch.tensor([[0.0, 1.0]] * 7))


def _ddp_worker(r, init_file, out_dir):
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=2,
                             timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    ds = dataset()
    sampler = DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=0)  # pads 7 -> 8
    loader = DataLoader(ds, batch_size=3, sampler=sampler)
    feats, labels = evaluate.extract_features(linear_fn(), loader, "cpu")
    uneven = [0, 1, 2, 3] if r == 0 else [4, 5, 6]  # shares of different lengths
    loader = DataLoader(ds, batch_size=2, sampler=uneven)
    feats2, _ = evaluate.extract_features(linear_fn(), loader, "cpu")
    try:  # without the index in the batch, DDP extraction must refuse
        evaluate.extract_features(linear_fn(), DataLoader(TensorDataset(*ds.tensors[:2])), "cpu")
        error = ""
    except ValueError as e:
        error = str(e)
    torch.save({"feats": feats, "labels": labels, "share": list(sampler), "feats_uneven": feats2,
                "error": error}, f"{out_dir}/rank{r}.pt")
    tdist.destroy_process_group()


def test_extract_features_ddp_matches_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ds = dataset()
    with torch.no_grad():
        expected = linear_fn()(ds.tensors[0])
    shares = []
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        torch.testing.assert_close(res["feats"], expected)
        torch.testing.assert_close(res["feats_uneven"], expected)
        assert "index" in res["error"]
        assert torch.equal(res["labels"], ds.tensors[1])
        shares += res["share"]
    assert len(shares) == 8 and len(set(shares)) == 7  # the sampler really padded a duplicate


def test_evaluations_run_without_tf32_and_restore_the_flag():
    """Training may turn TF32 on (common.dist.init on CUDA); the evaluations switch it off for
    their own matrix products and leave the flag as they found it."""
    seen = []
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        def fn(x):
            seen.append(torch.backends.cuda.matmul.allow_tf32)
            return x.flatten(1)
        evaluate.extract_features(fn, [(torch.zeros(2, 3), torch.zeros(2))], "cpu")
        with evaluate.full_fp32():
            seen.append(torch.backends.cuda.matmul.allow_tf32)
        assert seen == [False, False] and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# ---- the demos' verdict ----
def test_verdict_accuracies_use_three_standard_errors_of_the_difference():
    v = evaluate.verdict("linear top-1", [80.0, 82.0, 78.0], [90.0], n_eval=800,
                         trained_spread=1.0)
    # random: max(binomial 100 sqrt(.16 / 2400) = 0.816, std 2 / sqrt 3 = 1.155) = 1.155;
    # trained: max(100 sqrt(.09 / 800) = 1.061, 1.0) = 1.061; SE = hypot = 1.568
    assert v["se"] == pytest.approx(math.hypot(2 / math.sqrt(3), 100 * math.sqrt(0.09 / 800)))
    assert v["helps"] and v["spread"] == [pytest.approx(2.0), 1.0]
    assert v["line"].startswith("pretraining helps: linear top-1 80.0 +- 2.0 (random init, 3) "
                                "-> 90.0 +- 1.0 (trained, 1); trained - random > 3 SE = 4.7")
    close = evaluate.verdict("kNN", [80.0, 82.0, 78.0], [84.0], n_eval=800, trained_spread=1.0)
    assert not close["helps"] and "does not help clearly" in close["line"]  # 4.0 < 4.70


def test_verdict_scores_use_twice_the_larger_spread_and_need_spreads():
    v = evaluate.verdict("J&F", [0.50, 0.52, 0.51], [0.53, 0.55, 0.54], decimals=3)
    assert v["helps"] and "2 x larger spread = 0.020" in v["rule"]  # 0.03 > 0.02
    v = evaluate.verdict("J&F", [0.50, 0.52, 0.51], [0.515, 0.525, 0.535], decimals=3)
    assert not v["helps"]  # 0.015 is not above 0.02
    lone = evaluate.verdict("J&F", [0.50, 0.52, 0.51], [0.90])  # one run, no spread given
    assert not lone["helps"] and lone["rule"].startswith("needs") and "se" not in lone
    with pytest.raises(ValueError, match="at least one value"):
        evaluate.verdict("J&F", [], [0.5])
