"""Shared fixtures. Tests run offline on the toy world; the text-embedding cache lives in a temp dir."""

from __future__ import annotations

import os
import tempfile

import pytest

# Never touch the user's cache or the network from tests.
os.environ.setdefault("CLIPGUARD_CACHE", tempfile.mkdtemp(prefix="clipguard-test-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def toy_clip():
    from clipguard.models.loader import load_clip

    return load_clip("toy", device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def toy_prepared():
    """Toy CLIP + toy test split (first 300, stratified) + classifier, shared read-only."""
    from clipguard.run_options import RunOptions
    from clipguard.tasks.prepare import prepare

    return prepare(RunOptions(model="toy", dataset="toy", split="test", limit=300, device="cpu", precision="fp32"))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty text-embedding cache for this test only."""
    monkeypatch.setenv("CLIPGUARD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def cli(capsys):
    """Run the clipguard CLI in-process: returns (exit_code, stdout, stderr)."""
    from clipguard.cli.app import run

    def _run(*args: str):
        code = run([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run
