"""What keeps a training run safe, kept beside the loop (training.train_one_epoch) rather than inside it:
stopping cleanly on SIGINT/SIGTERM, the wall-clock budget, --skip-bad accounting, and the run's position
(epoch, next micro-batch, RNG state at the last step, seconds across resumes) that its checkpoints record,
so that a resumed run, or one that torchrun restarted after a lost rank, repeats an uninterrupted run exactly.
Checkpoint files themselves: checkpoints.py."""
import itertools
import random
import signal
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
from checkpoints import all_rng_states, rng_state, save_checkpoint


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


def average_gradients(model):
    """DDP averages the gradients in the backward of a step's last micro-batch; when --skip-bad left that
    micro-batch out, the step's gradients are averaged here instead."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def listed(counts):
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "none"


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
        tqdm.write(f"warning: epoch {epoch} skipped {sum(skipped.values())} bad items ({listed(skipped)}); "
                   f"{sum(at_read.values())} rows were left out when reading the data ({listed(at_read)})",
                   file=sys.stderr)
    log.write(epoch=epoch, skipped=dict(skipped), skipped_at_read=dict(at_read))


def no_usable_item(dataset, epoch, skipped):
    """The error of an epoch that began at its start and made no step: the next would find nothing either."""
    at_read = sum(getattr(dataset, "skipped", Counter()).values())
    return SystemExit(f"error: {getattr(dataset, 'json_name', 'the training data')}: no usable item in epoch {epoch}: "
                      f"the {sum(skipped.values())} items read were all skipped ({listed(skipped)}) and {at_read} "
                      f"rows were left out when reading; nothing to train on")


def micro_batch_seed(seed, epoch, step, slot):
    """The torch seed of one micro-batch's random draws (image and text masks, dropout, drop-path, sampled
    experts, hard negatives), set before its forward pass: a function of the run's seed and the micro-batch's
    place in the data (data.GlobalBatchSampler: the epoch, the step in it, the slot in the global batch), never
    of the process that runs it. So one process with accumulation draws what several without draw, and a
    resumed run draws what an uninterrupted one did."""
    return random.Random(f"micro-{seed}-{epoch}-{step}-{slot}").getrandbits(63)


class Run:
    """One run's position and its stop path. The data order of epoch e is a function of (seed, e) and every
    checkpoint records where in it the run stood (epoch, next micro-batch, this rank's RNG when the last step
    ended, seconds of training so far), so resuming repeats an uninterrupted run exactly.

    progress: what checkpoints.restore() returned, when resuming. extra_state() -> dict goes into every
    checkpoint (config, vocabulary, ...). max_seconds > 0: stop at the first step past that many seconds of
    training, counted from the start of training and across resumes. fit() calls begin() before the loop
    and finish() after it; the loop reads step, epoch, world and stopped ("signal", "max_seconds" or None)."""

    def __init__(self, progress=None, extra_state=None, max_seconds=0.0):
        self.progress, self.extra_state, self.max_seconds = progress or {}, extra_state or dict, max_seconds
        self.step, self.stopped = self.progress.get("step", 0), None

    def begin(self, model, opt, sched, tc, batches_per_epoch, rank, world, log):
        """Arm the run for a fit(): the position it continues from, its clock, the signal handlers."""
        self.model, self.opt, self.sched, self.tc = model, opt, sched, tc
        self.rank, self.world, self.log = rank, world, log
        steps_per_epoch = batches_per_epoch // tc.grad_accum
        self.micros_per_epoch = steps_per_epoch * tc.grad_accum  # no tail shorter than grad_accum
        # where the next step's micro-batches start (checkpoints without it had one step per grad_accum of them)
        self.epoch = self.progress.get("epoch", self.step // steps_per_epoch)
        self.micro = self.progress.get("micro", (self.step % steps_per_epoch) * tc.grad_accum)
        self.stop = StopSignal(can_interrupt=world == 1)
        self.t0, self.seconds_before = time.perf_counter(), self.progress.get("seconds", 0.0)
        self.now = self.seconds_before  # seconds of training at the last step, to the millisecond: the budget is
        # checked on the value that metrics.jsonl shows, so no logged step before the last reads as past it
        # this rank's RNG when the last step ended; the step last saved
        self.boundary_rng, self.saved = rng_state(), self.step

    def elapsed(self):
        return self.seconds_before + time.perf_counter() - self.t0

    def micro_batches(self, loader):
        """The micro-batches of the current epoch not done yet, as (index, batch, empty). One check for all
        ranks before each: a signal anywhere ends them for everyone (stopped = "signal"); a micro-batch whose
        items were all skipped on any rank is `empty` on every rank (DDP's all-reduce needs all of them).
        Before each is yielded, torch's RNG is seeded by its place in the data (micro_batch_seed)."""
        self.this_epoch, self.start, self.skipped, self.steps_in_epoch = self.epoch, self.micro, Counter(), 0
        skip = data.loader_set_epoch(loader, self.epoch, self.start)
        batches = itertools.islice(loader, skip, None)  # the micro-batches not done yet
        accum = self.tc.grad_accum
        for micro in range(self.start, self.micros_per_epoch):
            with self.stop.interruptible():  # a slow or stuck loader
                batch = next(batches)
            self.skipped.update(batch.pop("skipped", {}))
            signalled, empty = any_rank(self.stop.signum is not None, "text_ids" not in batch)
            if signalled:
                self.stopped = "signal"
                return
            # its place in the data: step micro // accum of the epoch, slot rank * accum + j of the global batch
            torch.manual_seed(micro_batch_seed(self.tc.seed, self.this_epoch, micro // accum,
                                               self.rank * accum + micro % accum))
            yield micro, batch, empty

    def advance(self, micro):
        """A step's micro-batches end at `micro`: the next step starts after it."""
        more = micro + 1 < self.micros_per_epoch
        self.epoch, self.micro = (self.this_epoch, micro + 1) if more else (self.this_epoch + 1, 0)

    def step_done(self):
        self.step, self.now, self.steps_in_epoch = self.step + 1, round(self.elapsed(), 3), self.steps_in_epoch + 1
        self.boundary_rng = rng_state()

    def after_step(self, hook, batch, out):
        """Run hook(step, batch, out) (pictures, an evaluation that can take minutes) so that a signal stops it;
        the random numbers it draws belong to the step, as a resumed run draws them too."""
        with self.stop.interruptible():
            hook(self.step, batch, out)
        self.boundary_rng = rng_state()

    def should_stop(self):
        """After each step, one check for all ranks: a signal anywhere, or the time budget spent."""
        signalled, over_time = any_rank(self.stop.signum is not None, 0 < self.max_seconds <= self.now)
        if signalled or over_time:
            self.stopped = "signal" if signalled else "max_seconds"
        return self.stopped is not None

    def end_epoch(self, dataset):
        """After each pass: warn of what --skip-bad left out; a whole epoch without a step is an error."""
        warn_skips(self.skipped, dataset, self.this_epoch, self.log)
        if self.start == 0 and self.steps_in_epoch == 0 and not self.stopped:
            raise no_usable_item(dataset, self.this_epoch, self.skipped)

    def checkpoint(self):
        states = all_rng_states(self.boundary_rng)  # every rank takes part in the gather
        if self.rank == 0:
            save_checkpoint(self.tc.out_dir, self.step, dict(
                model=self.model.state_dict(), optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict(),
                step=self.step, epoch=self.epoch, micro=self.micro, seconds=self.elapsed(), rng=states,
                **self.extra_state()), self.tc.keep_last)
        self.saved = self.step

    def finish(self):
        """The stop path, after the loop: save the state after the last step if a stop left it unsaved, and
        say why the run ended early."""
        if self.stopped and self.saved != self.step:
            self.checkpoint()
        out_dir = Path(self.tc.out_dir)
        if self.stopped == "signal" and self.rank == 0:
            print(f"\nstopped by signal at step {self.step}; continue with --resume auto --out-dir {out_dir}")
        if self.stopped == "max_seconds":
            self.log.write(step=self.step, seconds=self.now, stopped="max_seconds", max_seconds=self.max_seconds)
            if self.rank == 0:
                print(f"\nstopped at the time budget: {self.step} steps in {self.now:.1f}s of training (--max-seconds "
                      f"{self.max_seconds:g}); checkpoint {out_dir / 'last.pt'}")
