"""Run by tests/test_pretrain.py under torchrun: pre-train, then save this rank's parameters."""
import os
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pretrain  # noqa: E402


def native_threads():
    """Threads of this process that Python's threading module did not start (Gloo's workers, for one)."""
    return len(os.listdir("/proc/self/task")) - threading.active_count()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))  # for tests that kill one rank
    before = native_threads()
    model = pretrain.main(sys.argv[2:])
    # main() must leave no process-group thread behind: one alive at exit can abort the process
    (out / f"threads{os.environ['RANK']}").write_text(f"{before} {native_threads()}")
    torch.save(model.state_dict(), out / f"rank{os.environ['RANK']}.pt")
