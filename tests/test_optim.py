"""The optimizer's groups (weight decay by tensor rank, a learning-rate multiplier for new heads), the shared
config base of the training scripts, and huge pages switched on by the entry points."""
import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import finetune
import pretrain
import training
from conftest import ROOT
from heads import EVEWithHeads
from model import make_config


def tiny_eve(**heads):
    return EVEWithHeads(make_config("tiny", vocab_size=50, dim=64, depth=2, heads=2, num_experts=4, decoder_dim=32,
                                    decoder_depth=1, decoder_heads=2, itc_dim=32), **heads)


def test_weight_decay_is_chosen_by_rank_not_by_name():
    model = tiny_eve(num_answers=5, nlvr2_head="mlp")
    groups = training.param_groups(model, 0.05, 1e-3)
    decayed = {id(p) for p in groups[0]["params"]}
    # the reference, written out by kind: linear and conv weights and the experts' weight stacks decay
    expected = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    expected |= {id(p) for n, p in model.named_parameters() if n.endswith((".w1", ".w2"))}
    assert decayed == expected
    assert id(model.word_embed.weight) not in decayed and id(model.image_pos) not in decayed
    assert id(model.cls_token) not in decayed and id(model.temp) not in decayed
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert len(decayed) + len(groups[1]["params"]) == sum(p.requires_grad for p in model.parameters())

    class NewFFN(nn.Module):  # a layer kind with names the old rule did not know
        def __init__(self):
            super().__init__()
            self.up, self.gate = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.ones(16))

    new = NewFFN()
    assert [p is new.up for p in training.param_groups(new, 0.1, 1e-3)[0]["params"]] == [True]


def warmup_cosine_by_hand(s, warmup, total, min_ratio):
    if s < warmup:
        return (s + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / (total - warmup))))


def test_head_lr_multiplier_holds_through_the_schedule():
    model = tiny_eve(num_answers=5)
    tc = training.TrainingConfig(lr=2e-3, warmup_steps=3, max_steps=10, min_lr_ratio=0.1)
    opt, sched = training.make_optimizer(model, tc, heads=("vqa_head",), head_lr_mult=5.0)
    head = {id(p) for p in model.vqa_head.parameters()}
    for group in opt.param_groups:  # each group is all head or all backbone
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1
        group["is_head"] = in_head.pop()
    assert sum(len(g["params"]) for g in opt.param_groups if g["is_head"]) == len(head) > 0
    for s in range(12):
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(2e-3 * (5.0 if g["is_head"] else 1.0) * warmup_cosine_by_hand(s, 3, 10, 0.1))
        opt.step()
        sched.step()
    # the default (multiplier 1) keeps the two groups resumed checkpoints hold
    assert len(training.make_optimizer(model, tc, heads=("vqa_head",))[0].param_groups) == 2


def test_finetune_gives_the_task_head_its_multiplier(small_world, tmp_path, monkeypatch):
    made = {}

    def spy(*args, **kw):
        made["opt"], sched = real(*args, **kw)
        return made["opt"], sched

    real = training.make_optimizer
    monkeypatch.setattr(training, "make_optimizer", spy)
    paths = [x for split in ("train", "val", "test") for x in (f"--{split}-json", str(small_world[f"nlvr2_{split}"]))]
    finetune.main(["--task", "nlvr2", *paths, "--image-root", str(small_world["root"]), "--vocab", str(small_world["vocab"]),
                   "--out-dir", str(tmp_path), "--max-steps", "1",
                   "--batch-size", "4", "--num-workers", "0", "--head-lr-mult", "10", "--lr", "1e-3", "--warmup-steps", "0",
                   "--preset", "micro"])
    lrs = sorted({g["initial_lr"] for g in made["opt"].param_groups})
    assert lrs == [1e-3, 1e-2] and len(made["opt"].param_groups) == 4


def test_both_configs_share_one_base_and_keep_their_defaults():
    base = {f.name for f in dataclasses.fields(training.TrainingConfig)}
    for cls in (pretrain.TrainConfig, finetune.FinetuneConfig):
        assert issubclass(cls, training.TrainingConfig) and base <= {f.name for f in dataclasses.fields(cls)}
    tc, fc = pretrain.TrainConfig(), finetune.FinetuneConfig()
    assert (tc.out_dir, tc.max_steps, tc.batch_size, tc.lr, tc.warmup_steps, tc.save_every, tc.keep_last) == \
        ("runs/pretrain", 900, 32, 1e-3, 200, 200, 3)
    assert (fc.out_dir, fc.max_steps, fc.batch_size, fc.lr, fc.warmup_steps, fc.save_every, fc.keep_last) == \
        ("", 0, 32, 5e-4, -1, 0, 2)
    args = finetune.parse_args(["--micro-batch", "2", "--head-lr-mult", "5"])  # a shared flag and an own one
    assert args.micro_batch == 2 and args.head_lr_mult == 5.0
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(finetune.FinetuneConfig)}
    assert helps["save_every"].endswith("at the end of every epoch")
    assert pretrain.parse_args(["--max-seconds", "60"]).max_seconds == 60.0


HUGE_PAGES = """
import re, sys, torch
{setup}
x = torch.empty(64 << 20, dtype=torch.uint8)  # 64 MB: above PyTorch's 2 MB huge-page threshold
for block in re.split(r"\\n(?=[0-9a-f]+-[0-9a-f]+ )", open("/proc/self/smaps").read()):
    lo, hi = (int(v, 16) for v in block.split()[0].split("-"))
    if lo <= x.data_ptr() < hi:  # VmFlags 'hg': the mapping was madvise(MADV_HUGEPAGE)d
        print("hg" in re.search(r"VmFlags:(.*)", block).group(1).split())
"""


@pytest.mark.parametrize("entry", ["pretrain", "finetune", "bench"])
def test_entry_points_turn_on_huge_pages_before_the_first_allocation(entry):
    """PyTorch reads the setting at its first CPU allocation: importing an entry point must make none, and its
    main() turns huge pages on first (data.use_huge_pages); --help ends main() before any other work."""
    setup = (f"import contextlib, io, {entry}\nwith contextlib.suppress(SystemExit), "
             f"contextlib.redirect_stdout(io.StringIO()):\n    {entry}.main(['--help'])")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    for value, expected in ((None, "True"), ("0", "False")):  # on by default; THP_MEM_ALLOC_ENABLE=0 opts out
        done = subprocess.run([sys.executable, "-c", HUGE_PAGES.format(setup=setup)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env={**env, **({"THP_MEM_ALLOC_ENABLE": value} if value else {})})
        assert done.stdout.strip().splitlines()[-1:] == [expected], done.stderr[-2000:]
