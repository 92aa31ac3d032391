"""Shared fixtures: reference files from ../shared, generated tiny checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOKENIZER_DIR = SHARED / "glm4-tokenizer"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"reference material not found at {SHARED} (CI provides ../shared next to the checkout)")
    return SHARED


@pytest.fixture(scope="session")
def real_tokenizer_dir(shared_dir: Path) -> Path:
    return shared_dir / "glm4-tokenizer"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset, original layout, 2 shards, byte-level tokenizer (what the demo and pipeline use)."""
    from glm4.tools.make_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0, num_shards=2,
                           dtype="float32")
