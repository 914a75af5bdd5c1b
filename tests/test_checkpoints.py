"""Checkpoints run no code (issue 32): every checkpoint is read with torch.load(weights_only=True) through
checkpoints.read_checkpoint; what pretrain.py and finetune.py write, and the released EVE format, load that way;
a file carrying a pickled callable is refused with one line and nothing in it runs."""
import argparse
import ast
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoints
import evaluate
import finetune
import official
import pretrain
from conftest import ROOT, TINY_MODEL_FLAGS
from test_official import official_state_dict

REFUSED = "holds Python objects other than tensors and plain data"


class Payload:
    """What a malicious checkpoint carries: unpickling it calls exec(code), which here writes `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def bad_checkpoint(path, marker, **save_kw):
    """A file that looks like one of ours (tensors, a step) with the payload beside them."""
    torch.save({"model": {"w": torch.zeros(2)}, "step": 1, "extra": Payload(marker)}, path, **save_kw)
    return path


def world_flags(world):
    return ["--train-json", str(world["pretrain"]), "--image-root", str(world["root"]), "--vocab", str(world["vocab"])]


def finetune_flags(world):
    return [str(a) for a in ["--task", "vqa", "--image-root", world["root"], "--answer-list", world["answer_list"],
                             "--vocab", world["vocab"], *TINY_MODEL_FLAGS, "--batch-size", "8", "--num-workers", "0",
                             "--max-steps", "1", "--min-answer-count", "1"] + [
        x for split in ("train", "val", "test") for x in (f"--{split}-json", world[f"vqa_{split}"])]]


def test_the_payload_runs_when_loaded_unsafely(tmp_path):
    """The control: the same file read with weights_only=False does run its code, so the refusals below mean something."""
    marker = tmp_path / "marker"
    torch.load(bad_checkpoint(tmp_path / "bad.pt", marker), weights_only=False)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("legacy,name", [(False, "builtins.exec"), (True, "exec")])  # legacy: torch's message names it
def test_read_checkpoint_refuses_a_pickled_callable(tmp_path, legacy, name):
    marker = tmp_path / "marker"
    path = bad_checkpoint(tmp_path / "bad.pt", marker, **({"_use_new_zipfile_serialization": False} if legacy else {}))
    with pytest.raises(checkpoints.UnsafeCheckpoint) as e:
        checkpoints.read_checkpoint(path)
    line = str(e.value)
    assert line.startswith(f"{path} {REFUSED} ({name})") and "\n" not in line
    assert not marker.exists()


def test_every_entry_refuses_it_with_one_line(small_world, tmp_path):
    """finetune.py --init, pretrain.py --resume PATH and --resume auto, evaluate.py --checkpoint: one line, no run."""
    marker = tmp_path / "marker"
    bad = bad_checkpoint(tmp_path / "bad.pt", marker)
    out = tmp_path / "run"
    out.mkdir()
    bad_checkpoint(out / "last.pt", marker)
    calls = [lambda: finetune.main(finetune_flags(small_world) + ["--init", str(bad), "--out-dir", str(tmp_path / "ft")]),
             lambda: pretrain.main(world_flags(small_world) + [*TINY_MODEL_FLAGS, "--out-dir", str(tmp_path / "p"),
                                                               "--resume", str(bad)]),
             # auto stops at a refused last.pt instead of trying older checkpoints around it
             lambda: pretrain.main(world_flags(small_world) + [*TINY_MODEL_FLAGS, "--out-dir", str(out), "--resume", "auto"]),
             lambda: evaluate.main(["--task", "vqa", "--checkpoint", str(bad)])]
    for call in calls:
        with pytest.raises(SystemExit) as e:
            call()
        assert str(e.value).startswith("error: ") and REFUSED in str(e.value) and "\n" not in str(e.value)
        assert "bad.pt" in str(e.value) or str(out / "last.pt") in str(e.value)
    assert not marker.exists()


def test_the_command_line_prints_one_line(tmp_path):
    marker = tmp_path / "marker"
    bad = bad_checkpoint(tmp_path / "bad.pt", marker)
    done = subprocess.run([sys.executable, "evaluate.py", "--task", "vqa", "--checkpoint", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"error: {bad} {REFUSED} (builtins.exec); refused without running them "
                                                "(see docs/ROBUSTNESS.md, safe loading)"]
    assert not marker.exists()


def test_rng_states_survive_a_safe_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # a cached Gaussian: numpy's state holds it too
    name, key, *rest = np.random.get_state()  # numpy's own record of its state, to compare with the restored one
    state = checkpoints.rng_state()
    want = (random.random(), np.random.standard_normal(3).tolist(), np.random.randint(1 << 30), torch.rand(3))
    checkpoints.atomic_save({"rng": [state]}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"][0]
    checkpoints.set_rng_state(loaded)
    restored = np.random.get_state()
    assert restored[0] == name and np.array_equal(restored[1], key) and list(restored[2:]) == rest and rest[1] == 1
    got = (random.random(), np.random.standard_normal(3).tolist(), np.random.randint(1 << 30), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])


def test_what_the_scripts_write_loads_safely(small_world, tmp_path):
    """Every file a short pretrain.py run and a finetune.py --init run from it write, read with weights_only=True."""
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    pretrain.main(world_flags(small_world) + [*TINY_MODEL_FLAGS, "--out-dir", str(pre), "--batch-size", "8",
                                              "--num-workers", "0", "--max-steps", "1"])
    finetune.main(finetune_flags(small_world) + ["--init", str(pre / "last.pt"), "--out-dir", str(ft)])
    files = sorted(pre.glob("*.pt")) + sorted(ft.glob("*.pt"))
    assert [f.name for f in files] == ["ckpt_0000001.pt", "last.pt", "best.pt", "ckpt_0000001.pt", "last.pt"]
    for f in files:
        ckpt = torch.load(f, weights_only=True)
        assert ckpt["step"] >= 1 and ckpt["model"] and ckpt["vocab"] == torch.load(pre / "last.pt", weights_only=True)["vocab"]
    last = torch.load(ft / "last.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng", "config", "finetune_config", "answers", "best"} <= set(last)
    assert isinstance(last["rng"][0]["numpy"][1], torch.Tensor)


def released_config():
    """What official EVE's fine-tuning scripts store beside the weights: their YAML config, read into plain data."""
    return {"train_file": ["data/finetune/vqa_train.json"], "image_res": 480, "patch_size": 16, "use_roberta": False,
            "optimizer": {"opt": "adamW", "lr": 3e-5, "weight_decay": 0.01, "lr_mult": 10},
            "accelerator": {"FP16_LOSS_SCALE": None, "CLIP_GRAD_NORM": 3.0}, "pad_token_id": 1, "eos": "</s>"}


def test_released_checkpoints_load_safely(tmp_path):
    """The released format ({'model': tensors, 'config': YAML data}) loads; a file that also holds, say, an
    argparse.Namespace is refused with its name (no type beyond torch's own list is let through)."""
    sd = official_state_dict()
    torch.save({"model": sd, "config": released_config()}, tmp_path / "eve.th")
    ckpt = checkpoints.read_checkpoint(tmp_path / "eve.th")
    assert ckpt["config"] == released_config() and official.state_dict_of(ckpt).keys() == sd.keys()
    assert official.official_config(official.state_dict_of(ckpt), heads=4).dim == 32
    torch.save({"model": sd, "args": argparse.Namespace(lr=3e-5)}, tmp_path / "eve_args.th")
    with pytest.raises(checkpoints.UnsafeCheckpoint, match=r"eve_args\.th holds .* \(argparse\.Namespace\)"):
        checkpoints.read_checkpoint(tmp_path / "eve_args.th")


def test_one_loader_reads_every_checkpoint():
    """No torch.load call outside checkpoints.read_checkpoint (the tests may read files directly)."""
    calls = []
    for p in sorted(ROOT.glob("*.py")):
        tree = ast.parse(p.read_text())
        functions = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)]
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and ast.unparse(call.func) in ("torch.load", "load"):
                inside = [f.name for f in functions if f.lineno <= call.lineno <= f.end_lineno]
                calls.append((p.name, inside, ast.unparse(call)))
    assert calls == [("checkpoints.py", ["read_checkpoint"], "torch.load(path, map_location=map_location, weights_only=True)")]
