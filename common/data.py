"""Datasets and data plumbing: image datasets, video list readers, a resumable distributed
sampler, per-sample RNG, and the skip-and-count policy for unreadable samples.

Per-sample randomness (DESIGN §4) comes from (seed, epoch, index), never from the worker:
build the sampler with `ResumableSampler(..., with_epoch=True)` so the dataset receives
`(epoch, index)` keys, split them with `split_key`, and draw every augmentation from
`sample_rng(seed, epoch, index)`. This holds whatever the number of workers, with
persistent workers, and across a mid-epoch restart.
"""
import contextlib
import logging
import math
import os
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from . import cli, dist
from .video import IMAGE_EXTS

PathLike = Union[str, os.PathLike]
VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm")
log = logging.getLogger(__name__)


# ---- images ----
def image_folder(root: PathLike, transform=None) -> torchvision.datasets.ImageFolder:
    """`torchvision.datasets.ImageFolder` over `root/<class>/<image>`, with clear errors."""
    layout = "expected the layout root/<class>/<image>"
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such image folder ({layout})")
    if not any(e.is_dir() for e in os.scandir(root)):
        raise FileNotFoundError(f"{root}: no class folders ({layout})")
    try:
        return torchvision.datasets.ImageFolder(str(root), transform=transform)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{root}: no images ({layout}): {e}") from None


_TV = {  # name -> (class, folder inside root, files it needs)
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "data_batch_1..5, test_batch, batches.meta"),
    "cifar100": ("CIFAR100", "cifar-100-python", "train, test, meta"),
    "stl10": ("STL10", "stl10_binary",
              "{train,test}_{X,y}.bin, unlabeled_X.bin, class_names.txt"),
}


def torchvision_dataset(name: str, root: PathLike, split: str, transform=None) -> Dataset:
    """CIFAR-10/100 (split train/test) or STL-10 (train/test/unlabeled/train+unlabeled) from
    a local copy (`download=False`); `root` holds the extracted archive folder."""
    if name not in _TV:
        raise cli.InputError(f"unknown dataset {name!r}; expected one of {sorted(_TV)}")
    cls_name, folder, files = _TV[name]
    splits = ("train", "test") + (("unlabeled", "train+unlabeled") if name == "stl10" else ())
    if split not in splits:
        raise cli.InputError(f"{name}: unknown split {split!r}; expected one of {splits}")
    cls = getattr(torchvision.datasets, cls_name)
    kw = {"split": split} if name == "stl10" else {"train": split == "train"}
    try:
        return cls(str(root), transform=transform, download=False, **kw)
    except RuntimeError:
        raise FileNotFoundError(f"{name}: not found or corrupt; expected {Path(root) / folder}/ "
                                f"with {files} (the official archive, extracted)") from None


# ---- video lists ----
class VideoRecord(NamedTuple):
    path: str  # absolute; a video file or a frame folder
    label: int
    num_frames: Optional[int] = None  # when the list gives it


def _ints(where: str, fields: Sequence[str]) -> list:
    try:
        values = [int(f) for f in fields]
    except ValueError:
        raise cli.InputError(f"{where}: expected integers, got {' '.join(fields)!r}") from None
    if any(v < 0 for v in values):
        raise cli.InputError(f"{where}: negative value in {' '.join(fields)!r}")
    return values


def _lines(path: PathLike):
    """(where, fields) for each non-blank line, `where` being "file:line"."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such list file")
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{n}", line.split()


def read_video_csv(csv_path: PathLike, root: Optional[PathLike] = None) -> list:
    """Kinetics/SSv2 lists: lines `path label` or `path label num_frames`, space separated;
    relative paths are resolved against `root` (default: the list's folder)."""
    root = Path(root if root is not None else Path(csv_path).parent).absolute()
    records = []
    for where, fields in _lines(csv_path):
        if len(fields) not in (2, 3):
            raise cli.InputError(f"{where}: expected 'path label [num_frames]', "
                             f"got {' '.join(fields)!r}")
        records.append(VideoRecord(str(root / fields[0]), *_ints(where, fields[1:])))
    return records


def read_class_folders(root: PathLike, exts: Sequence[str] = VIDEO_EXTS) -> tuple:
    """(records, classes) for `root/<class>/<video>`: classes sorted alphabetically give the
    labels 0..C-1; a sub-folder `root/<class>/<video>/` counts as a frame-folder video."""
    root = Path(root).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected root/<class>/<video>)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    records = [VideoRecord(str(v), label) for label, c in enumerate(classes)
               for v in sorted((root / c).iterdir()) if v.is_dir() or v.suffix.lower() in exts]
    if not records:
        raise FileNotFoundError(f"{root}: no videos (expected root/<class>/<video>{exts})")
    return records, classes


def _video_path(videos: Path, rel: str) -> str:
    """`videos/rel`, or its frame folder `videos/rel-without-extension/` if only that exists."""
    path = videos / rel
    frames = path.with_suffix("")
    return str(frames if not path.exists() and frames.is_dir() else path)


def read_ucf101_split(root: PathLike, split: int = 1, train: bool = True,
                      videos: Optional[PathLike] = None) -> list:
    """UCF101 official split: `root/classInd.txt` (`1 ApplyEyeMakeup`: label = id - 1) and
    `root/{train,test}list0{split}.txt` (`Class/v_x.avi [id]`, the label read from the class
    folder); videos (or frame folders) under `videos` (default `root`)."""
    root = Path(root)
    videos = Path(videos if videos is not None else root).absolute()
    classes = {}
    for where, fields in _lines(root / "classInd.txt"):
        if len(fields) != 2:
            raise cli.InputError(f"{where}: expected 'id ClassName', got {' '.join(fields)!r}")
        classes[fields[1]] = _ints(where, fields[:1])[0] - 1
    records = []
    for where, fields in _lines(root / f"{'train' if train else 'test'}list0{split}.txt"):
        if len(fields) not in (1, 2):
            raise cli.InputError(f"{where}: expected 'Class/video.avi [id]', "
                                 f"got {' '.join(fields)!r}")
        cls = fields[0].split("/")[0]
        if "/" not in fields[0] or cls not in classes:
            raise cli.InputError(f"{where}: class of {fields[0]!r} is not in "
                                 f"{root / 'classInd.txt'}")
        records.append(VideoRecord(_video_path(videos, fields[0]), classes[cls]))
    return records


def read_hmdb51_split(root: PathLike, split: int = 1, train: bool = True,
                      videos: Optional[PathLike] = None) -> list:
    """HMDB51 official split: `root/<class>_test_split{split}.txt` lines `<video>.avi <id>`
    (1 = train, 2 = test, 0 = unused); classes sorted alphabetically; videos (or frame
    folders) at `videos/<class>/<video>.avi` (default `videos` = `root`)."""
    root = Path(root)
    videos = Path(videos if videos is not None else root).absolute()
    suffix = f"_test_split{split}.txt"
    files = sorted(root.glob(f"*{suffix}")) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(f"{root}: no HMDB51 split files <class>{suffix}")
    records, want = [], 1 if train else 2
    for label, file in enumerate(files):
        cls = file.name[: -len(suffix)]
        for where, fields in _lines(file):
            if len(fields) != 2 or _ints(where, fields[1:])[0] not in (0, 1, 2):
                raise cli.InputError(f"{where}: expected '<video>.avi 0|1|2', "
                                     f"got {' '.join(fields)!r}")
            if int(fields[1]) == want:
                records.append(VideoRecord(_video_path(videos, f"{cls}/{fields[0]}"), label))
    return records


def find_frame_folders(root: PathLike) -> list:
    """Every folder under `root` that directly holds image frames, sorted."""
    found = [d for d, _, names in os.walk(root)
             if any(n.lower().endswith(IMAGE_EXTS) for n in names)]
    if not found:
        raise FileNotFoundError(f"{root}: no frame folders (expected <video>/00001.jpg, ...)")
    return sorted(found)


# ---- sampling ----
def _seed(*words: int) -> int:
    """64-bit seed hashed from non-negative integers. Callers put a distinct purpose word
    first: SeedSequence ignores trailing zeros, so [s, e] and [s, e, 0] would collide."""
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0])


def sample_rng(seed: int, epoch: int, index: int) -> torch.Generator:
    """A torch generator determined by (seed, epoch, index) alone: draw a sample's
    augmentations from it (`torch.rand(..., generator=g)`)."""
    return torch.Generator().manual_seed(_seed(0, seed, epoch, index))


@contextlib.contextmanager
def sample_seeded(seed: int, epoch: int, index: int):
    """Within: the global CPU generator seeded as `sample_rng(seed, epoch, index)`, for
    transforms that draw from it (torchvision v2); restored on exit. CUDA's generator is left
    alone (a loader without workers runs this in the training process)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(_seed(0, seed, epoch, index))
        yield


def sample_np_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Numpy twin of `sample_rng`."""
    return np.random.default_rng(_seed(0, seed, epoch, index))


def split_key(key) -> tuple:
    """(epoch, index) from a dataset key: a `(epoch, index)` pair from
    `ResumableSampler(with_epoch=True)`, or a plain index (epoch 0, e.g. in evaluation)."""
    return (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (0, int(key))


class ResumableSampler(Sampler):
    """Distributed sampler that can resume mid-epoch.

    The epoch's order is a permutation drawn from (seed, epoch) (or 0..n-1 without shuffle).
    For training it is padded by wrapping around (or cut with `drop_last`) to a multiple of
    the world size so that every rank does the same number of steps; rank r takes positions
    r, r + world, ... With `pad=False` (evaluation) nothing is added: rank r takes r, r +
    world, ... of the plain order, shares may differ by one, and over all ranks every sample
    is seen exactly once (distributed evaluation counts each sample once).
    Call `set_epoch(e)` before each epoch, then, when resuming, `set_start(k)` to skip the
    first k samples of this rank's share (k = batches done this epoch x batch size); `len()`
    is the count still to come.
    """

    def __init__(self, size, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 with_epoch: bool = False, rank: Optional[int] = None, world: Optional[int] = None,
                 pad: bool = True):
        size = size if isinstance(size, int) else len(size)  # a dataset or its length
        self.size, self.shuffle, self.seed, self.with_epoch = size, shuffle, seed, with_epoch
        self.rank = dist.rank() if rank is None else rank
        self.world = dist.world() if world is None else world
        self.pad = pad or drop_last
        if drop_last:
            self.per_rank = size // self.world
        elif pad:
            self.per_rank = math.ceil(size / self.world)
        else:
            self.per_rank = len(range(self.rank, size, self.world))
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order; also resets the start to 0."""
        self.epoch, self.start = epoch, 0

    def set_start(self, samples: int) -> None:
        """Skip this rank's first `samples` samples of the current epoch."""
        if not 0 <= samples <= self.per_rank:
            raise ValueError(f"start {samples} outside [0, {self.per_rank}] samples per rank")
        self.start = samples

    def indices(self) -> list:
        """This rank's whole share for the current epoch (ignores the start)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(_seed(1, self.seed, self.epoch))
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad:
            total = self.per_rank * self.world
            order = (order * math.ceil(total / max(self.size, 1)))[:total]
        return order[self.rank::self.world]

    def __iter__(self):
        for i in self.indices()[self.start:]:
            yield (self.epoch, i) if self.with_epoch else i

    def __len__(self) -> int:
        return self.per_rank - self.start


def collate_readable(batch: list):
    """`default_collate` of the samples that are not None (left out by
    `SafeDataset(replace=False)`); None when none is left."""
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


def make_loader(ds: Dataset, batch_size: int, train: bool, seed: int = 0, num_workers: int = 0,
                **kwargs) -> DataLoader:
    """The project's DataLoader over `ds`.

    train: a shuffled `ResumableSampler` keyed (epoch, index), full batches only
    (`drop_last`), persistent workers. Otherwise: in dataset order, no padding, so that a
    distributed evaluation sees each sample exactly once. Either way the loader has its own
    `torch.Generator` (seeded from `seed`): starting an iterator draws from it, never from the
    global generator that dropout, masks and mixup use, so a resumed run draws exactly what
    the uninterrupted one draws. Evaluation batches drop unreadable samples
    (`collate_readable`; a batch may be None). `kwargs` go to `DataLoader`.
    """
    if not train:
        kwargs.setdefault("collate_fn", collate_readable)
    sampler = ResumableSampler(ds, shuffle=train, seed=seed, drop_last=train, with_epoch=train,
                               pad=train)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=train,
                      persistent_workers=train and num_workers > 0,
                      generator=torch.Generator().manual_seed(_seed(2, seed)), **kwargs)


# ---- unreadable samples ----
class SafeDataset(Dataset):
    """Skip-and-count wrapper: a sample whose loading raises OSError, RuntimeError or
    ValueError (VideoReadError included) is logged once, counted, and replaced by the next
    index (up to `tries` of them, the key's epoch kept); with `replace=False` (evaluation,
    where a replacement would be counted twice) it is left out: the item is None, which
    `collate_readable` drops.

    Failed indices are flagged in a shared-memory tensor created here, so the count is the
    same in DataLoader workers and in the main process (`skipped`). When more distinct
    indices fail than `max_fail_fraction` of this rank's share (len / world size), and more
    than one (a single bad file never stops a run unless the fraction is 0), it raises,
    naming the `--max-fail-fraction` flag that every method script has.
    """

    def __init__(self, dataset: Dataset, max_fail_fraction: float = 0.05,
                 name: str = "dataset", tries: int = 10, replace: bool = True):
        self.dataset, self.name, self.tries, self.replace = dataset, name, tries, replace
        self.max_fail_fraction = max_fail_fraction
        share = max_fail_fraction * len(dataset) / dist.world()
        self.limit = max(share, 1.0) if max_fail_fraction > 0 else 0.0
        self.failed = torch.zeros(len(dataset), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def skipped(self) -> int:
        """Distinct indices that failed so far (all workers together)."""
        return int(self.failed.sum())

    def _describe(self, index: int) -> str:
        items = getattr(self.dataset, "records", None) or getattr(self.dataset, "samples", None)
        return f"{items[index][0]} (index {index})" if items is not None else f"index {index}"

    def __getitem__(self, key):
        epoch, index = split_key(key)
        for attempt in range(self.tries):
            if attempt:
                index = (index + 1) % len(self)
                key = (epoch, index) if isinstance(key, (tuple, list)) else index
            try:
                return self.dataset[key]
            except (OSError, RuntimeError, ValueError) as e:
                if not self.failed[index]:
                    self.failed[index] = True
                    log.warning("%s: skipping unreadable sample %s: %s",
                                self.name, self._describe(index), e)
                if self.skipped > self.limit:
                    raise RuntimeError(
                        f"{self.name}: {self.skipped} of {len(self)} samples are unreadable, more "
                        f"than --max-fail-fraction {self.max_fail_fraction} allows; last: "
                        f"{self._describe(index)}: {e}") from None
                if not self.replace:
                    return None
        raise RuntimeError(f"{self.name}: {self.tries} consecutive unreadable samples up to "
                           f"{self._describe(index)}")
