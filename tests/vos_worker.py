"""Run under `torchrun --nproc_per_node=N` (N = 1: one process, no group): common/vos.py's
`eval_vos` on the synthetic DAVIS and YouTube-VOS roots named in `<cfg.json>`, with raw pixel
patches as features; writes what rank r returned to `<out_dir>/rank<r>.json` for
tests/test_common_vos.py to compare."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.nn.functional as F  # noqa: E402

from common import dist, vos  # noqa: E402


def pixels(x):
    """(T, 3, S, S) -> (T, S / 8, S / 8, 3 * 64): each 8 x 8 patch's pixels as its feature."""
    return F.pixel_unshuffle(x, 8).permute(0, 2, 3, 1)


def main(cfg_path: str, out_dir: str) -> None:
    cfg = json.load(open(cfg_path))
    dist.init("cpu")
    kw = dict(size=48, frames=4)
    out = {"world": dist.world(),
           "davis": vos.eval_vos(pixels, cfg["davis"], "davis", picture=os.path.join(
               out_dir, f"davis_rank{dist.rank()}.png"), **kw),
           "davis_batch2": vos.eval_vos(pixels, cfg["davis"], "davis", pca_batch=2, **kw),
           "ytvos": vos.vos_metrics(pixels, ytvos=cfg["ytvos"], **kw)}
    with open(os.path.join(out_dir, f"rank{dist.rank()}.json"), "w") as fh:
        json.dump(out, fh)
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
