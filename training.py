"""Training plumbing shared by pretrain.py and finetune.py: command-line flags from
dataclasses, DDP set-up, the optimizer and LR schedule, atomic checkpoints, the metrics
log, clean stops on SIGINT/SIGTERM and a wall-clock budget (checkpoints: checkpoints.py). Written once here,
imported by both scripts (and by bench.py for the optimizer)."""
import argparse
import dataclasses
import gc
import importlib
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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
from checkpoints import all_rng_states, load_model_state, restarted_by_torchrun, rng_state, save_checkpoint, set_rng_state


# ---- flags: one list of options, the dataclass fields ------------------------------------

def field_comments(cls):
    """The inline comment of each dataclass field (`name: type = value  # comment`), as help text; a
    subclass's comment of a field it restates wins over its base's."""
    helps = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            helps.update(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(klass), flags=re.M))
    return helps


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


@dataclass
class TrainingConfig:
    """The options of both training scripts. pretrain.TrainConfig and finetune.FinetuneConfig extend it with
    their own and restate the fields whose default differs (a restated field keeps its place here)."""
    preset: str = "tiny"  # model preset: tiny | small | base | large
    data_dir: str = "data/shapes"  # shapes world folder: one made there is used (any sizes), else the default is made
    train_json: str = ""  # your own training JSON (else the shapes world's)
    image_root: str = ""  # folder the JSON's image paths are relative to (default: the JSON's folder)
    vocab: str = ""  # BERT-style vocab.txt (default: the shapes world's)
    bpe: str = ""  # or a byte-level BPE folder: vocab.json + merges.txt, the official EVE's tokenizer format
    out_dir: str = ""  # checkpoints and metrics.jsonl
    max_steps: int = 0  # optimizer steps
    batch_size: int = 32  # per process and micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4  # peak learning rate
    min_lr_ratio: float = 0.01  # final LR as a share of the peak
    warmup_steps: int = 0  # linear warm-up
    schedule: str = "cosine"  # LR decay after the warm-up: cosine | linear (official EVE fine-tuning; NLVR2: cosine)
    weight_decay: float = 0.05  # AdamW decay on matrices only
    adam_beta2: float = 0.95  # AdamW beta2 (beta1 is 0.9); official EVE fine-tuning: 0.98
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    dtype: str = "auto"  # auto (bf16 on GPU) | fp32 | bf16
    compile: bool = False  # torch.compile the model
    num_workers: int = 2  # data loader processes
    seed: int = 0  # data order, masks and init
    log_every: int = 10  # steps between metrics.jsonl records
    save_every: int = 200  # steps between checkpoints
    keep_last: int = 3  # checkpoints kept
    resume: str = ""  # auto | path of a checkpoint (a torchrun restart continues from last.pt by itself)
    skip_bad: bool = False  # skip and count bad rows/images instead of stopping


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
        # DDP imports torch._dynamo, and that import keeps references to the process groups that exist then
        # (torch 2.13), so destroy_process_group() could not free the group: imported first, it holds none
        importlib.import_module("torch._dynamo")
        backend, restart = "nccl" if device.type == "cuda" else "gloo", restarted_by_torchrun()
        if restart:  # torchrun's store still holds the lost group's addresses (Gloo then connects to dead
            # ports): the restarted group keeps its keys apart
            store, _, _ = next(dist.rendezvous("env://"))
            dist.init_process_group(backend, store=dist.PrefixStore(f"restart_{restart}", store), rank=rank, world_size=world)
        else:
            dist.init_process_group(backend)
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
    """Free the process group while Python is fully alive. A Gloo group that outlives the interpreter's
    finalisation aborts it at exit ('terminate called without an active exception'): a worker thread that drops
    the last reference to a finished all-reduce then needs the GIL, which finalisation no longer gives."""
    if dist.is_initialized():
        gc.collect()  # the DDP wrapper sits in a reference cycle and holds the group until it is collected
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

def decays(module, p):
    """Whether AdamW decays parameter p of `module`. By rank, as nanoGPT chooses, so that a new layer kind
    needs no list of names: the weights are the module's own tensors of the highest rank, 2 or more (linear
    and conv weights, the experts' stacked (E, D, H) weights); tensors of lower rank beside them are biases
    (also the experts' stacked (E, H) biases), and vectors and scalars (norms, layer scales, the ITC
    temperature) never decay. Lookup tables do not decay either, as in MAE and BEiT: nn.Embedding weights
    and the learned tokens and position tables added to every sample, shaped (1, N, D)."""
    top = max(q.ndim for q in module.parameters(recurse=False))
    if p.ndim < 2 or p.ndim < top or isinstance(module, nn.Embedding):
        return False
    is_table = p.ndim >= 3 and p.shape[0] == 1 and not isinstance(module, nn.modules.conv._ConvNd)
    return not is_table


def param_groups(model, weight_decay, lr, heads=(), head_lr_mult=1.0):
    """AdamW groups: decay (see decays) or not, each at lr; with head_lr_mult != 1 the parameters of the
    model attributes named in `heads` (new task heads) get groups of their own at lr * head_lr_mult."""
    head_ids = set()
    if head_lr_mult != 1.0:
        for name in heads:
            part = getattr(model, name, None)
            params = part.parameters() if isinstance(part, nn.Module) else [part] if part is not None else []
            head_ids |= {id(p) for p in params}
    groups = {}  # (decay?, head?) -> parameters, in model order
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                groups.setdefault((decays(module, p), id(p) in head_ids), []).append(p)
    # the two backbone groups always come first, so resuming finds the groups it saved
    return [{"params": groups.get((decay, head), []), "weight_decay": weight_decay if decay else 0.0,
             "lr": lr * (head_lr_mult if head else 1.0)}
            for decay, head in ((True, False), (False, False), (True, True), (False, True))
            if not head or groups.get((decay, head))]


def warmup_cosine(warmup_steps, total_steps, min_ratio=0.01, schedule="cosine"):
    """LR multiplier: linear warm-up from 0, then cosine (or, schedule='linear', straight-line) decay to min_ratio."""
    if schedule not in ("cosine", "linear"):
        raise ValueError(f"schedule must be cosine or linear, not {schedule!r}")

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        return min_ratio + (1 - min_ratio) * decay
    return factor


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


class StopRequested(BaseException):
    """A signal that arrived inside StopSignal.interruptible(): the loop leaves what it was waiting for.
    (A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it.)"""


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag that the training loop checks before every micro-batch and
    after every step, so the run saves a checkpoint and exits cleanly instead of dying mid-write.

    Inside interruptible() (waiting for a batch, evaluating) a single process stops at once: the
    handler raises StopRequested. Several processes only stop where all of them check the flag together
    (DDP's collectives would wait for ever on a rank that left), i.e. at the next micro-batch or step."""

    def __init__(self, can_interrupt=True):
        self.signum, self.can_interrupt, self.inside = None, can_interrupt, False
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore(self):
        """Hand the signals back: after training, Ctrl-C must stop an evaluation again."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.signum = signum
        if self.inside:
            self.inside = False  # raise once; the stop path then saves undisturbed
            raise StopRequested

    @contextmanager
    def interruptible(self):
        if not self.can_interrupt:
            yield
            return
        if self.signum is not None:
            raise StopRequested
        self.inside = True
        try:
            yield
        finally:
            self.inside = False


def any_rank(*flags):
    """Each flag OR-ed over all ranks (one small all_reduce), so that every rank takes the same branch."""
    t = torch.tensor([float(f) for f in flags])
    if dist.is_initialized():
        t = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
    return [bool(v) for v in t.tolist()]


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

def adamw(model, lr, weight_decay, heads=(), head_lr_mult=1.0, beta2=0.95):
    """AdamW with one fused kernel per tensor: on CPU the for-loop update of a base model (464M
    parameters) took about half of an MSM step at batch 4 (torch.profiler), the fused one 6% at batch 8."""
    groups = param_groups(model, weight_decay, lr, heads, head_lr_mult)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), fused=True)


def make_optimizer(model, tc, heads=(), head_lr_mult=1.0):
    """AdamW (decay on matrices only; the `heads` at head_lr_mult times the LR) and a warm-up + cosine or
    linear LR schedule (tc.schedule) over tc.max_steps, which scales every group's own LR alike."""
    opt = adamw(model, tc.lr, tc.weight_decay, heads, head_lr_mult, tc.adam_beta2)
    factor = warmup_cosine(tc.warmup_steps, tc.max_steps, tc.min_lr_ratio, tc.schedule)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def restore(ckpt, source, model, opt, sched, rank, world):
    """Continue a run from its checkpoint: weights, optimizer, schedule and this rank's RNG. Returns the
    progress fit() continues from: the step, and where the data and the clock stood (older checkpoints
    hold only the step)."""
    load_model_state(model, ckpt["model"], source)
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    states = ckpt["rng"]
    set_rng_state(states[rank] if len(states) == world else states[0])
    return {k: ckpt[k] for k in ("step", "epoch", "micro", "seconds") if k in ckpt}


def average_gradients(model):
    """DDP averages the gradients in the backward of a step's last micro-batch; when --skip-bad left that
    micro-batch out, the step's gradients are averaged here instead."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def fit(model, loader, opt, sched, tc, task, device, rank, world, progress=None, prepare=None, after_step=None,
        extra_state=None, desc="train", max_seconds=0.0):
    """Train `model` on `task` until tc.max_steps, or until the first step past max_seconds (if > 0) of
    training, counted from the start of training and across resumes.

    progress: what restore() returned, when resuming. prepare(batch) -> batch adds task inputs (masked
    text, answer targets); after_step(step, batch, out) runs on every rank after each optimizer step
    (pictures, evaluation); extra_state() -> dict goes into every checkpoint (config, vocabulary, ...).
    The data order of epoch e is a function of (seed, e) and a checkpoint records where in it the run
    stood, so resuming repeats an uninterrupted run exactly. With --skip-bad, grad_accum micro-batches
    whose items were all skipped are not a step; an epoch with no usable item at all is an error.
    Returns the last step.
    """
    progress = progress or {}
    step = progress.get("step", 0)
    steps_per_epoch = len(loader) // tc.grad_accum
    micros_per_epoch = steps_per_epoch * tc.grad_accum  # no tail shorter than grad_accum
    # where the next step's micro-batches start (checkpoints without it had one step per grad_accum of them)
    epoch = progress.get("epoch", step // steps_per_epoch)
    position = progress.get("micro", (step % steps_per_epoch) * tc.grad_accum)
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    if tc.compile:
        train_model = torch.compile(train_model)
    out_dir = Path(tc.out_dir)
    log = MetricsLog(out_dir / "metrics.jsonl", enabled=rank == 0)
    stop, speed = StopSignal(can_interrupt=world == 1), Throughput()
    bar = tqdm(total=tc.max_steps, initial=step, disable=rank != 0, desc=desc, dynamic_ncols=True)
    t0, seconds_before = time.perf_counter(), progress.get("seconds", 0.0)
    now = seconds_before  # seconds of training at the last step, to the millisecond: the budget is checked on
    # the value that metrics.jsonl shows, so no logged step before the last reads as past it
    boundary_rng, saved = rng_state(), step  # this rank's RNG when the last step ended; the step last saved

    def elapsed():
        return seconds_before + time.perf_counter() - t0

    def checkpoint():
        nonlocal saved
        states = all_rng_states(boundary_rng)  # every rank takes part in the gather
        if rank == 0:
            save_checkpoint(out_dir, step, dict(model=model.state_dict(), optimizer=opt.state_dict(),
                                                scheduler=sched.state_dict(), step=step, epoch=epoch, micro=position,
                                                seconds=elapsed(), rng=states, **(extra_state() if extra_state else {})),
                            tc.keep_last)
        saved = step

    stopped = None  # why the run ended early: "signal" or "max_seconds"
    model.train()
    try:
        while step < tc.max_steps and not stopped:
            this_epoch, start = epoch, position
            data.loader_set_epoch(loader, this_epoch)
            batches = itertools.islice(loader, start, micros_per_epoch)  # the micro-batches not done yet
            skipped, steps_done, used = Counter(), 0, 0  # used: micro-batches trained on in this step so far
            for micro in range(start, micros_per_epoch):
                with stop.interruptible():  # a slow or stuck loader
                    batch = next(batches)
                skipped.update(batch.pop("skipped", {}))
                # one check for all ranks: a signal anywhere stops everyone; a micro-batch whose items were all
                # skipped on any rank is left out on every rank (DDP's all-reduce needs all of them)
                signalled, empty = any_rank(stop.signum is not None, "text_ids" not in batch)
                if signalled:
                    stopped = "signal"
                    break
                last_micro = (micro + 1) % tc.grad_accum == 0
                if not empty:
                    batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
                    batch = prepare(batch) if prepare else batch
                    # DDP all-reduces gradients only on the last micro-batch of a step
                    with train_model.no_sync() if world > 1 and not last_micro else nullcontext():
                        with autocast(device, tc.dtype):
                            out = train_model(batch, task)
                        (out["loss"] / tc.grad_accum).backward()
                    used, trained = used + 1, batch
                    speed.add(len(batch["text_ids"]) * world)
                if not last_micro:
                    continue
                epoch, position = (this_epoch, micro + 1) if micro + 1 < micros_per_epoch else (this_epoch + 1, 0)
                if not used:  # every item of this step's micro-batches was skipped: not a step, move on
                    continue
                if not torch.isfinite(out["loss"]):
                    raise SystemExit(f"error: loss is {out['loss'].item()} at step {step}; stopping. The last good "
                                     f"checkpoint is {out_dir / 'last.pt'} (a lower --lr may help).")
                if world > 1 and empty:
                    average_gradients(model)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                step, used, steps_done, now = step + 1, 0, steps_done + 1, round(elapsed(), 3)
                boundary_rng = rng_state()
                bar.update(1)
                if step % tc.log_every == 0 or step == tc.max_steps:
                    parts = {k: round(v.item(), 4) for k, v in out.items() if k.startswith("loss")}
                    rate = speed.rate()
                    bar.set_postfix(loss=f"{parts['loss']:.3f}", sps=f"{rate:.0f}")
                    record = dict(step=step, epoch=this_epoch, lr=sched.get_last_lr()[0], samples_per_s=rate,
                                  grad_norm=grad_norm.item(), seconds=now, **parts)
                    if "moe_load" in out:  # per MoE layer, assignments per expert for vision and for text
                        record.update(moe_load_vision=[l[0] for l in out["moe_load"]], moe_load_text=[l[1] for l in out["moe_load"]],
                                      moe_drop=out["moe_drop"], moe_aux=out["moe_aux"])
                    log.write(**record)
                if after_step:
                    with stop.interruptible():  # an evaluation can take minutes
                        after_step(step, trained, out)
                    boundary_rng = rng_state()
                if step % tc.save_every == 0 or step == tc.max_steps:
                    checkpoint()
                signalled, over_time = any_rank(stop.signum is not None, 0 < max_seconds <= now)
                if signalled or over_time:
                    stopped = "signal" if signalled else "max_seconds"
                    break
                if step >= tc.max_steps:
                    break
            warn_skips(skipped, loader.dataset, this_epoch, log)
            if start == 0 and steps_done == 0 and not stopped:  # the next epoch would find nothing either
                at_read = sum(getattr(loader.dataset, "skipped", Counter()).values())
                raise SystemExit(f"error: {getattr(loader.dataset, 'json_name', 'the training data')}: no usable item "
                                 f"in epoch {this_epoch}: the {sum(skipped.values())} items read were all skipped "
                                 f"({', '.join(f'{k}: {v}' for k, v in skipped.items()) or 'none'}) and {at_read} "
                                 f"rows were left out when reading; nothing to train on")
    except StopRequested:  # a single process, signalled while loading data or evaluating
        stopped = "signal"
    finally:
        bar.close()
        stop.restore()
    if stopped and saved != step:  # what there is to save: the state after the last step
        checkpoint()
    if stopped == "signal" and rank == 0:
        print(f"\nstopped by signal at step {step}; continue with --resume auto --out-dir {out_dir}")
    if stopped == "max_seconds":
        log.write(step=step, seconds=now, stopped="max_seconds", max_seconds=max_seconds)
        if rank == 0:
            print(f"\nstopped at the time budget: {step} steps in {now:.1f}s of training (--max-seconds "
                  f"{max_seconds:g}); checkpoint {out_dir / 'last.pt'}")
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
