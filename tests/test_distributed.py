"""Every command under ``torchrun --nproc-per-node 2`` (gloo on CPU) against one process, on the toy world.

The torchrun runs are real: two processes, a process group, the collectives. Each one costs a few seconds of
start-up, so the module shares its runs through module-scoped fixtures.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

EVAL = ["--model", "toy", "--dataset", "toy", "--limit", "300", "--batch-size", "64", "--device", "cpu"]
PGD = ["--attack", "pgd", "--eps", "8/255", "--steps", "5"]
UAP = ["uap", "fit", "--model", "toy", "--dataset", "toy", "--split", "train", "--limit", "512", "--eps", "8/255",
       "--epochs", "3", "--target-fooling", "1.0", "--device", "cpu", "--json"]
# LoRA-TeCoA: 1 process x 64 images against 2 x 32 (the same global batch); 48 optimizer steps.
FINETUNE = ["finetune", "--model", "toy", "--dataset", "toy", "--limit", "1024", "--eps", "4/255", "--epochs", "3",
            "--lr", "1e-2", "--method", "lora", "--objective", "tecoa", "--eval-limit", "300",
            "--eval-batch-size", "100", "--device", "cpu", "--save-every", "4", "--json"]


def torchrun_cmd(*args, n: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
            "-m", "clipguard.cli.app", *map(str, args)]


def torchrun(*args, n: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    p = subprocess.run(torchrun_cmd(*args, n=n), capture_output=True, text=True, timeout=timeout)
    return p


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def one(cli, *args) -> str:
    code, out, err = cli(*args)
    assert code == 0, err
    return out


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def without_timings(metrics: dict) -> dict:
    return {**metrics, "robust": [{k: v for k, v in e.items() if k not in ("images_per_s", "wall_s")}
                                  for e in metrics["robust"]]}


# ---------------------------------------------------------------------------------------------- sharding


def test_batch_ranges_cover_every_image_once_in_whole_batches(monkeypatch):
    from clipguard.distributed import batch_range

    for n, bs, w in [(300, 64, 2), (10, 4, 3), (5, 64, 2), (0, 8, 2), (1000, 100, 4), (7, 1, 8)]:
        monkeypatch.setenv("WORLD_SIZE", str(w))
        parts = []
        for r in range(w):
            monkeypatch.setenv("RANK", str(r))
            parts.append(batch_range(n, bs))
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))  # contiguous, in rank order
        assert all(start % bs == 0 for start, _ in parts)  # every rank starts on a single process's batch
        sizes = [stop - start for start, stop in parts]
        assert sum(sizes) == n and max(sizes) - min(sizes) <= bs  # no image twice, no padding


def test_random_starts_matter_here(toy_prepared):
    """The twin of the equality tests below: on these images PGD's random start changes some predictions, so
    equal predictions under torchrun mean the ranks drew exactly the single process's random starts."""
    from clipguard.attacks.registry import AttackConfig
    from clipguard.attacks.runner import run_attack
    from clipguard.specs import parse_eps

    p = toy_prepared
    runs = [run_attack(p.classifier, p.data.images, p.data.labels,
                       AttackConfig("pgd", parse_eps("8/255"), steps=5, seed=seed), batch_size=64, progress=False)
            for seed in (0, 1)]
    assert not torch.equal(runs[0].adv_pred, runs[1].adv_pred)


# ------------------------------------------------------------------------------------------ eval / attack


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval2")
    p = ok(torchrun("eval", *EVAL, *PGD, "--predictions", d / "two.csv", "--out", d / "two.json"))
    return d, p


def test_torchrun_eval_pgd_gives_one_process_predictions_and_counts(eval_runs, cli, tmp_path):
    d, p = eval_runs
    one(cli, "eval", *EVAL, *PGD, "--predictions", tmp_path / "one.csv", "--out", tmp_path / "one.json")
    a, b = (json.loads(f.read_text()) for f in (tmp_path / "one.json", d / "two.json"))
    assert rows(tmp_path / "one.csv") == rows(d / "two.csv")  # image by image, in dataset order
    assert without_timings(a["metrics"]) == without_timings(b["metrics"])
    assert [c["passed"] for c in a["checks"]] == [c["passed"] for c in b["checks"]]
    assert b["environment"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert a["environment"]["distributed"]["world_size"] == 1
    assert p.stdout.count("robust accuracy") == 1  # one table: rank 0 prints, rank 1 does not


def test_torchrun_attack_writes_the_one_process_set_once(cli, tmp_path):
    from clipguard.attacks.advset import load_adv_set

    args = ["attack", *EVAL, "--attack", "pgd", "--eps", "8/255", "--steps", "3", "--json"]
    one(cli, *args, "--adv-set", tmp_path / "one.safetensors")
    ok(torchrun(*args, "--adv-set", tmp_path / "two.safetensors"))
    a, b = load_adv_set(tmp_path / "one.safetensors"), load_adv_set(tmp_path / "two.safetensors")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.manifest["images_digest"] == b.manifest["images_digest"]


def test_an_error_on_one_rank_is_printed_by_that_rank(tmp_path):
    """A file only rank 1 reads does not decode: rank 1 names itself and the problem in one line, no traceback;
    rank 0, whose gather breaks, ends with the same line (unless torchrun has stopped it first)."""
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.new("RGB", (40, 40), (60 * i, 100, 200 if c == "dog" else 0)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "4.png").write_bytes(b"not a png")  # the last image: in rank 1's batches
    p = torchrun("eval", "--model", "toy", "--dataset", f"imagefolder:{tmp_path}", "--batch-size", "3",
                 "--data-mode", "stream", "--workers", "0", "--device", "cpu")
    errors = [line for line in p.stderr.splitlines() if line.startswith("Error")]
    assert p.returncode != 0 and len(errors) in (1, 2) and len(set(errors)) == 1, p.stderr[-3000:]
    assert errors[0].startswith("Error (rank 1 of 2): cannot read an image"), errors
    assert p.stderr.count("Traceback (most recent call last)") == 1  # torchrun's own report; none from a rank


# --------------------------------------------------------------------------------------------------- uap


def test_torchrun_sgd_uap_fools_as_one_process(cli, tmp_path):
    a = json.loads(one(cli, *UAP, "--batch-size", "64", "--uap", tmp_path / "one.safetensors"))
    b = json.loads(ok(torchrun(*UAP, "--batch-size", "32", "--uap", tmp_path / "two.safetensors")).stdout)
    assert abs(a["metrics"]["fooling_rate"] - b["metrics"]["fooling_rate"]) <= 0.02
    assert b["metrics"]["fooling_rate"] > 0.1  # it did fit something
    assert b["environment"]["distributed"]["world_size"] == 2


def test_an_option_error_before_the_ranks_start_is_printed_by_rank_0_only(cli, tmp_path, monkeypatch):
    """Every rank meets an option error alike, before any process group exists: rank 0 prints the one line, the
    others print nothing (their exit code says it); deepfool UAP fitting refuses more than one process."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, out, err = cli(*UAP, "--method", "deepfool", "--uap", tmp_path / "x.safetensors")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: --method deepfool fits on one process")
    monkeypatch.setattr("clipguard.cli.app.time.sleep", lambda s: None)  # rank 1 waits for rank 0 to speak
    monkeypatch.setenv("RANK", "1")
    code, out, err = cli(*UAP, "--method", "deepfool", "--uap", tmp_path / "x.safetensors")
    assert code == 2 and err == "" and out == ""
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------------------------- finetune


@pytest.fixture(scope="module")
def ft_two(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft2") / "run"
    rec = json.loads(ok(torchrun(*FINETUNE, "--batch-size", "32", "--run-dir", d)).stdout)
    return d, rec


def test_lora_tecoa_2x32_ends_within_2_points_of_1x64(ft_two, cli, tmp_path):
    _, two = ft_two
    one_rec = json.loads(one(cli, *FINETUNE, "--batch-size", "64", "--run-dir", tmp_path / "one"))
    t1, t2 = one_rec["finetune"]["train"], two["finetune"]["train"]
    assert (t1["world_size"], t1["global_batch_size"]) == (1, 64) and (t2["world_size"], t2["global_batch_size"]) \
        == (2, 64)
    assert t1["steps"] == t2["steps"] == 48
    assert abs(one_rec["metrics"]["robust_acc"] - two["metrics"]["robust_acc"]) <= 0.02


def _adapter(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors"))


def test_torchrun_finetune_killed_and_resumed_is_bit_identical(ft_two, tmp_path):
    done, _ = ft_two
    run = tmp_path / "run"
    proc = subprocess.Popen(torchrun_cmd(*FINETUNE, "--batch-size", "32", "--run-dir", run),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    summary, step, deadline = run / "checkpoint.json", 0, time.time() + 240
    while step < 8 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
        try:
            step = json.loads(summary.read_text())["step"]
        except (OSError, ValueError, KeyError):
            pass
    os.killpg(proc.pid, signal.SIGKILL)  # kill -9: torchrun and both ranks
    proc.wait()
    assert 8 <= step < 48 and not (run / "manifest.json").exists(), step  # killed mid-run
    # (the final evaluation is not hashed: a token one here, the weights are what is compared)
    rec = json.loads(ok(torchrun(*FINETUNE, "--batch-size", "32", "--run-dir", run, "--resume", run,
                                 "--eval-limit", "20", "--eval-steps", "1")).stdout)
    assert rec["finetune"]["train"]["resumed_from_step"] >= 8 and rec["finetune"]["train"]["steps"] == 48
    a, b = _adapter(done), _adapter(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_under_another_world_size_is_refused(ft_two, cli):
    done, _ = ft_two
    code, _, err = cli(*FINETUNE, "--batch-size", "32", "--run-dir", done, "--resume", done)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "written by 2 process(es), this run has 1" in lines[0], err
