import json
import os
import time

import numpy as np
import pytest
import torch

from common import log


def test_logger_writes_console_and_jsonl(tmp_path, capsys):
    lg = log.Logger(str(tmp_path / "run"))
    rec = lg.log(10, {"train/loss": torch.tensor(1.5), "train/lr": 3e-4, "epoch": 1})
    lg.log(20, {"train/loss": 0.25})
    assert rec == {"step": 10, "train/loss": 1.5, "train/lr": 3e-4, "epoch": 1}
    assert log.read_jsonl(str(tmp_path / "run" / "log.jsonl")) == [
        rec, {"step": 20, "train/loss": 0.25}]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "step 10 | train/loss 1.5 | train/lr 0.0003 | epoch 1"


def test_throughput_measures_time():
    meter = log.Throughput()
    for _ in range(3):
        time.sleep(0.02)
        meter.update(8)
    r = meter.rates()
    assert 20 <= r["ms_per_step"] < 200
    assert abs(r["samples_per_s"] - 8 * 1000 / r["ms_per_step"]) < 1e-6 * r["samples_per_s"]


def test_bench_counts_steps_and_times_the_loader(capsys):
    calls = []

    def step():
        calls.append(1)
        time.sleep(0.01)

    loader = [(torch.zeros(4, 3), torch.zeros(4))] * 30
    out = log.bench(step, batch_size=4, device=torch.device("cpu"), steps=6, warmup=2,
                    loader=loader, loader_batches=5, note="x")
    assert len(calls) == 9  # 2 warm-up, 1 counted for FLOPs, 6 timed
    assert out["gflop_per_sample"] == 0 and "mfu" not in out  # no tensor work, no GPU
    assert out["ms_per_step"] >= 10 and out["samples_per_s"] <= 4 / 0.01
    assert out["data_samples_per_s"] > 0 and out["note"] == "x" and out["peak_mem_mb"] > 10
    assert out["data_samples_per_s_per_worker"] == out["data_samples_per_s"]  # in-process
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["bench"] == "train_step" and printed["batch_per_process"] == 4


def test_loader_rates_per_worker_and_per_core_arithmetic():
    r = log.per_core(samples=120, wall_s=2.0, cpu_s=4.0, workers=3)
    assert r["data_samples_per_s"] == 60 and r["data_samples_per_s_per_worker"] == 20
    assert r["data_samples_per_s_per_core"] == 30 and r["data_cores_busy"] == 2
    r = log.per_core(samples=10, wall_s=0.5, cpu_s=None, workers=0)  # in-process loader
    assert r["data_samples_per_s_per_worker"] == 20 and r["data_samples_per_s_per_core"] is None


class _Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        return torch.full((8,), float(i)) ** 2


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="per-core CPU time needs /proc")
def test_loader_rates_reads_the_workers_cpu_time():
    """With 2 workers: the workers' CPU seconds are read (per core is a number), and the rate
    per worker is the loader's rate halved."""
    loader = torch.utils.data.DataLoader(_Squares(), batch_size=4, num_workers=2)
    r = log.loader_rates(loader, 4, batches=6)
    assert r["data_workers"] == 2 and r["data_samples_per_s"] > 0
    assert r["data_samples_per_s_per_worker"] == r["data_samples_per_s"] / 2
    assert r["data_samples_per_s_per_core"] is not None and r["data_samples_per_s_per_core"] > 0
    assert log.process_cpu_seconds(os.getpid()) > 0


def test_bench_counts_the_flops_of_a_training_step(capsys):
    """Linear 64 -> 32 on a batch of 8, forward and backward: forward 2*8*64*32, backward
    the same twice (input and weight gradients), so 6 * 8 * 64 * 32 FLOPs a step."""
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)

    def step():
        lin(x).sum().backward()

    assert log.count_flops(step) == 6 * 8 * 64 * 32
    out = log.bench(step, batch_size=8, device=torch.device("cpu"), steps=3, warmup=1)
    assert out["gflop_per_sample"] == pytest.approx(6 * 64 * 32 / 1e9)
    assert out["tflop_per_s"] == pytest.approx(6 * 8 * 64 * 32 / out["ms_per_step"] / 1e9)
    assert log.peak_tflops(torch.device("cpu"), torch.bfloat16) is None
    cuda = torch.device("cuda", 0)  # the table, by the names CUDA reports (no GPU needed)
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                       ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("Tesla V100-SXM2-16GB", None)):
        assert log.peak_tflops(cuda, torch.bfloat16, name) == peak, name
    assert log.peak_tflops(cuda, None, "NVIDIA H200") == 989.4 / 2  # fp32 runs as TF32


def test_progress_is_a_plain_iterator():
    assert list(log.progress(range(5), total=5)) == [0, 1, 2, 3, 4]


def test_save_grid_writes_a_titled_labelled_picture(tmp_path):
    """Two rows of three 8x8 images, scaled 2x: the canvas holds the grid below a title and
    a column-label line, right of the row labels; the grid's pixels are the images'."""
    from PIL import Image
    rows = [torch.zeros(3, 3, 8, 8), torch.ones(3, 3, 8, 8)]
    path = tmp_path / "pic" / "grid.png"
    log.save_grid(rows, str(path), "a title", ["black row", "white row"], ["a", "b", "c"],
                  scale=2)
    img = np.asarray(Image.open(path).convert("L")).astype(int)
    gw, gh = 3 * 16 + 4 * 2, 2 * 16 + 3 * 2  # make_grid: padding 2 around every image
    assert img.shape[1] > gw and img.shape[0] > gh
    grid = img[-gh:, -gw:]
    assert (grid[2:18, 2:18] == 0).all() and (grid[20:36, 2:18] == 255).all()
    labels = img[:, :-gw]
    assert (labels < 128).any()  # the row labels are drawn
    assert (img[:img.shape[0] - gh] < 128).any()  # the title / column labels are drawn
    with pytest.raises(ValueError, match="2 rows but 1 row labels"):
        log.save_grid(rows, str(path), "t", ["one"])
