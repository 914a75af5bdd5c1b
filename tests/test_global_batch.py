"""--batch-size is the global batch (issue 32): the same command on 1 or 2 processes trains on the same samples in the
same steps, cut into the same micro-batches with the same random draws, and ends with the same parameters."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import data
import finetune
import pretrain
import training
from conftest import ROOT, TINY_MODEL_FLAGS

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ATOL = 1e-5  # float rounding (DDP averages g0 and g1, one process sums g0 / 2 + g1 / 2); on CPU they are equal


def naive_micro_batches(n, micro, slots, seed, epoch):
    """The layout by hand: the epoch's shuffled indices, step s's global batch, its slot m's `micro` indices."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    size = micro * slots
    return [[order[s * size + m * micro: s * size + (m + 1) * micro] for m in range(slots)] for s in range(n // size)]


def sampler_steps(n, micro, accum, world, seed, epoch):
    """Each step's micro-batches in slot order, gathered from every rank's GlobalBatchSampler."""
    per_rank = []
    for rank in range(world):
        sampler = data.GlobalBatchSampler(n, micro, accum, rank, world, seed=seed)
        sampler.set_epoch(epoch)
        per_rank.append(list(sampler))
    steps = len(per_rank[0]) // accum
    return [[per_rank[r][s * accum + j] for r in range(world) for j in range(accum)] for s in range(steps)]


def test_micro_batches_do_not_depend_on_how_slots_are_spread_over_processes():
    n, micro, seed = 27, 2, 3  # 27 items: 3 steps of 8 and 3 left over (dropped)
    expected = naive_micro_batches(n, micro, 4, seed, epoch=1)
    assert len(expected) == 3 and len({i for step in expected for b in step for i in b}) == 24
    for accum, world in ((4, 1), (2, 2), (1, 4)):
        assert sampler_steps(n, micro, accum, world, seed, epoch=1) == expected, (accum, world)
    assert sampler_steps(n, micro, 4, 1, seed, epoch=2) != expected  # another epoch, another order
    # a resumed pass starts at its micro-batch without reading the ones before it
    sampler = data.GlobalBatchSampler(n, micro, 2, 1, 2, seed=seed)
    sampler.set_epoch(1, start=3)
    assert list(sampler) == [expected[1][3], expected[2][2], expected[2][3]]
    # one process without accumulation keeps the order of a shuffled torch sampler (the data order of old runs)
    one = data.GlobalBatchSampler(n, 8, seed=seed, drop_last=False)
    one.set_epoch(1)
    old = list(torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(
        range(n), generator=torch.Generator().manual_seed(seed + 1)), 8, drop_last=False))
    assert list(one) == old and len(old[-1]) == 3


def test_split_batch_derives_the_micro_batch_and_the_accumulation():
    split = lambda batch, micro, world: training.split_batch(  # noqa: E731
        training.TrainingConfig(batch_size=batch, micro_batch=micro), world)
    assert (split(32, 0, 1).micro_batch, split(32, 0, 1).grad_accum) == (32, 1)  # as large as fits: no accumulation
    assert (split(32, 0, 4).micro_batch, split(32, 0, 4).grad_accum) == (8, 1)
    assert (split(32, 4, 2).micro_batch, split(32, 4, 2).grad_accum) == (4, 4)
    with pytest.raises(SystemExit, match="--batch-size 30 .* not a positive multiple of --micro-batch 4 x 2 process"):
        split(30, 4, 2)
    with pytest.raises(SystemExit, match="--batch-size 6 .* not a positive multiple of 4 process"):
        split(6, 0, 4)


# ---- 1 process with accumulation 2 == 2 processes with accumulation 1 ---------------------------------------------

def pretrain_flags(world, out, *extra):
    return ["--train-json", str(world["pretrain"]), "--image-root", str(world["root"]), "--vocab", str(world["vocab"]),
            *TINY_MODEL_FLAGS, "--out-dir", str(out), "--batch-size", "8", "--micro-batch", "4", "--max-steps", "3",
            "--warmup-steps", "1", "--num-workers", "0", "--log-every", "1", "--picture-every", "1000", *extra]


def finetune_flags(world, out, *extra):
    paths = [x for split in ("train", "val", "test") for x in (f"--{split}-json", str(world[f"vqa_{split}"]))]
    return ["--task", "vqa", *paths, "--image-root", str(world["root"]), "--vocab", str(world["vocab"]),
            "--answer-list", str(world["answer_list"]), "--min-answer-count", "1", *TINY_MODEL_FLAGS,
            "--drop-path", "0.2", "--augment", "flip", "--out-dir", str(out), "--batch-size", "8", "--micro-batch", "4",
            "--max-steps", "3", "--num-workers", "0", "--log-every", "1", *extra]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes(small_world, tmp_path_factory):
    """The 2-process runs (Gloo; torchrun's environment set by hand, which spares its agent processes), started
    together so that they overlap the 1-process runs."""
    out = tmp_path_factory.mktemp("two")
    started, logs = {}, []
    for script, flags in (("pretrain.py", pretrain_flags), ("finetune.py", finetune_flags)):
        rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
        (out / script).mkdir()
        logs += [open(out / script / f"stderr{rank}", "w") for rank in (0, 1)]
        started[script] = [subprocess.Popen(
            [sys.executable, script, *flags(small_world, out / script)], cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=logs[-2 + rank], env={**ENV, **rendezvous, "RANK": str(rank), "LOCAL_RANK": str(rank)})
            for rank in (0, 1)]

    def result(script):
        for rank, proc in enumerate(started[script]):
            assert proc.wait(timeout=300) == 0, (out / script / f"stderr{rank}").read_text()[-3000:]
        return out / script
    yield result
    for proc in sum(started.values(), []):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for f in logs:
        f.close()


def final_model(out):
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 3
    return ckpt["model"]


def largest_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())


def logged_losses(out):
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def one_process(main, flags, world, out, *extra):
    """A run in this process, on one thread as the 2-process runs are (the same float sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(flags(world, out, *extra))
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.parametrize("script, main, flags", [("pretrain.py", pretrain.main, pretrain_flags),
                                                 ("finetune.py", finetune.main, finetune_flags)])
def test_one_process_with_accumulation_ends_where_two_processes_do(small_world, tmp_path, two_processes, script, main,
                                                                   flags):
    one = one_process(main, flags, small_world, tmp_path / "one")  # micro-batch 4: accumulation 2
    two = two_processes(script)  # micro-batch 4 on each of 2 processes: accumulation 1
    assert largest_difference(final_model(one), final_model(two)) < ATOL
    assert logged_losses(one) == pytest.approx(logged_losses(two), abs=1e-3)  # the step's mean, rounded to 4 places
    # the negative control: the same samples in each step, but cut into one micro-batch of 8 with other random
    # draws (masks, drop-path), ends elsewhere by far more than the tolerance
    other = one_process(main, flags, small_world, tmp_path / "other", "--micro-batch", "8")
    assert largest_difference(final_model(one), final_model(other)) > 100 * ATOL
