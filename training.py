"""Training plumbing shared by pretrain.py and finetune.py: command-line flags from dataclasses, DDP set-up,
autocast, the optimizer and LR schedule, the metrics log, and the training loop itself (train_one_epoch, fit).
What keeps a run safe (signals, skipped items, the time budget, exact resume) lives in resilience.py, the
checkpoint files in checkpoints.py. Written once here, imported by both scripts (and by bench.py for the
optimizer)."""
import argparse
import dataclasses
import gc
import importlib
import json
import math
import os
import random
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import resilience
from model import EVEConfig, OfficialConfig
from moe import MoEConfig
from checkpoints import restarted_by_torchrun


# ---- options: one list, the config dataclasses' fields --------------------------------------

def option(default, help=None):
    """A config field; one with help text is also a command-line flag (--name-with-dashes)."""
    return dataclasses.field(default=default, metadata={"help": help} if help else {})


def add_flags(parser, title, fields, helps=None):
    """One flag per field that has help text (its metadata's, or helps[name]). A flag that is not given is absent
    from the parsed namespace (argparse.SUPPRESS), so one parse tells what was given: the caller lays it over the
    preset and the task's table, in that order."""
    group = parser.add_argument_group(title)
    for f in fields:
        text = (helps or {}).get(f.name) or f.metadata.get("help")
        if not text:
            continue
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if helps is None and default != "":
            text += f" (default: {default})"
        if type(default) is bool:
            group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=text,
                               action=argparse.BooleanOptionalAction)
        else:
            group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=text, type=type(default))


def model_fields(names):
    """The dataclass fields of model.make_config's names (EVEConfig's, its MoEConfig's or its OfficialConfig's),
    for add_flags: each script names the model fields its users may set."""
    every = {f.name: f for cls in (EVEConfig, MoEConfig, OfficialConfig) for f in dataclasses.fields(cls)}
    return [every[n] for n in names]


def split_given(given, cls):
    """(the given values that are cls's fields, the rest): given is vars() of a parse with add_flags."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in given.items() if k in names}, {k: v for k, v in given.items() if k not in names}


@dataclass
class TrainingConfig:
    """The options of both training scripts. pretrain.TrainConfig and finetune.FinetuneConfig extend it with
    their own and restate the fields whose default differs (a restated field keeps its place here)."""
    preset: str = option("tiny", "model preset: tiny | small | base | large | micro (the tests')")
    data_dir: str = option("data/shapes", "folder of the built-in shapes world, made there on first use")
    train_json: str = option("", "your own training JSON (else the shapes world's)")
    image_root: str = option("", "folder the JSON's image paths are relative to (default: the JSON's folder)")
    vocab: str = option("", "BERT-style vocab.txt (default: the shapes world's)")
    bpe: str = option("", "or a byte-level BPE folder (vocab.json + merges.txt), the official EVE tokenizer's format")
    out_dir: str = option("", "checkpoints and metrics.jsonl")
    max_steps: int = option(0, "optimizer steps")
    batch_size: int = option(32, "samples per optimizer step, all processes together (the global batch)")
    micro_batch: int = option(0, "samples per process and forward pass (0: batch-size / processes); the gradients "
                                 "of batch-size / (micro-batch x processes) of them are accumulated")
    grad_accum: int = 1  # micro-batches per process and optimizer step: decided by split_batch, not given
    lr: float = option(5e-4, "peak learning rate")
    min_lr_ratio: float = 0.01  # final LR as a share of the peak
    warmup_steps: int = option(0, "linear warm-up steps")
    schedule: str = "cosine"  # LR decay after the warm-up: cosine | linear (official EVE fine-tuning)
    weight_decay: float = option(0.05, "AdamW weight decay (matrices only)")
    adam_beta2: float = 0.95  # AdamW beta2 (beta1 is 0.9); official EVE fine-tuning: 0.98
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    dtype: str = option("auto", "auto (bf16 on GPU, else fp32) | fp32 | bf16")
    compile: bool = option(False, "torch.compile the model")
    num_workers: int = option(2, "data loader processes")
    seed: int = option(0, "seed of the data order, the masks and the initialisation")
    log_every: int = option(10, "steps between metrics.jsonl records")
    save_every: int = option(200, "steps between checkpoints")
    keep_last: int = 3  # checkpoints kept
    resume: str = option("", "auto (last.pt of --out-dir) or a checkpoint path; a torchrun restart resumes by itself")
    skip_bad: bool = option(False, "skip and count bad rows and images instead of stopping")


# ---- devices and DDP -------------------------------------------------------------------

def setup_distributed(seed):
    """Initialise DDP from torchrun's environment (NCCL on GPU, Gloo on CPU) and seed every rank alike.

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
    # every rank initialises the same model; the random draws of training (masks, dropout, ...) are seeded
    # per micro-batch by its place in the data (resilience.micro_batch_seed), not by rank
    seed_everything(seed)
    return rank, world, local_rank, device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def split_batch(tc, world):
    """tc with micro_batch and grad_accum decided from the global batch: tc.batch_size samples per optimizer
    step, as grad_accum micro-batches of micro_batch samples on each of `world` processes (nanoGPT's
    arithmetic). Stops with one line when they do not divide."""
    micro = tc.micro_batch or tc.batch_size // world
    if tc.batch_size < 1 or micro < 1 or tc.batch_size % (micro * world):
        given = f"--micro-batch {tc.micro_batch} x " if tc.micro_batch else ""
        raise SystemExit(f"error: --batch-size {tc.batch_size} (samples per step, all processes together) is not a "
                         f"positive multiple of {given}{world} process(es): give a --batch-size that is, or another "
                         "--micro-batch")
    return dataclasses.replace(tc, micro_batch=micro, grad_accum=tc.batch_size // (micro * world))


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


# ---- the loop's reports ------------------------------------------------------------------

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


class StepLog:
    """What the loop reports: the tqdm bar (rank 0) on every step and, every tc.log_every steps and at the
    last, one metrics.jsonl record: the step's losses (each the mean over the step's micro-batches on all ranks,
    so the same on any number of processes), learning rate, throughput since the last record, gradient norm,
    seconds of training, and per MoE layer the assignments per expert for vision and for text (of the last
    micro-batch)."""

    def __init__(self, log, tc, step, rank, desc):
        self.log, self.every, self.last = log, tc.log_every, tc.max_steps
        self.bar = tqdm(total=tc.max_steps, initial=step, disable=rank != 0, desc=desc, dynamic_ncols=True)
        self.t, self.samples = time.perf_counter(), 0
        self.sums, self.micros = {}, 0  # the loss parts of this step's micro-batches so far, summed

    def count(self, out, samples):
        """One micro-batch: its losses, and the samples it stands for on all ranks."""
        self.samples, self.micros = self.samples + samples, self.micros + 1
        for k, v in out.items():
            if k.startswith("loss"):
                self.sums[k] = self.sums.get(k, 0.0) + v.detach().float()

    def step(self, step, epoch, out, grad_norm, lr, seconds):
        self.bar.update(1)
        sums, micros, self.sums, self.micros = self.sums, self.micros, {}, 0
        if step % self.every and step != self.last:
            return
        names = sorted(sums)
        means = torch.stack([sums[k] for k in names]) / micros  # every rank logs the same steps: one all-reduce
        if dist.is_initialized():
            dist.all_reduce(means)
            means /= dist.get_world_size()
        parts = {k: round(v, 4) for k, v in zip(names, means.tolist())}
        now = time.perf_counter()
        rate, self.t, self.samples = self.samples / max(now - self.t, 1e-9), now, 0
        self.bar.set_postfix(loss=f"{parts['loss']:.3f}", sps=f"{rate:.0f}")
        record = dict(step=step, epoch=epoch, lr=lr, samples_per_s=rate, grad_norm=grad_norm.item(), seconds=seconds,
                      **parts)
        if "moe_load" in out:
            record.update(moe_load_vision=[l[0] for l in out["moe_load"]], moe_load_text=[l[1] for l in out["moe_load"]],
                          moe_drop=out["moe_drop"], moe_aux=out["moe_aux"])
        self.log.write(**record)

    def close(self):
        self.bar.close()


# ---- optimizer and the training loop of both scripts -------------------------------------

def adamw(model, lr, weight_decay, heads=(), head_lr_mult=1.0, beta2=0.95):
    """AdamW with one fused kernel per tensor: on CPU the for-loop update of a large model costs a sizeable
    share of a step, the fused one little (bench.py measures it)."""
    groups = param_groups(model, weight_decay, lr, heads, head_lr_mult)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, beta2), fused=True)


def make_optimizer(model, tc, heads=(), head_lr_mult=1.0):
    """AdamW (decay on matrices only; the `heads` at head_lr_mult times the LR) and a warm-up + cosine or
    linear LR schedule (tc.schedule) over tc.max_steps, which scales every group's own LR alike."""
    opt = adamw(model, tc.lr, tc.weight_decay, heads, head_lr_mult, tc.adam_beta2)
    factor = warmup_cosine(tc.warmup_steps, tc.max_steps, tc.min_lr_ratio, tc.schedule)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_one_epoch(model, loader, opt, sched, tc, task, device, run, log, prepare=None, after_step=None):
    """Train on what is left of epoch run.epoch, one optimizer step per tc.grad_accum micro-batches, until the
    epoch ends, tc.max_steps is reached or the run stops (a signal, the time budget: resilience.Run).

    model: what to call (DDP-wrapped, compiled), as model(batch, task) -> dict with "loss". prepare(batch) ->
    batch adds task inputs; after_step(step, batch, out) runs on every rank after each optimizer step.
    With --skip-bad, micro-batches whose items were all skipped are left out, and a step with none left is
    no step. Each micro-batch's random draws (masks, dropout, negatives) are seeded by its place in the data
    (run.micro_batches), so they do not depend on the number of processes."""
    epoch, used = run.epoch, 0  # used: micro-batches trained on in this step so far
    for micro, batch, empty in run.micro_batches(loader):
        last_micro = (micro + 1) % tc.grad_accum == 0
        if not empty:
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            batch = prepare(batch) if prepare else batch
            # DDP all-reduces gradients only on the last micro-batch of a step
            with model.no_sync() if run.world > 1 and not last_micro else nullcontext():
                with autocast(device, tc.dtype):
                    out = model(batch, task)
                (out["loss"] / tc.grad_accum).backward()
            used, trained = used + 1, batch
            log.count(out, len(batch["text_ids"]) * run.world)
        if not last_micro:
            continue
        run.advance(micro)  # the next step starts after this micro-batch
        if not used:  # every item of this step's micro-batches was skipped: not a step
            continue
        if not torch.isfinite(out["loss"]):
            raise SystemExit(f"error: loss is {out['loss'].item()} at step {run.step}; stopping. The last good "
                             f"checkpoint is {Path(tc.out_dir) / 'last.pt'} (a lower --lr may help).")
        if run.world > 1 and empty:  # the backward that would have averaged the gradients was left out
            resilience.average_gradients(model)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        used = 0
        run.step_done()
        log.step(run.step, epoch, out, grad_norm, sched.get_last_lr()[0], run.now)
        if after_step:
            run.after_step(after_step, trained, out)
        if run.step % tc.save_every == 0 or run.step == tc.max_steps:
            run.checkpoint()
        if run.should_stop() or run.step >= tc.max_steps:
            break


def fit(model, loader, opt, sched, tc, task, device, rank, world, run=None, prepare=None, after_step=None):
    """Train `model` on `task` until tc.max_steps, or until the run stops early. Returns the last step.

    run: a resilience.Run (where a resumed run continues, what its checkpoints hold besides the training state,
    its time budget); None: a fresh run. prepare and after_step: see train_one_epoch."""
    run = run or resilience.Run()
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    if tc.compile:
        train_model = torch.compile(train_model)
    log = MetricsLog(Path(tc.out_dir) / "metrics.jsonl", enabled=rank == 0)
    steps = StepLog(log, tc, run.step, rank, desc=task)
    run.begin(model, opt, sched, tc, len(loader), rank, world, log)  # position, clock, signal handlers
    model.train()
    try:
        while run.step < tc.max_steps and not run.stopped:
            train_one_epoch(train_model, loader, opt, sched, tc, task, device, run, steps, prepare, after_step)
            run.end_epoch(loader.dataset)  # skip warnings; an epoch with no usable item is an error
    except resilience.StopRequested:  # a single process, signalled while loading data or evaluating
        run.stopped = "signal"
    finally:
        steps.close()
        run.stop.restore()  # after training, Ctrl-C must stop an evaluation again
    run.finish()  # save what a stop left unsaved, say why the run ended
    return run.step
