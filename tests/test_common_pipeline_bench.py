"""common/pipeline_bench.py: the files it writes, its keys and its per-core arithmetic (the
timings themselves are the tool's output, not tested)."""
import json
import math
import os

import pytest
import torch

import sigma

from common import pipeline_bench as pb
from common import video


def test_cores_needed_rounds_up():
    assert pb.cores_needed(200, 27.0) == 8  # 7.4 cores -> 8
    assert pb.cores_needed(200, 25.0) == 8  # exactly 8: not 9
    assert pb.cores_needed(10, 50.0) == 1  # at least one
    assert pb.cores_needed(700, 13.1) == math.ceil(700 / 13.1)
    with pytest.raises(ValueError):
        pb.cores_needed(200, 0.0)


def test_keys_visit_every_file_then_a_new_epoch():
    ks = pb.keys("sigma", n_files=4, clips=8, seconds=10)
    assert [i for _, i in ks[:4]] and sorted(i for _, i in ks[:4]) == [0, 1, 2, 3]
    assert [e for e, _ in ks] == [0] * 4 + [1] * 4  # new draws on the second pass
    ks = pb.keys("comedian", n_files=2, clips=20, seconds=10)  # items: 2 halves x 10 s
    assert sorted(i for _, i in ks) == list(range(20)) and {e for e, _ in ks} == {0}


def test_bench_files_are_k400_like_h264(tmp_path):
    files = pb.bench_files(tmp_path, files=1, seconds=0.4)
    assert set(files) == set(pb.SIZES)
    for (w, h), paths in files.items():
        meta = video.video_meta(paths[0])
        assert (meta.width, meta.height, meta.num_frames, meta.fps) == (w, h, 10, pb.FPS)
        clip = video.read_clip(paths[0], [0, 9])
        assert clip.shape == (2, h, w, 3) and clip.float().std() > 10  # texture, not flat
    again = pb.bench_files(tmp_path, files=1, seconds=0.4)  # cached: not rewritten
    assert again == files


def test_the_pipelines_yield_training_samples(tmp_path):
    """Each method's pipeline, built as the tool builds it, yields a sample for its keys."""
    paths = pb.bench_files(tmp_path, files=1, seconds=0.4)[(320, 240)]
    what, get = pb.pipeline("sigma", paths)
    clip, mask = get((0, 0))
    assert clip.shape == (3, 16, 224, 224) and mask.shape == (1568,)
    assert pb.official_note("sigma", None)  # decord and the authors' code are not dependencies
    assert pb.official_note("sigma", tmp_path)  # no checkout of their code there
    assert pb.official_note("tcore", tmp_path)  # no checkout there either
    assert pb.official_note("cropmae", tmp_path)  # not wired in


def test_model_step_trains_on_the_pipelines_samples(tmp_path):
    """The step row's step, on a batch the method's own pipeline made: it updates the weights
    (SIGMA with a ViT-tiny, a one-block decoder and a small phi in place of ViT-B, to stay
    fast; the clips are the paper's 16 x 224)."""
    paths = pb.bench_files(tmp_path, files=1, seconds=0.4)[(320, 240)]
    _, get = pb.pipeline("sigma", paths)
    small = sigma.Args(model="tiny", decoder_depth=1, proj_hidden=(64,), num_prototypes=64)
    what, step, model = pb.model_step("sigma", [get((0, 0)), get((1, 0))],
                                      torch.device("cpu"), small)
    assert what == "ViT-tiny, 2 clips" and isinstance(model, sigma.SIGMA)
    before = [p.detach().clone() for p in model.parameters()]
    out = step()
    assert torch.isfinite(out["loss"])
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert sum(changed) > len(changed) // 2  # the optimiser stepped


def test_frame_folders_hold_the_files_frames(tmp_path):
    """The JPEG frame folders (T-CoRe's layout) hold every frame of the file, in order: each
    JPEG within JPEG error of the decoded frame and closer to it than to its neighbours; the
    project's reader sees the same length and frames; a second call reuses them."""
    paths = pb.bench_files(tmp_path, files=1, seconds=0.4)[(320, 240)]
    folder, = pb.frame_folders(paths)
    assert folder.endswith(f"frames/train/{pb.FRAME_CLASS}/clip00")
    assert sorted(os.listdir(folder)) == [f"{t:05d}.jpg" for t in range(1, 11)]
    assert video.video_length(folder) == video.video_meta(paths[0]).num_frames == 10
    decoded = video.read_frames(paths[0], range(10)).float()
    jpeg = video.read_clip(folder, range(10)).float()
    err = (jpeg[:, None] - decoded[None]).abs().mean(dim=(2, 3, 4))  # (jpeg t, frame s)
    assert torch.equal(err.argmin(dim=1), torch.arange(10))  # frame t is file t + 1
    assert err.diagonal().max() < 4  # quality 90: a few levels
    mtime = os.stat(folder).st_mtime_ns
    assert pb.frame_folders(paths) == [folder] and os.stat(folder).st_mtime_ns == mtime


def test_soccernet_folders_hold_the_2fps_frames(tmp_path):
    """The 2-fps folders (eztorch's SoccerNet layout) hold the frames on screen every 0.5 s,
    named from 00000001.jpg, listed in train.json with their duration and frame count."""
    paths = pb.bench_files(tmp_path, files=1, seconds=2.0)[(320, 240)]
    folder, = pb.soccernet_folders(paths)
    assert folder.endswith("soccernet/clip00/1")
    assert sorted(os.listdir(folder)) == [f"{k:08d}.jpg" for k in range(1, 5)]
    shown = video.read_frames_at(paths[0], [0.0, 0.5, 1.0, 1.5]).float()
    jpeg = video.read_clip(folder, range(4)).float()
    err = (jpeg[:, None] - shown[None]).abs().mean(dim=(2, 3, 4))
    assert torch.equal(err.argmin(dim=1), torch.arange(4)) and err.diagonal().max() < 4
    games = json.loads((tmp_path / "320x240/soccernet/train.json").read_text())
    half = games["clip00"]["halves"]["1"]
    assert (half["UrlLocal"], half["duration"], half["num_frames"]) == ("clip00/1", 2.0, 4)


def test_tcore_model_step_runs_at_the_peak_lr(tmp_path):
    """T-CoRe's step row sets its schedules past the warm-up: the peak lr on every student
    group and the last layer unfrozen (at step 0 all were 0 and the step left the weights as
    they were). ViT-tiny to stay fast; the crops are the pipeline's."""
    import tcore
    paths = pb.bench_files(tmp_path, files=1, seconds=0.4)[(320, 240)]
    _, get = pb.pipeline("tcore", paths)
    small = tcore.Args(model="tiny")
    _, step, model = pb.model_step("tcore", [get((0, 0)), get((1, 0))], torch.device("cpu"),
                                   small)
    before = [p.detach().clone() for p in model.student.parameters()]
    step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.student.parameters())]
    assert sum(changed) > len(changed) // 2, (sum(changed), len(changed))
