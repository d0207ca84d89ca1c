"""Shared fixtures. Tests run offline on the toy world; the text-embedding cache lives in a temp dir."""

from __future__ import annotations

import os
import tempfile

import pytest

# Never touch the user's cache or the network from tests.
os.environ.setdefault("CLIPGUARD_CACHE", tempfile.mkdtemp(prefix="clipguard-test-cache-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"


def _robust_never_above_clean(make_record):
    """Every record the tests produce obeys RobustBench's accounting: robust accuracy <= clean accuracy (only
    clean-correct images can be robust). Wraps the one record constructor before any task module imports it."""
    def checked(task, *, metrics, **kw):
        clean = metrics.get("acc1")
        for entry in metrics.get("robust", []) + ([metrics] if "robust_acc" in metrics else []):
            assert clean is None or entry["robust_acc"] <= clean + 1e-9, (task, entry["robust_acc"], clean)
        return make_record(task, metrics=metrics, **kw)
    return checked


import clipguard.records.schema as _schema  # noqa: E402

_schema.make_record = _robust_never_above_clean(_schema.make_record)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run where CUDA is present (a GPU machine: ``pytest -m gpu``) and are skipped here."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device, and this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny toy models on a shared 2-core machine: two OpenMP threads make every small op wait on a descheduled
    thread (measured 10-100x slower under load: 0.25 s vs 10 s for 10 PGD steps); one thread is as fast when
    idle. Modules of toy-scale training and attacks use it via ``pytestmark``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The session's shared models, by fixture name: (the module whose layout must not change, its parameter names).
_SHARED: dict[str, tuple] = {}


def _layout(module) -> tuple[str, ...]:
    return tuple(name for name, _ in module.named_parameters())


@pytest.fixture(scope="session")
def toy_clip():
    from clipguard.models.loader import load_clip

    clip = load_clip("toy", device="cpu", precision="fp32")
    _SHARED["toy_clip"] = (clip.model, _layout(clip.model))
    return clip


@pytest.fixture(scope="session")
def toy_prepared():
    """Toy CLIP + toy test split (first 300, stratified) + classifier, shared read-only."""
    from clipguard.run_options import RunOptions
    from clipguard.tasks.setup import prepare

    prepared = prepare(RunOptions(model="toy", dataset="toy", split="test", limit=300, device="cpu", precision="fp32"))
    _SHARED["toy_prepared"] = (prepared.classifier, _layout(prepared.classifier))
    return prepared


@pytest.fixture(autouse=True)
def _shared_models_keep_their_layout():
    """A test that wraps a shared model in place (a shallow ``copy.copy`` of a module shares its ``_modules``, so
    setting ``.visual`` on the copy sets it on the original) fails here, not in whichever test the same worker
    happens to run next."""
    yield
    for name, (module, layout) in _SHARED.items():
        assert _layout(module) == layout, f"this test changed the layout of the session fixture {name!r}"


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty text-embedding cache for this test only."""
    monkeypatch.setenv("CLIPGUARD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def kill_at_checkpoint(monkeypatch):
    """``arm(step)``: the next fine-tuning run dies right after writing its checkpoint at ``step`` (the state a
    kill -9 leaves on disk); returns the exception class it dies with. ``monkeypatch.undo()`` disarms."""
    from clipguard.finetune.checkpoint import TrainState

    class Killed(Exception):
        pass

    real = TrainState.to_disk

    def arm(step: int) -> type[Exception]:
        def to_disk(self, run_dir):
            path = real(self, run_dir)
            if self.step == step:
                raise Killed
            return path

        monkeypatch.setattr(TrainState, "to_disk", to_disk)
        return Killed

    return arm


@pytest.fixture
def fake_task(monkeypatch):
    """``seen = arm(module, name, record)``: the task function ``module.name`` (e.g. ``run_certify``) becomes a
    recorder of what the command handed it (``seen["cfg"]``, ``seen["progress"]``) that returns ``record`` (default:
    a minimal result record), so a CLI test checks the option parsing without running the task."""
    def arm(module, name: str, record: dict | None = None) -> dict:
        seen = {}

        def fake(cfg, *, progress):
            seen["cfg"], seen["progress"] = cfg, progress
            return record if record is not None else {"schema": "clipguard.result/1"}

        monkeypatch.setattr(module, name, fake)
        return seen

    return arm


@pytest.fixture
def cli(capsys):
    """Run the clipguard CLI in-process: returns (exit_code, stdout, stderr)."""
    from clipguard.cli.app import run

    def _run(*args: str):
        code = run([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return _run


@pytest.fixture(scope="session")
def write_shards():
    """``write(folder, pictures, labels, shards=2)``: PIL pictures and int labels as CLIP_benchmark WebDataset
    shards (``folder/0.tar`` ... with PNG images and ``cls``) plus ``nshards.txt``."""
    def write(folder, pictures, labels, shards: int = 2) -> None:
        import io

        import webdataset as wds

        folder.mkdir(parents=True, exist_ok=True)
        n = len(pictures)
        for s in range(shards):
            with wds.TarWriter(str(folder / f"{s}.tar")) as w:
                for k in range(s * n // shards, (s + 1) * n // shards):
                    buf = io.BytesIO()
                    pictures[k].save(buf, format="PNG")
                    w.write({"__key__": f"s{k:04d}", "png": buf.getvalue(), "cls": int(labels[k])})
        (folder / "nshards.txt").write_text(f"{shards}\n")

    return write
