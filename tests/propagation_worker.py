"""Run under `torchrun --nproc_per_node=N` (N = 1: one process, no group): the DAVIS, JHMDB and
VIP drivers of common/propagation.py on the inputs named in `<cfg.json>`, with raw pixel
patches as features; writes what rank r returned to `<out_dir>/rank<r>.json` for
tests/test_distributed_eval.py to compare."""
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import dist, propagation as P  # noqa: E402


def pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3 * 64, H / 8, W / 8): each 8 x 8 patch's pixels as its feature."""
    return F.pixel_unshuffle(x, 8)


def error_of(fn) -> list:
    """[exception type, message] of `fn()`, which must raise."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return [type(e).__name__, str(e)]
    return ["no error", ""]


def main(cfg_path: str, out_dir: str) -> None:
    cfg = json.load(open(cfg_path))
    dist.init("cpu")
    r = dist.rank()
    scores, preds = P.eval_davis(pixels, cfg["davis"], size=(48, 64),
                                 out_dir=os.path.join(out_dir, "davis_pred"))
    native, _ = P.eval_davis(pixels, cfg["davis"], size=(64, 96), gt_at_eval_size=False)
    out = {"rank": r, "world": dist.world(), "davis": scores, "davis_native": native,
           "davis_preds": {name: hashlib.sha256(pred.numpy().tobytes()).hexdigest()
                           for name, _, pred in preds},
           "davis_pred_order": [name for name, _, _ in preds],
           "jhmdb": P.eval_jhmdb(pixels, cfg["jhmdb"], size=(48, 64)),
           "vip": P.eval_vip(pixels, cfg["vip"], long_side=128),
           "vip_one_video": P.eval_vip(pixels, cfg["vip_one"], long_side=128),
           # video 1 (rank 1 of 2) has no first annotation: every rank raises its error
           "vip_error": error_of(lambda: P.eval_vip(pixels, cfg["vip_bad"], long_side=128))}
    with open(os.path.join(out_dir, f"rank{r}.json"), "w") as fh:
        json.dump(out, fh)
    dist.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
