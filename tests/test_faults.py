"""Faults a long run meets (issue 14): a --skip-bad data set whose batches or epochs are all bad, a signal
wherever the loop is, a full disk while saving, a corrupt last.pt, a rank lost under torchrun; and the
wall-clock budget (--max-seconds)."""
import json
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import torch
import torch.nn as nn

import data
import pretrain
import training
from conftest import ROOT, TINY_MODEL_FLAGS

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def flags(world, out_dir, *extra):
    return ["--train-json", str(world["pretrain"]), "--image-root", str(world["root"]), "--vocab", str(world["vocab"]),
            *TINY_MODEL_FLAGS, "--out-dir", str(out_dir), "--batch-size", "4", "--num-workers", "0", "--log-every", "1",
            *extra]


def run_pretrain(args, timeout=120, **kw):
    """pretrain.py in a child process; a hang fails the test (TimeoutExpired) instead of hanging the suite."""
    return subprocess.run([sys.executable, "pretrain.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=ENV, **kw)


def bad_rows(tmp_path, world, n_good):
    """A JSON of n_good real pairs followed by one whose image is missing."""
    rows = json.loads(world["pretrain"].read_text())[:n_good] + [{"image": "images/missing.png", "caption": "a shape"}]
    path = tmp_path / "pretrain.json"
    path.write_text(json.dumps(rows))
    return ["--train-json", str(path), "--image-root", str(world["root"])]


# ---- --skip-bad: batches and epochs without a usable item --------------------------------------

def test_skip_bad_batch_of_only_bad_items_is_not_a_step(small_world, tmp_path):
    """The issue's reproduction: two rows, one bad, batch 1. It hung for ever after step 1."""
    args = flags(small_world, tmp_path / "run", "--max-steps", "3", "--batch-size", "1", "--skip-bad")
    done = run_pretrain(args + bad_rows(tmp_path, small_world, 1), timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 3
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3]  # one step per epoch: the good row
    assert "skipped 1 bad items" in done.stderr


def test_epoch_without_a_usable_item_is_an_error(small_world, tmp_path):
    args = flags(small_world, tmp_path / "run", "--max-steps", "3", "--batch-size", "1", "--skip-bad")
    done = run_pretrain(args + bad_rows(tmp_path, small_world, 0), timeout=60)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "error: pretrain.json: no usable item in epoch 0" in done.stderr and "image not found: 1" in done.stderr


# ---- a signal wherever the loop is --------------------------------------------------------------

class SlowData(torch.utils.data.Dataset):
    """Items of a linear model's data; after `mode` is set, reading becomes slow ("slow") or every item a
    slowly read bad one ("skipped")."""

    def __init__(self):
        self.mode = "fast"

    def __len__(self):
        return 400

    def __getitem__(self, i):
        if self.mode == "slow":
            time.sleep(60)
        if self.mode == "skipped":
            time.sleep(0.05)
            return data.Skip("image not found")
        return {"image": torch.full((4,), float(i % 7)), "text_ids": torch.zeros(3, dtype=torch.long)}


def collate(items):
    kept = [x for x in items if not isinstance(x, data.Skip)]
    batch = {"skipped": Counter(x for x in items if isinstance(x, data.Skip))}
    if kept:
        batch.update(image=torch.stack([x["image"] for x in kept]), text_ids=torch.stack([x["text_ids"] for x in kept]))
    return batch


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, batch, task):
        return {"loss": (self.lin(batch["image"]) ** 2).mean()}


@pytest.mark.parametrize("where", ["loading", "evaluation", "skipped batches"])
def test_signal_stops_within_seconds_wherever_the_loop_is(tmp_path, where):
    torch.manual_seed(0)
    model, dataset = Linear(), SlowData()
    loader = data.make_loader(dataset, 2, collate, shuffle=True, num_workers=0, drop_last=True)
    tc = training.TrainingConfig(out_dir=str(tmp_path), max_steps=150, warmup_steps=1, save_every=1000, log_every=1)
    opt, sched = training.make_optimizer(model, tc)
    sent = {}

    def after_step(step, batch, out):
        if step != 2:
            return
        sent["t"] = time.time() + 0.3
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        if where == "evaluation":
            time.sleep(60)
        dataset.mode = "slow" if where == "loading" else "skipped"

    step = training.fit(model, loader, opt, sched, tc, "any", torch.device("cpu"), 0, 1, after_step=after_step)
    assert step == 2 and time.time() - sent["t"] < 5
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2  # saved what there was to save
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handed back


# ---- a full disk while saving -------------------------------------------------------------------

def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_good_one(small_world, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # the step-8 checkpoint's temporary file is the kernel's always-full device: every write gets ENOSPC
    (out / "ckpt_0000008.pt.tmp").symlink_to("/dev/full")
    done = run_pretrain(flags(small_world, out, "--max-steps", "12", "--save-every", "4"))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line == (f"error: cannot write {out / 'ckpt_0000008.pt'}: No space left on device; "
                    f"the last good checkpoint is still {out / 'last.pt'} (= ckpt_0000004.pt)")
    assert not (out / "ckpt_0000008.pt.tmp").exists() and not (out / "ckpt_0000008.pt").exists()
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4


def test_file_size_limit_during_the_first_checkpoint(small_world, tmp_path):
    def limit():  # in the child: 1 MB per file (a checkpoint is ~3 MB); a failed write then returns EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "run"
    done = run_pretrain(flags(small_world, out, "--max-steps", "4", "--save-every", "2"), preexec_fn=limit)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"error: cannot write {out / 'ckpt_0000002.pt'}: File too large; "
                                                    "no checkpoint of this run has been written yet")
    assert list(out.glob("*.pt*")) == []


# ---- a corrupt last.pt ----------------------------------------------------------------------------

def test_corrupt_last_pt_falls_back_to_the_newest_readable_checkpoint(small_world, tmp_path, capsys):
    out = tmp_path / "run"
    pretrain.main(flags(small_world, out, "--max-steps", "8", "--save-every", "4"))
    straight = torch.load(out / "last.pt", weights_only=True)["model"]
    size = (out / "last.pt").stat().st_size
    with open(out / "last.pt", "r+b") as f:  # truncated in place, so ckpt_0000008.pt (the same file) is too
        f.truncate(size // 3)
    with pytest.raises(SystemExit, match=r"cannot read checkpoint .*last\.pt"):  # an explicit path still fails
        pretrain.main(flags(small_world, out, "--max-steps", "8", "--resume", str(out / "last.pt")))
    capsys.readouterr()
    pretrain.main(flags(small_world, out, "--max-steps", "8", "--save-every", "4", "--resume", "auto"))
    printed = capsys.readouterr()
    assert f"warning: cannot read checkpoint {out / 'last.pt'}" in printed.err
    assert f"resumed from {out / 'ckpt_0000004.pt'} at step 4" in printed.out
    resumed = torch.load(out / "last.pt", weights_only=True)
    assert resumed["step"] == 8 and all(torch.equal(v, resumed["model"][k]) for k, v in straight.items())


# ---- a rank lost under torchrun --max-restarts -----------------------------------------------------

def torchrun(world, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--monitor-interval", "0.2",
           *extra, str(ROOT / "tests" / "ddp_worker.py"), str(out),
           *flags(world, out / "run", "--max-steps", "14", "--save-every", "2", "--no-augment")]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_torchrun_restart_after_a_lost_rank_resumes_to_the_uninterrupted_result(small_world, tmp_path):
    straight = torchrun(small_world, tmp_path / "a")
    killed = torchrun(small_world, tmp_path / "b", "--max-restarts", "1")
    log, pid_file = tmp_path / "b" / "run" / "metrics.jsonl", tmp_path / "b" / "pid1"
    deadline = time.time() + 90
    while not (log.exists() and any(json.loads(l).get("step", 0) >= 5 for l in log.read_text().splitlines())):
        assert time.time() < deadline and killed.poll() is None, killed.communicate()[1][-3000:]
        time.sleep(0.05)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)  # rank 1, part-way
    assert killed.wait(timeout=120) == 0, killed.communicate()[1][-3000:]
    assert straight.wait(timeout=120) == 0, straight.communicate()[1][-3000:]
    assert "continuing from" in killed.stdout.read()  # the restarted group resumed by itself
    logged = [json.loads(l)["step"] for l in log.read_text().splitlines()]
    assert len(logged) > len(set(logged)) and logged[-1] == 14  # steps after the last save were redone
    for rank in (0, 1):
        a, b = torch.load(tmp_path / "a" / f"rank{rank}.pt"), torch.load(tmp_path / "b" / f"rank{rank}.pt")
        assert all(torch.equal(v, b[k]) for k, v in a.items())


# ---- the wall-clock budget -------------------------------------------------------------------------

def test_max_seconds_stops_at_the_first_step_past_the_budget(small_world, tmp_path, capsys):
    budget = 5.0
    pretrain.main(flags(small_world, tmp_path, "--max-steps", "1000", "--max-seconds", str(budget), "--warmup-steps", "5",
                        "--save-every", "1000", "--picture-every", "1000"))
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps, final = [r for r in rows if "loss" in r], rows[-1]
    assert all(r["seconds"] < budget for r in steps[:-1]) and budget <= steps[-1]["seconds"]
    assert final == {"step": steps[-1]["step"], "seconds": steps[-1]["seconds"], "stopped": "max_seconds",
                     "max_seconds": budget}
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == final["step"] < 1000
    assert f"stopped at the time budget: {final['step']} steps" in capsys.readouterr().out
    # the LR schedule spans --max-steps, not the budget: step s's LR by hand
    for r in steps:
        s = r["step"]  # the scheduler has stepped s times
        factor = (s + 1) / 5 if s < 5 else 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (s - 5) / 995))
        assert r["lr"] == pytest.approx(1e-3 * factor)
