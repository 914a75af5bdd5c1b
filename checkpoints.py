"""Checkpoints of both training scripts: RNG states, atomic writes (a full disk ends in one line and leaves the
last good checkpoint), the newest readable checkpoint for --resume auto (also after a torchrun restart),
loading weights with a clear report of what does not fit, and restoring a run from its checkpoint.

Every checkpoint, ours or downloaded, is read by read_checkpoint with torch.load(weights_only=True): tensors and
plain data only, so a file that carries a pickled callable is refused before anything in it runs. What this
project writes is kept to such data (the numpy RNG key as a tensor)."""
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

def rng_state():
    """This process's RNG states as tensors and plain data (weights_only loads them): Python's is a tuple of
    ints; numpy's (name, uint32 key (624,), pos, has_gauss, cached_gaussian) keeps its key as an int64 tensor."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (str(name), torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_rng_states(state=None):
    """Every rank's RNG state (a list indexed by rank), so a resumed DDP run continues each rank exactly.
    state: this rank's (default: the current one)."""
    state = state or rng_state()
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def atomic_save(state, path, intact=""):
    """torch.save to a temporary file, then rename: a kill never leaves a half-written file at path.
    A failed write (a full disk, a file-size limit) removes the temporary file and stops the run with one
    line naming the file, the cause and `intact` (what is still good)."""
    tmp = Path(str(path) + ".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        cause = write_failure_cause(tmp, e)
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"error: cannot write {path}: {cause}" + (f"; {intact}" if intact else "")) from None


def write_failure_cause(path, error):
    """Why writing `path` failed, in the operating system's words. torch.save reports a failed write only
    as "unexpected pos ...", so one more write to the same file asks the system for the reason."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            for _ in range(16):  # a short write is not an error; the next one is (ENOSPC, EFBIG)
                os.write(fd, bytes(1 << 16))
        finally:
            os.close(fd)
    except OSError as e:
        return e.strerror or str(e)
    return str(error).strip().splitlines()[-1]  # the disk took more: not a lack of space


def last_good(out_dir):
    """Which checkpoint last.pt is (it is a second name of the newest ckpt_*.pt), for error messages."""
    last = Path(out_dir) / "last.pt"
    if not last.exists():
        return "no checkpoint of this run has been written yet"
    same = [p.name for p in sorted(Path(out_dir).glob("ckpt_*.pt")) if os.path.samefile(p, last)]
    return f"the last good checkpoint is still {last}" + (f" (= {same[0]})" if same else "")


def save_checkpoint(out_dir, step, state, keep_last=3):
    """Write ckpt_<step>.pt atomically (temporary file, then rename), point last.pt at it, keep
    the newest keep_last. A kill at any moment leaves the previous checkpoints intact; a full disk
    stops the run with a line saying which checkpoint is still the last good one."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"ckpt_{step:07d}.pt"
    atomic_save(state, path, intact=last_good(out_dir))
    link_tmp = out_dir / "last.pt.tmp"
    try:
        link_tmp.unlink(missing_ok=True)
        os.link(path, link_tmp)  # a second name for the same file: no second write
        os.replace(link_tmp, out_dir / "last.pt")
    except OSError as e:
        raise SystemExit(f"error: cannot point {out_dir / 'last.pt'} at {path}: {e.strerror}; "
                         f"{path} itself is complete") from None
    for old in sorted(out_dir.glob("ckpt_*.pt"))[:-keep_last]:
        old.unlink()
    return path


def find_checkpoint(resume, out_dir):
    """--resume auto: last.pt in out_dir if any (else start fresh); a path: that file, which must exist."""
    if not resume:
        return None
    if resume == "auto":
        last = Path(out_dir) / "last.pt"
        return last if last.exists() else None
    path = Path(resume)
    if not path.is_file():
        raise SystemExit(f"error: --resume {resume}: no such checkpoint file")
    return path


class UnsafeCheckpoint(ValueError):
    """A file that holds Python objects other than tensors and plain data: refused, nothing in it was run."""


def unsafe_globals(path, error):
    """The names of the classes and functions a refused file asks for (read off its pickle, never run), or []
    when the failure was not about them (a truncated or foreign file)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # the legacy (non-zip) format, or not a checkpoint: torch's message names the first one
        return re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]


def read_checkpoint(path, map_location="cpu"):
    """The one place a checkpoint is read: torch.load(weights_only=True), which builds tensors, containers and
    numbers but calls nothing the file names. Raises UnsafeCheckpoint (a file carrying other Python objects,
    e.g. a pickled callable) or ValueError (unreadable), each with one line naming the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, not a checkpoint at all, or refused by the safe unpickler
        names = unsafe_globals(path, e)
        if names:
            raise UnsafeCheckpoint(f"{path} holds Python objects other than tensors and plain data "
                                   f"({', '.join(names)}); refused without running them "
                                   f"(see docs/ROBUSTNESS.md, safe loading)") from None
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "error:" in ln), lines[0] if lines else type(e).__name__)
        raise ValueError(f"cannot read checkpoint {path}: {reason}") from None


def load_checkpoint(path, map_location="cpu"):
    """read_checkpoint for the command lines: a refused or unreadable file stops with one line."""
    try:
        return read_checkpoint(path, map_location)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def restarted_by_torchrun():
    """How many times torchrun (--max-restarts) has restarted this worker group after a lost rank."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def load_resume(resume, out_dir, verbose=True):
    """The checkpoint a run continues from: (path, checkpoint), or (None, None) to start afresh.

    --resume PATH: that file, which must be readable. --resume auto: last.pt of out_dir, or when it
    cannot be read (a warning names it) the newest readable ckpt_*.pt beside it. A group that torchrun
    restarted after losing a rank continues from its own out_dir whatever --resume says, so a lost
    rank costs at most one --save-every interval.
    """
    out_dir = Path(out_dir)
    if restarted_by_torchrun() and (out_dir / "last.pt").exists() and resume != "auto":
        if verbose:
            print(f"torchrun restart {restarted_by_torchrun()}: continuing from {out_dir} (as --resume auto)")
        resume = "auto"
    if resume != "auto":
        path = find_checkpoint(resume, out_dir)
        return (path, load_checkpoint(path)) if path else (None, None)
    candidates = [out_dir / "last.pt"] + sorted(out_dir.glob("ckpt_*.pt"), reverse=True)
    candidates = [p for p in candidates if p.exists()]
    for path in candidates:
        try:
            return path, read_checkpoint(path)
        except UnsafeCheckpoint as e:  # not what this project writes: stop rather than continue around it
            raise SystemExit(f"error: {e}") from None
        except ValueError as e:  # truncated by a crash or a full disk, or not a checkpoint
            if verbose:
                print(f"warning: {e}; trying an older one", file=sys.stderr)
    if candidates:  # starting afresh would overwrite the run's checkpoints
        raise SystemExit(f"error: --resume auto: no readable checkpoint in {out_dir} "
                         f"({', '.join(p.name for p in candidates)} cannot be read)")
    return None, None


def load_model_state(model, state_dict, source, strict=True):
    """Load weights with a clear report: shape mismatches are an error that lists every
    mismatched tensor; with strict=False, missing keys (new heads) are returned for printing."""
    own = model.state_dict()
    bad = [f"  {k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
           for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise SystemExit(f"error: {source} does not fit this model (another preset or vocabulary?):\n" + "\n".join(bad))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if strict and (missing or unexpected):
        raise SystemExit(f"error: {source}: missing tensors {missing}, unexpected tensors {unexpected}")
    return missing, unexpected


def restore(ckpt, source, model, opt, sched, rank, world):
    """Continue a run from its checkpoint: weights, optimizer, schedule and this rank's RNG. Returns the
    progress resilience.Run continues from: the step, and where the data and the clock stood (older
    checkpoints hold only the step)."""
    load_model_state(model, ckpt["model"], source)
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    states = ckpt["rng"]
    set_rng_state(states[rank] if len(states) == world else states[0])
    return {k: ckpt[k] for k in ("step", "epoch", "micro", "seconds") if k in ckpt}


def model_config(ckpt, source, config_class):
    """The model config a checkpoint was trained with (config_class.from_dict), or one line saying why not."""
    try:
        return config_class.from_dict(ckpt["config"])
    except (ValueError, TypeError, KeyError) as e:
        raise SystemExit(f"error: {source}: {e}") from None
