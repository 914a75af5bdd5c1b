"""Run by tests/test_pretrain.py under torchrun: pre-train, then save this rank's parameters."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pretrain  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))  # for tests that kill one rank
    model = pretrain.main(sys.argv[2:])
    torch.save(model.state_dict(), out / f"rank{os.environ['RANK']}.pt")
