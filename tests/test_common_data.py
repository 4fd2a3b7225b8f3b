"""common/data.py: list readers, image datasets, the resumable sampler, per-sample RNG and the
skip-and-count wrapper (with DataLoader workers)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from common import data, video


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---- images ----
def test_image_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="root/<class>/<image>"):
        data.image_folder(tmp_path / "nope")
    write(tmp_path / "readme.txt", "x")
    with pytest.raises(FileNotFoundError, match="no class folders"):
        data.image_folder(tmp_path)
    (tmp_path / "dog").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        data.image_folder(tmp_path)
    for cls, n in (("dog", 2), ("cat", 3)):
        (tmp_path / cls).mkdir(exist_ok=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / cls / f"{i}.png")
    ds = data.image_folder(tmp_path)
    assert ds.classes == ["cat", "dog"] and len(ds) == 5 and ds[4][1] == 1


def test_torchvision_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py.*data_batch_1"):
        data.torchvision_dataset("cifar10", tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="stl10_binary"):
        data.torchvision_dataset("stl10", tmp_path, "train+unlabeled")
    with pytest.raises(ValueError, match="split"):
        data.torchvision_dataset("cifar100", tmp_path, "unlabeled")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.torchvision_dataset("mnist", tmp_path, "train")


# ---- video lists ----
def test_read_video_csv(tmp_path):
    csv = write(tmp_path / "train.csv", "a/x.mp4 3\n\n/abs/y.avi 0 120\nb/z 12 7\n\n")
    recs = data.read_video_csv(csv, tmp_path / "videos")
    assert recs == [data.VideoRecord(str(tmp_path / "videos/a/x.mp4"), 3, None),
                    data.VideoRecord("/abs/y.avi", 0, 120),
                    data.VideoRecord(str(tmp_path / "videos/b/z"), 12, 7)]
    assert data.read_video_csv(csv)[0].path == str(tmp_path / "a/x.mp4")  # default root
    bad = write(tmp_path / "bad.csv", "a.mp4 1\n\nb.mp4 one\n")
    with pytest.raises(ValueError, match=f"{bad}:3"):
        data.read_video_csv(bad, tmp_path)
    bad = write(tmp_path / "bad2.csv", "a.mp4 1 2 3\n")
    with pytest.raises(ValueError, match=f"{bad}:1: expected 'path label"):
        data.read_video_csv(bad, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        data.read_video_csv(tmp_path / "missing.csv", tmp_path)


def test_read_class_folders(tmp_path):
    for rel in ("walk/b.mp4", "walk/a.avi", "jump/c.webm", "jump/notes.txt", "run/d.mkv"):
        write(tmp_path / rel, "")
    (tmp_path / "jump/frames_e").mkdir()
    recs, classes = data.read_class_folders(tmp_path)
    assert classes == ["jump", "run", "walk"]
    got = [(os.path.relpath(r.path, tmp_path), r.label) for r in recs]
    assert got == [("jump/c.webm", 0), ("jump/frames_e", 0), ("run/d.mkv", 1),
                   ("walk/a.avi", 2), ("walk/b.mp4", 2)]
    with pytest.raises(FileNotFoundError, match="no videos"):
        data.read_class_folders(tmp_path / "jump/frames_e")


def test_read_ucf101_split(tmp_path):
    write(tmp_path / "classInd.txt", "1 ApplyEyeMakeup\n2 Archery\n3 Basketball\n")
    write(tmp_path / "trainlist01.txt",
          "Archery/v_Archery_g01_c01.avi 2\nApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\n")
    write(tmp_path / "testlist01.txt", "Basketball/v_Basketball_g01_c01.avi\n")
    frames = tmp_path / "frames"
    (frames / "Basketball/v_Basketball_g01_c01").mkdir(parents=True)  # only a frame folder
    train = data.read_ucf101_split(tmp_path, 1, True, videos=frames)
    assert [r.label for r in train] == [1, 0]
    assert train[0].path == str(frames / "Archery/v_Archery_g01_c01.avi")
    test = data.read_ucf101_split(tmp_path, 1, False, videos=frames)
    assert test == [data.VideoRecord(str(frames / "Basketball/v_Basketball_g01_c01"), 2)]
    write(tmp_path / "testlist02.txt", "Basketball/a.avi\nFencing/b.avi\n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'testlist02.txt'}:2"):
        data.read_ucf101_split(tmp_path, 2, False)


def test_read_hmdb51_split(tmp_path):
    write(tmp_path / "splits/wave_test_split1.txt", "w1.avi 1 \nw2.avi 2 \nw3.avi 0 \n")
    write(tmp_path / "splits/clap_test_split1.txt", "c1.avi 2\nc2.avi 1\n")
    write(tmp_path / "splits/clap_test_split2.txt", "c1.avi 1\nc2.avi 3\n")
    train = data.read_hmdb51_split(tmp_path / "splits", 1, True, videos=tmp_path / "v")
    assert train == [data.VideoRecord(str(tmp_path / "v/clap/c2.avi"), 0),
                     data.VideoRecord(str(tmp_path / "v/wave/w1.avi"), 1)]
    test = data.read_hmdb51_split(tmp_path / "splits", 1, False)
    assert [(os.path.basename(r.path), r.label) for r in test] == [("c1.avi", 0), ("w2.avi", 1)]
    with pytest.raises(ValueError, match="clap_test_split2.txt:2"):
        data.read_hmdb51_split(tmp_path / "splits", 2)
    with pytest.raises(FileNotFoundError, match="_test_split3.txt"):
        data.read_hmdb51_split(tmp_path / "splits", 3)


def test_find_frame_folders(tmp_path):
    for rel in ("a/s1/00000.jpg", "a/s2/00001.png", "b/x.txt", "c/00001.jpg"):
        write(tmp_path / rel, "")
    found = [os.path.relpath(f, tmp_path) for f in data.find_frame_folders(tmp_path)]
    assert found == ["a/s1", "a/s2", "c"]
    with pytest.raises(FileNotFoundError, match="no frame folders"):
        data.find_frame_folders(tmp_path / "b")


# ---- per-sample RNG ----
def test_sample_rng():
    draw = lambda *k: torch.rand(4, generator=data.sample_rng(*k))
    assert torch.equal(draw(0, 1, 5), draw(0, 1, 5))
    others = [draw(1, 1, 5), draw(0, 2, 5), draw(0, 1, 6), draw(0, 0, 5)]
    assert all(not torch.equal(draw(0, 1, 5), o) for o in others)
    a, b = data.sample_np_rng(3, 0, 0).random(4), data.sample_np_rng(3, 0, 0).random(4)
    assert np.array_equal(a, b) and not np.array_equal(a, data.sample_np_rng(3, 0, 1).random(4))
    assert data.split_key((3, 7)) == (3, 7) and data.split_key(7) == (0, 7)


# ---- sampler ----
def test_sampler_partitions_and_shuffles():
    s0, s1 = (data.ResumableSampler(10, seed=3, rank=r, world=2) for r in (0, 1))
    a, b = list(s0), list(s1)
    assert len(a) == len(b) == len(s0) == 5 and not set(a) & set(b) and set(a + b) == set(range(10))
    assert a == list(data.ResumableSampler(10, seed=3, rank=0, world=2))  # same (seed, epoch)
    assert a + b != sorted(a + b)  # shuffled
    s0.set_epoch(1)
    assert list(s0) != a
    ordered = data.ResumableSampler(10, shuffle=False, rank=1, world=2)
    assert list(ordered) == [1, 3, 5, 7, 9]


def test_sampler_pads_or_drops():
    shares = [list(data.ResumableSampler(10, rank=r, world=3)) for r in range(3)]
    assert [len(s) for s in shares] == [4, 4, 4] and set(sum(shares, [])) == set(range(10))
    dropped = [list(data.ResumableSampler(10, drop_last=True, rank=r, world=3)) for r in range(3)]
    flat = sum(dropped, [])
    assert [len(s) for s in dropped] == [3, 3, 3] and len(set(flat)) == 9
    assert list(data.ResumableSampler(2, shuffle=False, rank=2, world=4)) == [0]  # wraps around


def test_evaluation_sampler_sees_each_sample_once_whatever_the_world():
    for n, world in [(3, 2), (10, 3), (2, 4), (7, 1)]:
        shares = [list(data.ResumableSampler(n, shuffle=False, pad=False, rank=r, world=world))
                  for r in range(world)]
        assert sorted(sum(shares, [])) == list(range(n)), (n, world, shares)
        assert [len(data.ResumableSampler(n, shuffle=False, pad=False, rank=r, world=world))
                for r in range(world)] == [len(s) for s in shares]
    assert [list(data.ResumableSampler(3, shuffle=False, pad=False, rank=r, world=2))
            for r in (0, 1)] == [[0, 2], [1]]
    loader = data.make_loader(list(range(5)), 2, train=False)  # no padding, no dropping
    assert torch.cat(list(loader)).tolist() == [0, 1, 2, 3, 4]


def test_sampler_resume_mid_epoch():
    s = data.ResumableSampler(20, seed=1, rank=1, world=2, with_epoch=True)
    s.set_epoch(4)
    full = list(s)
    assert all(e == 4 for e, _ in full) and len(full) == 10
    s.set_start(6)
    assert len(s) == 4 and list(s) == full[6:]
    s.set_epoch(5)  # the start applies to the resumed epoch only
    assert len(s) == 10 and [i for _, i in s] == s.indices()
    with pytest.raises(ValueError, match="start 11"):
        s.set_start(11)


# ---- skip-and-count ----
class Clips(torch.utils.data.Dataset):
    """Reads frames 0 and 1 of each record; returns the mean brightness of the clip."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        _, i = data.split_key(key)
        return i, video.read_clip(self.records[i].path, [0, 1]).float().mean()


def make_videos(root, n: int, bad: set) -> list:
    recs = []
    for i in range(n):
        path = root / f"{i}.mp4"
        if i in bad:
            path.write_bytes(b"\x00garbage" * 50)
        else:
            video.write_video(path, np.full((2, 16, 16, 3), 10 * i, np.uint8))
        recs.append(data.VideoRecord(str(path), 0))
    return recs


def test_safe_dataset_skips_and_counts_across_workers(tmp_path):
    ds = data.SafeDataset(Clips(make_videos(tmp_path, 8, bad={3})), max_fail_fraction=0.2,
                          name="clips")
    loader = DataLoader(ds, batch_size=2, num_workers=2,
                        sampler=data.ResumableSampler(8, shuffle=False, rank=0, world=1))
    idx, mean = (torch.cat(x) for x in zip(*loader))
    assert idx.tolist() == [0, 1, 2, 4, 4, 5, 6, 7]  # 3 is replaced by the next index
    assert torch.allclose(mean, 10 * idx.float(), atol=3)
    assert ds.skipped == 1 and ds.failed.nonzero().flatten().tolist() == [3]  # seen in main
    assert ds[(7, 3)][0] == 4 and ds.skipped == 1  # a failure is counted once


def test_safe_dataset_aborts_over_fraction(tmp_path, caplog):
    ds = data.SafeDataset(Clips(make_videos(tmp_path, 8, bad={1, 5, 7})), max_fail_fraction=0.25,
                          name="clips")
    assert ds[1][0] == 2 and ds[1][0] == 2 and ds[5][0] == 6  # 2 failures: 2 <= 0.25 * 8
    assert [r.getMessage().count("1.mp4") > 0 for r in caplog.records] == [True, False]
    with pytest.raises(RuntimeError, match=r"clips: 3 of 8 samples are unreadable, more than "
                                            r"--max-fail-fraction 0.25 allows.*7\.mp4"):
        ds[7]


def test_one_unreadable_file_in_a_small_list_does_not_stop_the_run(tmp_path):
    ds = data.SafeDataset(Clips(make_videos(tmp_path, 10, bad={4, 6})), max_fail_fraction=0.05)
    assert ds[4][0] == 5 and ds.skipped == 1  # 0.05 x 10 = 0.5 files, but one is always allowed
    with pytest.raises(RuntimeError, match="2 of 10"):
        ds[6]
    strict = data.SafeDataset(Clips(make_videos(tmp_path, 10, bad={4})), max_fail_fraction=0)
    with pytest.raises(RuntimeError, match="1 of 10"):
        strict[4]


def test_safe_dataset_gives_up_after_tries(tmp_path):
    ds = data.SafeDataset(Clips(make_videos(tmp_path, 4, bad={0, 1, 2, 3})), max_fail_fraction=1,
                          tries=3)
    with pytest.raises(RuntimeError, match=r"3 consecutive unreadable samples up to .*2\.mp4"):
        ds[0]


def test_sample_seeded_draws_as_sample_rng_and_restores_the_global_state():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with data.sample_seeded(3, 1, 7):
        inside = torch.rand(4)
    assert torch.equal(inside, torch.rand(4, generator=data.sample_rng(3, 1, 7)))
    assert torch.equal(torch.get_rng_state(), before)
