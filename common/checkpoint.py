"""Checkpoints: atomic save by rank 0, weights_only loading, RNG state, wrapper unwrapping.

A full checkpoint, as the method scripts write it, is a plain dict such as
`{"model": sd, "teacher": sd, "optimizer": sd, "scaler": sd, "step": int, "args": dict,
"rng": rng_state()}`; everything in it loads with `torch.load(..., weights_only=True)`.
"""
import argparse
import dataclasses
import hashlib
import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from common import cli, dist

USUAL_KEYS = ("model", "state_dict", "teacher")  # where init_from looks for the weights


class CheckpointError(cli.UserError, RuntimeError):
    """A checkpoint that cannot be read, does not fit the model, or belongs to another run."""


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def clean_state_dict(sd: dict) -> dict:
    """Drop leading `module.` (DDP) prefixes and every `_orig_mod.` (compile) component."""
    out = {}
    for key, value in sd.items():
        key = ".".join(part for part in key.split(".") if part != "_orig_mod")
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def save(path, state: dict) -> None:
    """Write `state` atomically (temp file, fsync, rename) on rank 0; other ranks return."""
    if not dist.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left over when writing failed


def load(path, map_location="cpu") -> dict:
    """`torch.load(path, weights_only=True)` with clear errors naming the file.

    `argparse.Namespace` is allowed too: released MAE-style checkpoints store their args so.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        text = " ".join(str(e).split())  # keep the specific part of torch's long message
        reason = text.split("WeightsUnpickler error:")[-1].split(" Check the documentation")[0]
        raise CheckpointError(f"cannot load checkpoint {path} (corrupt, truncated, or holding "
                           f"objects that weights_only=True refuses): {type(e).__name__}: "
                           f"{reason.strip()}") from None


def _local_rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states, as weights_only-safe types.

    Under torchrun this is a collective (call it on every rank): the states of all ranks are
    gathered, so that after a resume each rank continues its own random streams.
    """
    if not dist.is_dist():
        return _local_rng_state()
    states = [None] * dist.world()
    tdist.all_gather_object(states, _local_rng_state())
    return {"per_rank": states}


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state()` returned (CUDA states only where devices exist)."""
    if "per_rank" in state:  # saved under torchrun: this rank's own (wraps if world changed)
        state = state["per_rank"][dist.rank() % len(state["per_rank"])]
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)


def _listing(title: str, items: list, limit: int = 5) -> str:
    if not items:
        return ""
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"; {title} ({len(items)}): " + ", ".join(items[:limit]) + more  # one line


def key_prefixes(state_dict: dict, depth: int = 2) -> list:
    """The distinct leading `depth` dotted components of the keys (`trunk.model.`, `head.`),
    sorted: what a user needs to see when a file matches no known layout."""
    return sorted({".".join(k.split(".")[:depth]) + "." for k in state_dict})


def read_weights(path) -> dict:
    """The tensors of a weights file, read with weights_only: the state dict under "model"
    (ours), "state_dict" (a Lightning checkpoint, e.g. eztorch's) or the file itself, wrapper
    prefixes removed (`clean_state_dict`). Raises CheckpointError (one line) when the file
    cannot be read, saying how to extract the weights of a Lightning file whose pickled
    hyper-parameters weights_only refuses, or when it holds no state dict."""
    try:
        ckpt = load(path)
    except CheckpointError as e:
        raise CheckpointError(
            f"{str(e).rstrip('.')}. A Lightning checkpoint (e.g. the authors' eztorch release) "
            f"pickles its hyper-parameters: extract its weights once, where you trust the file "
            f"(with the packages it pickles installed): python -c \"import torch; torch.save("
            f"torch.load({str(path)!r}, map_location='cpu', weights_only=False)['state_dict'], "
            f"{str(path) + '.state_dict.pt'!r})\" and pass that file") from None
    sd = ckpt.get("model", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: no state dict in it")
    return clean_state_dict({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})


def layout_error(path, what: str, layouts: str, state_dict: dict) -> CheckpointError:
    """The one-line error for a file that holds no `what` weights in any known `layouts`:
    names them and the key prefixes the file holds (`key_prefixes`, 12 at most)."""
    return CheckpointError(f"{path}: no {what} weights in a known layout ({layouts})"
                           + _listing("key prefixes in the file", key_prefixes(state_dict), 12))


def strip_prefix(state_dict: dict, prefixes: tuple, ignore: tuple = ()) -> tuple:
    """Select the keys under the first of `prefixes` that any key starts with, prefix removed;
    keys starting with one of `ignore` (e.g. an EMA copy, `momentum_trunk.`) are dropped first.
    Returns `(state_dict, prefix)`; with no prefix matching, the state dict (less `ignore`) and
    "" (a bare backbone file). List longer prefixes first (`trunk.model.` before `trunk.`)."""
    sd = {k: v for k, v in state_dict.items() if not (ignore and k.startswith(tuple(ignore)))}
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, prefix
    return sd, ""


def load_model(model: nn.Module, state_dict: dict, strict: bool = True, what: str = "checkpoint"):
    """Load `state_dict` (wrapper prefixes stripped) into `unwrap(model)`.

    Raises a RuntimeError naming `what` on shape mismatches, and with `strict` also on missing
    or unexpected keys. Returns `(missing, unexpected)` key lists.
    """
    sd, target = clean_state_dict(state_dict), unwrap(model)
    own = target.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sd if k in own and sd[k].shape != own[k].shape]
    if shapes or (strict and (missing or unexpected)):
        raise CheckpointError(f"{what}: state dict does not match {type(target).__name__}"
                           + _listing("missing", missing) + _listing("unexpected", unexpected)
                           + _listing("shape mismatch", shapes)
                           + (_listing("key prefixes in the file", key_prefixes(sd), 12)
                              if missing else ""))
    target.load_state_dict(sd, strict=False)
    return missing, unexpected


def save_training(path, state: dict, amp, step: int, args, **extra) -> None:
    """Write the whole training state atomically: each entry of `state` (a module, an
    optimiser, anything with `state_dict()`) under its name, the AMP scaler, the step, args (a
    dataclass is stored as a dict), every rank's RNG state, and `extra` entries. Call it on
    every rank: gathering the RNG states is a collective under DDP."""
    ckpt = {name: obj.state_dict() for name, obj in state.items()}
    ckpt.update(scaler=amp.state_dict() if amp is not None else {}, step=step,
                args=dataclasses.asdict(args) if dataclasses.is_dataclass(args) else args,
                rng=rng_state(), **extra)
    save(path, ckpt)


def load_training(path, state: dict, amp, ckpt: Optional[dict] = None) -> dict:
    """Restore what `save_training` wrote into `state`'s objects (modules strictly, wrapper
    prefixes stripped), the AMP scaler and the RNG states; returns the checkpoint dict.
    `ckpt`: the already loaded contents of `path` (read from disk otherwise)."""
    ckpt = load(path) if ckpt is None else ckpt
    for name, obj in state.items():
        if name not in ckpt:
            raise CheckpointError(f"{path}: no {name!r} entry; it holds {sorted(ckpt)}")
        if isinstance(obj, nn.Module):
            load_model(obj, ckpt[name], what=path)
        else:
            obj.load_state_dict(ckpt[name])
    if amp is not None:
        amp.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return ckpt


def fingerprint(state_dict: dict) -> str:
    """A short hash (12 hex digits) of a state dict's names and tensor bytes: the identity of
    a set of weights, e.g. those a fine-tuning or a linear probe starts from, whatever file or
    folder they came from."""
    h = hashlib.sha1()
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            h.update(str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:12]


def init_from(model: nn.Module, path, key: Optional[str] = None, strict: bool = False,
              prefix: str = ""):
    """Load weights only from `path` into `model`; returns `(missing, unexpected)`.

    The file holds a raw state dict or a dict with it under `key` (auto: the first of
    "model", "state_dict", "teacher"). With `prefix` (e.g. "encoder."), only the keys under it
    are kept, with the prefix removed.
    """
    ckpt = load(path)
    if not isinstance(ckpt, dict):
        raise cli.InputError(f"{path}: expected a dict, found {type(ckpt).__name__}")
    is_raw = all(isinstance(v, torch.Tensor) for v in ckpt.values())
    if key is None and not is_raw:
        key = next((k for k in USUAL_KEYS if isinstance(ckpt.get(k), dict)), None)
        if key is None:
            raise cli.InputError(f"{path}: no state dict found under {USUAL_KEYS}; "
                             f"top-level keys: {sorted(ckpt)[:10]}")
    if key is not None and key not in ckpt:
        raise cli.InputError(f"{path}: no key {key!r}; top-level keys: {sorted(ckpt)[:10]}")
    sd = clean_state_dict(ckpt[key] if key is not None else ckpt)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return load_model(model, sd, strict=strict, what=str(path))
