"""The GPU acceptance suite: `python -m pytest -q -m gpu` on a CUDA machine.

Without CUDA every test here is reported skipped ("no CUDA device"). On a GPU it checks what
the CPU suite cannot:
- every method's real script for a few steps on CUDA in bf16 under `torchrun` with an nccl
  group: two processes where two GPUs are visible (DDP, SyncBatchNorm and the collectives
  then synchronise for real), else one with the group forced (`FORCE_PROCESS_GROUP=1`:
  DDP and the collectives run; SyncBatchNorm computes plain BN statistics in a world of one);
  fused AdamW and channels_last as in training; its checkpoint then resumes for one step on
  a process that sees no GPU (`CUDA_VISIBLE_DEVICES=""`), and back on CUDA in fp16 (a fresh
  scaler);
- `--compile` for one method: graphs are compiled, and the losses follow eager's;
- a checkpoint written on CUDA loads on the CPU and back, optimiser state included;
- `--bench` of every method at its paper preset's shapes (the tests named `bench`), printed
  as one table (samples/s, ms/step, GFLOP per sample, TFLOP/s, MFU, peak memory).
The per-method tests marked `gpu` in `tests/test_<method>.py` compare one CUDA training step in
fp32, bf16 and fp16 with the fp32 CPU step on the same weights and batch. Time on one H100:
not measured yet; `-m gpu -k "not bench"` leaves out the benches, the longest part.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from common import checkpoint, cli, log, optim, vit

pytestmark = pytest.mark.gpu
DEVICE = "cuda"  # (a dry run of the commands on a CPU sets this to "cpu" by hand)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPROC = 2 if torch.cuda.device_count() >= 2 else 1

# A few steps of each method's demo (its embedded synthetic data, written on first use), with
# the evaluation cut to what still runs every evaluation code path once.
TINY = {
    "sce_image": ["--lin-epochs", "1", "--no-eval-random-init", "--batch-size", "32",
                  "--sync-bn"],
    "sce_video": ["--no-eval-random-init", "--no-monitor-eval", "--batch-size", "8", "--sync-bn"],
    "sigma": ["--no-eval-random-init", "--batch-size", "8"],
    "tcore": ["--no-eval-random-init", "--batch-size", "8"],
    "cropmae": ["--no-eval-random-init", "--batch-size", "16"],
    "comedian": ["--no-eval-random-init"],
}
# The loops resumed on the CPU and back: COMEDIAN's stages each start from the previous
# stage's file (a later stage refuses an earlier one that has moved on), so only stage 1 is.
RESUMED = {"comedian": (["spatial"], ["--stage", "spatial"])}
# `--bench` at the paper's shapes: the main setting (the defaults, "") and the other model
# sizes; the batch is one GPU's share of the official batch.
PAPER = [("sce_image", ""), ("sce_image", "imagenet-multicrop"), ("sce_video", ""),
         ("sce_video", "k400-r3d50-16x224"), ("sigma", ""), ("sigma", "k400-vitb-dino"),
         ("tcore", ""), ("cropmae", ""), ("cropmae", "in1k-vitb"), ("comedian", ""),
         ("comedian", "vivit-s")]
BENCH_ROWS = []


def torchrun(script: str, argv: list, timeout: float = 600, nproc: int = NPROC,
             **env) -> subprocess.CompletedProcess:
    """`torchrun` with `nproc` processes and a process group even for one (nccl on CUDA)."""
    env = {**os.environ, "FORCE_PROCESS_GROUP": "1", "CI": "true", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", os.path.join(ROOT, script), *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def train_steps(out_dir) -> dict:
    """{loop: [(step, loss), ...]} of every training loop in the run's log.jsonl: records with
    a `<loop>/loss` and a `<loop>/lr` ("train"; COMEDIAN's "spatial", "distill", "head",
    "finetune")."""
    loops = {}
    for r in log.read_jsonl(os.path.join(out_dir, "log.jsonl")):
        for key in r:
            loop = key[:-len("/loss")] if key.endswith("/loss") else None
            if loop and f"{loop}/lr" in r:
                loops.setdefault(loop, []).append((r["step"], r[key]))
    return loops


@pytest.mark.parametrize("method", list(TINY))
def test_a_run_on_one_gpu_under_nccl_resumes_on_the_cpu_and_back(method, tmp_path):
    out = str(tmp_path / "run")
    common = [*TINY[method], "--output-dir", out, "--log-every", "1", "--ckpt-every", "1"]
    first = torchrun(f"{method}.py", [*common, "--device", DEVICE, "--amp", "bf16",
                                      "--max-steps", "3"])
    assert first.returncode == 0, first.stderr[-4000:]
    loops = train_steps(out)
    assert loops and all(steps[-1][0] == 3 for steps in loops.values()), loops
    assert all(torch.isfinite(torch.tensor(loss)) for s in loops.values() for _, loss in s)
    replicas = [r for r in log.read_jsonl(os.path.join(out, "log.jsonl"))
                if "ddp/max_replica_diff" in r]
    assert replicas and replicas[-1]["ddp/max_replica_diff"] == 0.0  # DDP ran, replicas equal
    # one more step where no GPU is visible (fp32, gloo), then one on CUDA in fp16 (the
    # checkpoints hold no loss scale)
    resumed, flags = RESUMED.get(method, (list(loops), []))
    cpu = torchrun(f"{method}.py", [*common, *flags, "--device", "cpu", "--amp", "none",
                                    "--max-steps", "4"], CUDA_VISIBLE_DEVICES="")
    assert cpu.returncode == 0, cpu.stderr[-4000:]
    back = torchrun(f"{method}.py", [*common, *flags, "--device", DEVICE, "--amp", "fp16",
                                     "--max-steps", "5"])
    assert back.returncode == 0, back.stderr[-4000:]
    loops = train_steps(out)
    assert all([step for step, _ in loops[name][-2:]] == [4, 5] for name in resumed), loops
    assert os.path.isfile(os.path.join(out, "summary.json"))


def test_compile_compiles_and_learns_as_eager(tmp_path):
    """`--compile` on CUDA (SCE image: ResNet encoders), in this process: dynamo compiles
    graphs only then, and the first 4 losses follow eager's within bf16 noise."""
    import sce_image
    from torch._dynamo.utils import counters
    losses = {}
    for mode in ("eager", "compile"):
        out = tmp_path / mode
        graphs = counters["stats"]["unique_graphs"]
        argv = [*TINY["sce_image"], "--no-sync-bn", "--output-dir", str(out), "--device",
                DEVICE, "--amp", "bf16", "--max-steps", "4", "--log-every", "1"]
        sce_image.main(cli.parse(sce_image.Args, sce_image.PRESETS,
                                 argv + (["--compile"] if mode == "compile" else [])))
        compiled = counters["stats"]["unique_graphs"] - graphs
        assert (compiled > 0) == (mode == "compile"), (mode, compiled)
        losses[mode] = [loss for _, loss in train_steps(out)["train"]]
    assert len(losses["compile"]) == len(losses["eager"]) == 4
    for a, b in zip(losses["eager"], losses["compile"]):
        assert abs(a - b) < 0.05 * abs(a), losses


def test_a_checkpoint_written_on_cuda_loads_on_the_cpu_and_back(tmp_path):
    """Model, fused AdamW state and fp16 scale: CUDA -> file -> CPU -> file -> CUDA, the
    same bits, and the optimiser state follows the parameters' device."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    amp = optim.Amp("fp16", torch.device("cuda"))
    amp.step(model(torch.randn(32, 8, device="cuda")).float().square().mean(), opt)
    checkpoint.save_training(tmp_path / "a.pt", {"model": model, "optimizer": opt}, amp, 1,
                             {"x": 1})
    cpu_model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    cpu_opt = torch.optim.AdamW(cpu_model.parameters(), lr=1e-3)
    cpu_amp = optim.Amp("fp16", torch.device("cpu"))
    checkpoint.load_training(tmp_path / "a.pt", {"model": cpu_model, "optimizer": cpu_opt},
                             cpu_amp)
    for a, b in zip(model.state_dict().values(), cpu_model.state_dict().values()):
        assert torch.equal(a.cpu(), b)
    assert all(t.device.type == "cpu" for s in cpu_opt.state.values() for t in s.values())
    assert cpu_amp.scaler.get_scale() == amp.scaler.get_scale()
    checkpoint.save_training(tmp_path / "b.pt", {"model": cpu_model, "optimizer": cpu_opt},
                             cpu_amp, 1, {"x": 1})
    model2 = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)).cuda()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3, fused=True)
    checkpoint.load_training(tmp_path / "b.pt", {"model": model2, "optimizer": opt2},
                             optim.Amp("fp16", torch.device("cuda")))
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) and b[k].device == a[k].device for k in a)


@pytest.mark.parametrize("method, preset", PAPER)
def test_bench_at_the_papers_shapes_counts_flops(method, preset, tmp_path):
    """`--bench` on this GPU: every JSON line (one per stage for COMEDIAN) has a throughput and
    a FLOP count."""
    argv = [f"{method}.py", "--bench", "--device", DEVICE, "--output-dir", str(tmp_path)]
    argv += ["--preset", preset] if preset else ["--data", ""]  # the defaults, synthetic data
    if preset.endswith("-dino"):  # a frozen ViT-B/16 teacher: random weights, DINO's keys
        teacher = vit.VisionTransformer(224, 16, 3, *vit.vit_sizes["base"], pos_embed="learned")
        torch.save(teacher.state_dict(), tmp_path / "dino_vitb16.pth")
        argv += ["--teacher-weights", str(tmp_path / "dino_vitb16.pth")]
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, f"{method} {preset}: {proc.stderr[-3000:]}"
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"bench"')]
    assert rows, proc.stdout[-2000:]
    for r in rows:
        assert r["gflop_per_sample"] > 0 and r["samples_per_s"] > 0, r
        BENCH_ROWS.append((method, preset or "default", r))


def test_bench_table(capsys):
    """The table of the benches above (run after them), for the README."""
    if not BENCH_ROWS:
        pytest.skip("no bench ran (select the bench tests too)")
    os.makedirs(os.path.join(ROOT, "runs"), exist_ok=True)
    with open(os.path.join(ROOT, "runs", "gpu_bench.jsonl"), "w") as fh:  # for the README
        for method, preset, r in BENCH_ROWS:
            fh.write(json.dumps({"method": method, "preset": preset, **r}) + "\n")
    with capsys.disabled():  # shown even though the test passes
        print(f"\n{'method':<10} {'preset':<19} {'stage':<9} {'device':<24} {'samples/s':>10}"
              f" {'ms/step':>9} {'GFLOP/sample':>13} {'TFLOP/s':>8} {'MFU':>6} {'peak MiB':>9}")
        for method, preset, r in BENCH_ROWS:
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
            print(f"{method:<10} {preset:<19} {r.get('stage', ''):<9} {r['device'][:24]:<24}"
                  f" {r['samples_per_s']:>10.1f} {r['ms_per_step']:>9.1f}"
                  f" {r['gflop_per_sample']:>13.1f} {r['tflop_per_s']:>8.1f} {mfu:>6}"
                  f" {r['peak_mem_mb']:>9.0f}")
