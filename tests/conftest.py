import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shapes  # noqa: E402
import tokenization  # noqa: E402


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """A small shapes world shared by the training tests (seconds to make)."""
    root = tmp_path_factory.mktemp("world")
    return shapes.make_shapes_world(root, n_train=48, n_val=8, n_test=8, nlvr2_per_split=(16, 8, 8))


# a model small enough for many steps per second: flags for pretrain.py / finetune.py
TINY_MODEL_FLAGS = ["--preset", "micro"]

# a hand-made WordPiece vocabulary for tokenizer and collate tests (ids are list positions)
VOCAB = list(tokenization.SPECIALS) + ["hello", "world", ",", "!", "'", "don", "t", "un", "##aff", "##able", "creme",
                                       "brulee", "the", "a", "##b", "中", "国", "hel", "##lo"]
