"""Training plumbing shared by pretrain.py and finetune.py: command-line flags from
dataclasses, DDP set-up, the optimizer and LR schedule, atomic checkpoints, the metrics
log and clean stops on SIGINT/SIGTERM. Written once here, imported by both scripts."""
import argparse
import dataclasses
import inspect
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

# Transparent huge pages for CPU tensors of 2 MB or more (Linux; PyTorch reads this at its first
# large allocation; 0 opts out). Every step allocates its gradients afresh, and faulting them in
# 4 KB pages slowed the MoE layers' backward (compare THP_MEM_ALLOC_ENABLE=0 python bench.py).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data


# ---- flags: one list of options, the dataclass fields ------------------------------------

def field_comments(cls):
    """The inline comment of each dataclass field (`name: type = value  # comment`), as help text."""
    src = inspect.getsource(cls)
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", src, flags=re.M))


def add_dataclass_args(parser, cls, defaults=True, title=None):
    """One flag per field; with defaults=False every default is None ("keep the preset's value")."""
    group = parser.add_argument_group(title or cls.__name__)
    helps = field_comments(cls)
    for f in dataclasses.fields(cls):
        default = f.default if defaults else None
        kind = type(f.default)
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, dest=f.name, default=default, action=argparse.BooleanOptionalAction, help=helps.get(f.name))
        else:
            group.add_argument(flag, dest=f.name, type=kind, default=default, help=helps.get(f.name))


def pick_fields(args, cls, skip_none=False):
    """The values of cls's fields from parsed args (as a dict)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if not (skip_none and v is None)}


# ---- devices and DDP -------------------------------------------------------------------

def setup_distributed(seed):
    """Initialise DDP from torchrun's environment (NCCL on GPU, Gloo on CPU) and seed per rank.

    Returns (rank, world_size, local_rank, device).
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    seed_everything(seed + rank)  # different masks and dropout per rank, reproducible per run
    return rank, world, local_rank, device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def data_error_exit(error):
    """A data.DataError as one clean line. Raised in a loader worker, its message also carries the
    worker's traceback, so only the last line (the error itself) is kept."""
    line = str(error).strip().splitlines()[-1]
    return SystemExit("error: " + re.sub(r"^[\w.]*DataError: ", "", line))


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def autocast(device, dtype):
    """bf16 autocast where asked for ('auto' = bf16 on GPU, fp32 on CPU)."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "fp32":
        return nullcontext()
    if dtype != "bf16":
        raise ValueError(f"--dtype must be auto, fp32 or bf16, not {dtype!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# ---- optimisation ------------------------------------------------------------------------

def param_groups(model, weight_decay):
    """AdamW groups: weight decay on matrices (linear, conv, expert weights) only; none on
    norms, biases, embeddings, position tables, [CLS]/mask tokens or the temperature."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_matrix = name in ("weight", "w1", "w2") and p.ndim >= 2 and not isinstance(module, nn.Embedding)
            (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(warmup_steps, total_steps, min_ratio=0.01):
    """LR multiplier: linear warm-up from 0, then cosine decay to min_ratio."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


# ---- checkpoints -----------------------------------------------------------------------

def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_rng_states():
    """Every rank's RNG state (a list indexed by rank), so a resumed DDP run continues each rank exactly."""
    state = rng_state()
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def atomic_save(state, path):
    """torch.save to a temporary file, then rename: a kill never leaves a half-written file at path."""
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def save_checkpoint(out_dir, step, state, keep_last=3):
    """Write ckpt_<step>.pt atomically (temporary file, then rename), point last.pt at it, keep
    the newest keep_last. A kill at any moment leaves the previous checkpoints intact."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"ckpt_{step:07d}.pt"
    atomic_save(state, path)
    link_tmp = out_dir / "last.pt.tmp"
    link_tmp.unlink(missing_ok=True)
    os.link(path, link_tmp)  # a second name for the same file: no second write
    os.replace(link_tmp, out_dir / "last.pt")
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


def load_checkpoint(path, map_location="cpu"):
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated or not a checkpoint at all
        raise SystemExit(f"error: cannot read checkpoint {path}: {e}") from None


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


# ---- logging and stopping ----------------------------------------------------------------

class MetricsLog:
    """JSON-lines metrics, one object per line, appended (a resumed run continues the file)."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=to_jsonable) + "\n")


def to_jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist() if x.numel() > 1 else x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot log {type(x)}")


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag that the training loop checks after each step,
    so the run saves a checkpoint and exits cleanly instead of dying mid-write."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        """Hand the signals back: after training, Ctrl-C must stop an evaluation again."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.signum = signum

    def requested(self):
        """True on every rank if any rank was signalled (torchrun forwards signals to all)."""
        flag = torch.tensor([self.signum is not None], dtype=torch.float)
        if dist.is_initialized():
            flag = flag.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(flag)
        return bool(flag.item())


class Throughput:
    """Samples per second since the last call."""

    def __init__(self):
        self.t, self.n = time.perf_counter(), 0

    def add(self, n):
        self.n += n

    def rate(self):
        now = time.perf_counter()
        r = self.n / max(now - self.t, 1e-9)
        self.t, self.n = now, 0
        return r


# ---- the training loop of both scripts ---------------------------------------------------

def adamw(model, lr, weight_decay):
    """AdamW with one fused kernel per tensor: on CPU the for-loop update of a base model (464M
    parameters) took about half of an MSM step at batch 4 (torch.profiler), the fused one 6% at batch 8."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95), fused=True)


def make_optimizer(model, tc):
    """AdamW (decay on matrices only) and a warm-up + cosine LR schedule over tc.max_steps."""
    opt = adamw(model, tc.lr, tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(tc.warmup_steps, tc.max_steps, tc.min_lr_ratio))
    return opt, sched


def restore(ckpt, source, model, opt, sched, rank, world):
    """Continue a run from its checkpoint: weights, optimizer, schedule and this rank's RNG. Returns the step."""
    load_model_state(model, ckpt["model"], source)
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    states = ckpt["rng"]
    set_rng_state(states[rank] if len(states) == world else states[0])
    return ckpt["step"]


def fit(model, loader, opt, sched, tc, task, device, rank, world, step=0, prepare=None, after_step=None,
        extra_state=None, desc="train"):
    """Train `model` on `task` until tc.max_steps.

    prepare(batch) -> batch adds task inputs (masked text, answer targets); after_step(step,
    batch, out) runs on every rank after each optimizer step (pictures, evaluation);
    extra_state() -> dict goes into every checkpoint (config, vocabulary, ...). The data order
    of epoch e is a function of (seed, e) and a resumed run skips the micro-batches already
    done, so resuming repeats an uninterrupted run exactly. Returns the last step.
    """
    steps_per_epoch = len(loader) // tc.grad_accum
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    if tc.compile:
        train_model = torch.compile(train_model)
    out_dir = Path(tc.out_dir)
    log = MetricsLog(out_dir / "metrics.jsonl", enabled=rank == 0)
    stop, speed = StopSignal(), Throughput()
    bar = tqdm(total=tc.max_steps, initial=step, disable=rank != 0, desc=desc, dynamic_ncols=True)

    def checkpoint():
        states = all_rng_states()  # every rank takes part in the gather
        if rank == 0:
            save_checkpoint(out_dir, step, dict(model=model.state_dict(), optimizer=opt.state_dict(),
                                                scheduler=sched.state_dict(), step=step, rng=states,
                                                **(extra_state() if extra_state else {})), tc.keep_last)

    model.train()
    while step < tc.max_steps:
        epoch = step // steps_per_epoch
        data.loader_set_epoch(loader, epoch)
        skip = (step % steps_per_epoch) * tc.grad_accum  # micro-batches this epoch has already done
        batches = itertools.islice(loader, skip, steps_per_epoch * tc.grad_accum)  # no tail shorter than grad_accum
        skipped = Counter()
        for micro, batch in enumerate(batches, start=skip):
            skipped.update(batch.pop("skipped", {}))
            if "text_ids" not in batch:  # every item of this batch was a skipped bad one
                continue
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            batch = prepare(batch) if prepare else batch
            last_micro = (micro + 1) % tc.grad_accum == 0
            # DDP all-reduces gradients only on the last micro-batch of a step
            with train_model.no_sync() if world > 1 and not last_micro else nullcontext():
                with autocast(device, tc.dtype):
                    out = train_model(batch, task)
                (out["loss"] / tc.grad_accum).backward()
            speed.add(len(batch["text_ids"]) * world)
            if not last_micro:
                continue
            if not torch.isfinite(out["loss"]):
                raise SystemExit(f"error: loss is {out['loss'].item()} at step {step}; stopping. The last good "
                                 f"checkpoint is {out_dir / 'last.pt'} (a lower --lr may help).")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.max_steps:
                parts = {k: round(v.item(), 4) for k, v in out.items() if k.startswith("loss")}
                rate = speed.rate()
                bar.set_postfix(loss=f"{parts['loss']:.3f}", sps=f"{rate:.0f}")
                record = dict(step=step, epoch=epoch, lr=sched.get_last_lr()[0], samples_per_s=rate,
                              grad_norm=grad_norm.item(), **parts)
                if "moe_load" in out:  # per MoE layer, assignments per expert for vision and for text
                    record.update(moe_load_vision=[l[0] for l in out["moe_load"]], moe_load_text=[l[1] for l in out["moe_load"]],
                                  moe_drop=out["moe_drop"], moe_aux=out["moe_aux"])
                log.write(**record)
            if after_step:
                after_step(step, batch, out)
            if step % tc.save_every == 0 or step == tc.max_steps:
                checkpoint()
            if stop.requested():
                if step % tc.save_every:
                    checkpoint()
                warn_skips(skipped, loader.dataset, epoch, log)
                bar.close()
                stop.restore()
                if rank == 0:
                    print(f"\nstopped by signal at step {step}; continue with --resume auto --out-dir {out_dir}")
                return step
            if step >= tc.max_steps:
                break
        warn_skips(skipped, loader.dataset, epoch, log)
    bar.close()
    stop.restore()
    return step


def warn_skips(skipped, dataset, epoch, log):
    """With --skip-bad: one warning per epoch counting what was left out and why (all ranks summed)."""
    if dist.is_initialized():
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, skipped)
        skipped = sum(counts, Counter())
    at_read = getattr(dataset, "skipped", Counter())  # rows left out when the JSON was read
    if not (skipped or at_read):
        return
    if not dist.is_initialized() or dist.get_rank() == 0:
        tqdm.write(f"warning: epoch {epoch} skipped {sum(skipped.values())} bad items "
                   f"({', '.join(f'{k}: {v}' for k, v in skipped.items()) or 'none'}); "
                   f"{sum(at_read.values())} rows were left out when reading the data "
                   f"({', '.join(f'{k}: {v}' for k, v in at_read.items()) or 'none'})", file=sys.stderr)
    log.write(epoch=epoch, skipped=dict(skipped), skipped_at_read=dict(at_read))
