"""Shared fixtures. Everything is offline, CPU-only and written under pytest's tmp paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, Path(__file__).resolve().parent):  # the package imports from the repository root
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# Another process may be using the CPU: one thread per test run keeps timings predictable.
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import tiny_datamodule  # noqa: E402


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A data_dir holding the tiny dataset (4 maps x 10 episodes), built once per session.
    Tests must not modify it."""
    root = tmp_path_factory.mktemp("data")
    tiny_datamodule(root).prepare_data()
    return root
