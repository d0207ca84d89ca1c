"""Outputs: probed before the work, a write failure after it never loses the record, no temp litter, and every
writer honours the umask. Root is the case that matters (CI, containers): ``os.access`` is always true for it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clipguard import fsutil
from clipguard.errors import ClipguardError


def _no_load(monkeypatch):
    import clipguard.models.loader as loader

    monkeypatch.setattr(loader, "load_clip", lambda *a, **k: pytest.fail("loaded before checking the outputs"))


# ---------------------------------------------------------------- 1. checked for real, before any work


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc (no file can be made there)")
def test_an_unwritable_out_fails_in_a_second_before_any_work(cli, monkeypatch):
    """The old check asked os.access, which says yes to root for /proc: the run attacked, then died writing."""
    _no_load(monkeypatch)
    t0 = time.perf_counter()
    code, _, err = cli("eval", "--model", "toy", "--dataset", "toy", "--attack", "pgd", "--steps", "50",
                       "--out", "/proc/nope/r.json", "--device", "cpu")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--out '/proc/nope/r.json' cannot be written" in err
    assert time.perf_counter() - t0 < 2


@pytest.mark.parametrize("option", ["--predictions", "--out"])
def test_a_read_only_folder_is_refused_even_for_root(cli, monkeypatch, tmp_path, option):
    """A failing probe (as on a read-only mount, or /proc) refuses the option, whatever the permission bits say."""
    _no_load(monkeypatch)
    real = fsutil._new_temp

    def new_temp(p: Path) -> str:
        if p.parent == tmp_path / "ro":
            raise OSError(30, "Read-only file system")
        return real(p)

    monkeypatch.setattr(fsutil, "_new_temp", new_temp)
    code, _, err = cli("eval", "--model", "toy", "--dataset", "toy", option, tmp_path / "ro" / "x.csv")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Read-only file system" in err and option in err
    assert not (tmp_path / "ro").exists()  # the folder the check made is gone again


def test_a_writable_path_gets_its_folder_and_no_probe_is_left(tmp_path):
    target = tmp_path / "new" / "deeper" / "r.json"
    assert fsutil.check_writable(target, "--out") == [target.parent, target.parent.parent]
    assert target.parent.is_dir() and list(target.parent.iterdir()) == []
    fsutil.check_writable(tmp_path / "png", "--png", directory=True)
    assert list((tmp_path / "png").iterdir()) == []


def test_a_refused_option_takes_back_the_folders_earlier_options_made(cli, monkeypatch, tmp_path):
    _no_load(monkeypatch)
    (tmp_path / "file").write_text("")
    code, _, err = cli("attack", "--model", "toy", "--dataset", "toy", "--out", tmp_path / "made" / "r.json",
                       "--adv-set", tmp_path / "file" / "a.safetensors")
    assert code == 2 and "is a file, not a folder" in err
    assert not (tmp_path / "made").exists()


# ---------------------------------------------------------------- 2. a failure after the work keeps the record


def _record() -> dict:
    return {"schema": "clipguard.result/1", "task": "zeroshot_classification", "metrics": {"acc1": 0.75}}


def _fake_eval(monkeypatch, during=None):
    import clipguard.tasks.eval as task

    def run_eval(cfg, *, progress):
        if during:
            during()
        return _record()

    monkeypatch.setattr(task, "run_eval", run_eval)


def test_out_folder_replaced_during_the_run_sends_the_record_to_a_named_fallback(cli, monkeypatch, tmp_path):
    import shutil

    out = tmp_path / "results"
    monkeypatch.chdir(tmp_path)

    def replace_folder():  # the folder is removed and something else takes its name: no record can go there
        shutil.rmtree(out)
        out.write_text("not a folder")

    _fake_eval(monkeypatch, replace_folder)
    code, stdout, err = cli("eval", "--model", "toy", "--dataset", "toy", "--out", out / "r.json", "--json")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--out" in err, err
    saved = Path(err.split("the record was saved to '")[1].split("'")[0])
    assert saved.parent == tmp_path and saved.name.startswith("clipguard-record-")
    rec = json.loads(saved.read_text())
    assert rec["metrics"] == {"acc1": 0.75} and "could not be written" in rec["output_errors"][0]
    assert json.loads(stdout)["metrics"] == {"acc1": 0.75}


def test_out_folder_removed_during_the_run_is_made_again(cli, monkeypatch, tmp_path):
    """The twin: a folder that is merely gone is recreated, the record lands where it was asked for, exit 0."""
    import shutil

    out = tmp_path / "results"
    monkeypatch.chdir(tmp_path)
    _fake_eval(monkeypatch, lambda: shutil.rmtree(out))
    code, _, err = cli("eval", "--model", "toy", "--dataset", "toy", "--out", out / "r.json", "--json")
    assert code == 0, err
    assert json.loads((out / "r.json").read_text()) == _record()
    assert not list(tmp_path.glob("clipguard-record-*"))


def _disk_full_under(monkeypatch, folder: Path):
    """``os.replace`` onto anything in ``folder`` fails as a full disk would; other disks still work."""
    real = os.replace

    def replace(src, dst):
        if Path(dst).parent == folder:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", replace)


def test_a_full_disk_at_out_falls_back_and_without_any_fallback_prints_the_record(cli, monkeypatch, tmp_path):
    out = tmp_path / "results"
    monkeypatch.chdir(tmp_path)
    _fake_eval(monkeypatch)
    _disk_full_under(monkeypatch, out)
    code, _, err = cli("eval", "--model", "toy", "--dataset", "toy", "--out", out / "r.json", "--json")
    assert code == 2 and "No space left on device" in err and str(tmp_path / "clipguard-record-") in err
    monkeypatch.setattr(fsutil, "save_fallback", lambda *a, **k: None)  # no fallback anywhere: stdout holds it
    code, stdout, err = cli("eval", "--model", "toy", "--dataset", "toy", "--out", out / "r.json")
    assert code == 2 and "the record is printed above" in err and len(err.strip().splitlines()) == 1
    assert json.loads(stdout)["metrics"] == {"acc1": 0.75}


@pytest.mark.usefixtures("one_thread")
def test_an_adversarial_set_that_cannot_be_written_costs_the_set_not_the_record(cli, monkeypatch, tmp_path):
    """A real toy attack; safetensors reports the full disk as its own error ('... (os error 28)')."""
    from safetensors import SafetensorError
    from safetensors import torch as st

    real = st.save_file

    def save_file(tensors, path, metadata=None):
        if Path(path).parent == tmp_path / "sets":
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(st, "save_file", save_file)
    adv, out = tmp_path / "sets" / "a.safetensors", tmp_path / "r.json"
    code, _, err = cli("attack", "--model", "toy", "--dataset", "toy", "--limit", "8", "--steps", "2", "--device",
                       "cpu", "--adv-set", adv, "--out", out, "--json")  # --json: no progress bar on stderr
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--adv-set '{adv}'" in err and "No space left on device" in err and f"saved to '{out}'" in err
    rec = json.loads(out.read_text())
    assert "robust_acc" in rec["metrics"] and "--adv-set" in rec["output_errors"][0]
    assert list((tmp_path / "sets").iterdir()) == []  # no set, no temp file


def test_outside_a_command_a_failed_product_raises_at_once(tmp_path, monkeypatch):
    """The Python API (and a bench worker) has no emit to report a held failure: nothing is held there."""
    from clipguard.attacks.advset import save_adv_set

    fsutil.check_writable(tmp_path / "a.safetensors", "--adv-set")
    _disk_full_under(monkeypatch, tmp_path)
    with pytest.raises(ClipguardError, match="--adv-set .*the adversarial set could not be written"):
        save_adv_set(tmp_path / "a.safetensors", torch.zeros(1, 3, 2, 2), torch.zeros(1), {})


def test_a_held_failure_keeps_a_suite_cell_undone(tmp_path, monkeypatch):
    """write_record (a bench cell's writer) sends the record to the fallback, not to its path: not counted done."""
    from clipguard.records.predictions import write_predictions
    from clipguard.records.schema import write_record

    monkeypatch.chdir(tmp_path)
    (tmp_path / "p").mkdir()
    _disk_full_under(monkeypatch, tmp_path / "p")
    with fsutil.holding_write_failures():
        fsutil.check_writable(tmp_path / "p" / "preds.csv", "--predictions")
        assert write_predictions(tmp_path / "p" / "preds.csv", {"index": [0]}) is None  # held
        with pytest.raises(ClipguardError, match="--predictions .*saved to") as e:
            write_record(tmp_path / "records" / "cell.json", _record())
    assert not (tmp_path / "records" / "cell.json").exists()
    saved = Path(str(e.value).split("saved to '")[1].split("'")[0])
    assert json.loads(saved.read_text())["metrics"] == {"acc1": 0.75}


def test_a_held_failure_nobody_reported_ends_the_command_with_exit_2(tmp_path, monkeypatch):
    _disk_full_under(monkeypatch, tmp_path)
    fsutil.check_writable(tmp_path / "p.csv", "--predictions")
    with pytest.raises(ClipguardError, match="--predictions"), fsutil.holding_write_failures():
        with fsutil.writing_output(tmp_path / "p.csv", "the predictions", hold=True):
            fsutil.atomic_write_text(tmp_path / "p.csv", "x")
        raise SystemExit(0)  # Typer's end of a command that "succeeded"


def test_a_checkpoint_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """torch.save reports a full disk as 'unexpected pos' (a RuntimeError over the file's OSError)."""
    import io

    import clipguard.finetune.checkpoint as checkpoint

    class FullDisk(io.FileIO):
        def write(self, b):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "open", lambda path, mode: FullDisk(path, mode), raising=False)
    with pytest.raises(ClipguardError, match="step-3 checkpoint could not be written .No space left on device"):
        _state().to_disk(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no temp file left, no summary for a checkpoint that is not there


def test_only_io_failures_become_write_errors():
    with pytest.raises(ValueError), fsutil.writing_output("x", "it"):
        try:
            raise OSError(2, "gone")
        except OSError:
            raise ValueError("a bug met while handling an OSError") from None


# ---------------------------------------------------------------- 3. stale temp files


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _temp(target: Path, pid: int, owner: str | None = None, age_s: float = 0) -> Path:
    t = target.parent / f".{target.name}.{pid}-{owner or fsutil._owner()}.{os.urandom(6).hex()}.tmp"
    t.write_bytes(b"half")
    os.utime(t, (time.time() - age_s,) * 2)
    return t


def test_a_write_removes_stale_temps_and_keeps_a_live_writers(tmp_path):
    target = tmp_path / "r.json"
    stale = [_temp(target, _dead_pid()),  # a killed writer on this host
             _temp(target, 1, "abcdef", age_s=2 * fsutil.STALE_AFTER_S),  # another host's, long untouched
             target.parent / f".{target.name}.{os.urandom(6).hex()}.tmp"]  # the old name, long untouched
    stale[-1].write_bytes(b"")
    os.utime(stale[-1], (time.time() - 2 * fsutil.STALE_AFTER_S,) * 2)
    live = [_temp(target, os.getppid()),  # a concurrent writer, alive
            _temp(target, 1, "abcdef"),  # another host's, fresh: it may be writing now
            _temp(tmp_path / "other.json", _dead_pid())]  # another target's: not this writer's business
    fsutil.atomic_write_json(target, {"a": 1})
    assert not any(t.exists() for t in stale) and all(t.exists() for t in live)


def _state():
    from clipguard.finetune.checkpoint import TrainState

    return TrainState(step=3, epoch=0, position=3, order=torch.arange(4), trainable={"w": torch.ones(2)},
                      optimizer={}, scheduler={}, rng={"torch": torch.get_rng_state(), "cuda": []}, config={},
                      config_hash="h", loss=0.5)


def test_resume_removes_the_temp_a_killed_checkpoint_write_left(tmp_path):
    from clipguard.finetune.checkpoint import CHECKPOINT, TrainState

    _state().to_disk(tmp_path)
    # a checkpoint write killed -9 halfway (a real kill of a real writer process)
    code = ("import os, signal, sys; from clipguard.fsutil import atomic_write\n"
            "def half(tmp):\n    open(tmp, 'wb').write(b'PK half a checkpoint'); os.kill(os.getpid(), signal.SIGKILL)\n"
            "atomic_write(sys.argv[1], half)")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / CHECKPOINT)], timeout=60)
    assert run.returncode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    live = _temp(tmp_path / CHECKPOINT, os.getppid())
    assert len(left) == 1
    loaded = TrainState.from_disk(tmp_path)
    assert loaded.step == 3 and torch.equal(loaded.trainable["w"], torch.ones(2))
    assert not left[0].exists() and live.exists()


# ---------------------------------------------------------------- 4. the umask, for every writer


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_writer_honours_the_umask(tmp_path, toy_clip, umask):
    """safetensors renames a 0600 file of its own onto the temp path: sets, UAPs, adapters came out 0600."""
    from clipguard.attacks.advset import save_adv_set
    from clipguard.models.adapters import save_adapter
    from clipguard.models.vpt import PromptedVisual
    from clipguard.uap.file import UAPFile

    old = os.umask(umask)
    try:
        save_adv_set(tmp_path / "adv.safetensors", torch.zeros(1, 3, 2, 2), torch.zeros(1), {})
        UAPFile(torch.zeros(1, 3, 2, 2), {"attack": {"eps": {"value": 0.1}, "norm": "linf"}}).to_disk(
            tmp_path / "uap.safetensors")
        save_adapter(tmp_path / "adapter", PromptedVisual(toy_clip.model.visual, 2), method="vpt", clip=toy_clip)
        _state().to_disk(tmp_path / "run")
        fsutil.atomic_write_json(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) == 7  # adv, uap, adapter weights + manifest, checkpoint + summary, record
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}
