import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import pretrain
from conftest import ROOT, TINY_MODEL_FLAGS
from masking import mask_text
from heads import EVEWithHeads
from model import make_config


def world_flags(world):
    return ["--train-json", str(world["pretrain"]), "--image-root", str(world["root"]), "--vocab", str(world["vocab"])]


def run_flags(world, out_dir, *extra):
    return [*world_flags(world), *TINY_MODEL_FLAGS, "--out-dir", str(out_dir), "--batch-size", "8",
            "--num-workers", "0", "--log-every", "1", "--picture-every", "3", "--warmup-steps", "2", *extra]


def log_rows(out_dir):
    """The training records of metrics.jsonl (the reconstruction diagnostics are records of their own)."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.mark.parametrize("task", ["msm", "itc_itm"])
def test_one_step_lowers_the_loss_on_a_fixed_batch(task):
    torch.manual_seed(0)
    model = EVEWithHeads(make_config("tiny", vocab_size=100, dim=64, depth=2, heads=2, num_experts=4))
    model.freeze_unused_heads(task)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (8, 10), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mlm_ids, labels = mask_text(ids, {0, 2, 3}, 4, 100, 0.5, generator=g)
    batch = dict(image=torch.randn(8, 3, 64, 64, generator=g), text_ids=ids, text_mask=torch.ones(8, 10, dtype=torch.bool),
                 mlm_ids=mlm_ids, mlm_labels=labels)
    # plain gradient descent with a small step: the loss must go down to first order
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def loss():  # the same image masks and hard negatives each time
        torch.manual_seed(1)
        return model(batch, task)["loss"]

    before = loss()
    before.backward()
    opt.step()
    with torch.no_grad():
        assert loss() < before.detach()


def test_resumed_run_equals_uninterrupted_run(small_world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pretrain.main(run_flags(small_world, a, "--max-steps", "6", "--save-every", "3"))
    # continue from A's step-3 checkpoint, exactly what a run killed after step 3 would have left
    pretrain.main(run_flags(small_world, b, "--max-steps", "6", "--save-every", "3", "--resume", str(a / "ckpt_0000003.pt")))
    final_a = torch.load(a / "last.pt", weights_only=True)
    final_b = torch.load(b / "last.pt", weights_only=True)
    assert final_a["step"] == final_b["step"] == 6
    for k, v in final_a["model"].items():
        assert torch.equal(v, final_b["model"][k]), k
    losses_a = [r["loss"] for r in log_rows(a) if r["step"] > 3]
    losses_b = [r["loss"] for r in log_rows(b)]
    assert losses_a == losses_b and len(losses_b) == 3
    # the checkpoint carries what the issue names, and the vocabulary equals the file's
    assert {"model", "optimizer", "scheduler", "step", "config", "vocab", "rng"} <= set(final_a)
    assert final_a["vocab"] == small_world["vocab"].read_text().split("\n")[: len(final_a["vocab"])]
    assert sorted(p.name for p in a.glob("*.png")) == ["experts_0000003.png", "experts_0000006.png",
                                                       "recon_0000003.png", "recon_0000006.png",
                                                       "routing_0000003.png", "routing_0000006.png"]
    fg = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines() if "recon_fg_ratio" in line]
    assert [r["step"] for r in fg] == [1, 2, 3, 4, 5, 6] and all(r["recon_fg_ratio"] > 0 for r in fg)


def test_metrics_log_has_losses_lr_and_expert_load(small_world, tmp_path):
    pretrain.main(run_flags(small_world, tmp_path, "--max-steps", "2", "--objective", "msm+itc_itm"))
    row = log_rows(tmp_path)[-1]
    for key in ("loss", "loss_mim", "loss_mlm", "loss_itc", "loss_itm", "loss_moe", "lr", "samples_per_s", "moe_drop"):
        assert key in row, key
    vision, text = row["moe_load_vision"], row["moe_load_text"]
    assert len(vision) == len(text) == 1 and len(vision[0]) == 4  # one MoE layer of 4 experts
    # vision assignments: the msm pass sends 8 images x (1 + 16 * 0.25) tokens x top-2; itc_itm's image pass
    # sends 8 x 17 x 2 and its ITM pass 3 x 8 image+text pairs; text tokens never count as vision
    assert sum(vision[0]) == 8 * 5 * 2 + 8 * 17 * 2 * (1 + 3)


def test_ddp_two_processes_gloo_end_with_identical_parameters(small_world, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path),
           *run_flags(small_world, tmp_path / "run", "--max-steps", "3", "--batch-size", "4", "--objective", "msm+itc_itm")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(v, r1[k]) for k, v in r0.items())
    first = torch.load(tmp_path / "run" / "ckpt_0000003.pt", weights_only=True)
    assert len(first["rng"]) == 2  # each rank's RNG state, for an exact resume
    for rank in (0, 1):  # the process group's threads are gone when main() returns (alive at exit, they can abort it)
        before, after = (tmp_path / f"threads{rank}").read_text().split()
        assert after == before


def test_default_command_reduced(tmp_path):
    """`python pretrain.py` as the README runs it, for 2 steps: it makes the shapes world and a checkpoint."""
    cmd = [sys.executable, "pretrain.py", "--max-steps", "2", "--data-dir", str(tmp_path / "shapes"),
           "--out-dir", str(tmp_path / "run"), "--num-workers", "0"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "activated per token" in done.stdout and (tmp_path / "run" / "last.pt").exists()
    assert (tmp_path / "shapes" / "manifest.json").exists() and (tmp_path / "run" / "recon_0000002.png").exists()


def test_flags_come_from_the_dataclasses():
    args = pretrain.parse_args(["--no-modality-routing", "--top-ffn", "dense", "--num-experts", "4", "--lr", "0.1"])
    assert args.modality_routing is False and args.top_ffn == "dense" and args.num_experts == 4 and args.lr == 0.1
    assert "top_k" not in vars(args)  # a model flag not given is absent: the preset's value stays
    helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(pretrain.TrainConfig)}
    assert helps["objective"].startswith("msm")
