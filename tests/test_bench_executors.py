"""Suites across machines: a 4-cell suite (two evals, a fine-tune, an eval of its adapter) on a local Ray cluster and
as a submitit job array (submitit's local backend) writes the records of ``--executor local``; a cell killed mid-run
is redone, finished cells are not; a changed option reruns its cell and the cells that depend on it."""

import json
import shutil
import sys

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

SUITE = """
[suite]
name = "four"
[defaults]
model = "toy"
dataset = "toy"
limit = 40
device = "cpu"
steps = 2
[[cell]]
id = "base"
label = "toy CLIP"
attack = "pgd"
eps = "0,8/255"
[[cell]]
id = "transfer"
label = "toy CLIP"
attack = "pgd"
eps = "8/255"
surrogate = "toy-cnn"
[[cell]]
id = "ft"
kind = "finetune"
label = "toy CLIP + LoRA"
split = "train"
method = "lora"
eps = "4/255"
steps = 1
batch_size = 20
lr = 1e-2
save_every = 1
eval_limit = 40
eval_steps = 2
[[cell]]
id = "ft-pgd"
label = "toy CLIP + LoRA"
adapter = "@ft"
attack = "pgd"
eps = "0,8/255"
"""
CELLS = ["base", "transfer", "ft", "ft-pgd"]


def normalized(out, cell: str) -> dict:
    """A record without what may differ between two runs of the same cell: when and where it ran (created,
    environment, every time and rate: the keys ending in _s, as wall_s, total_s, images_per_s), the text-embedding
    cache state and which executor ran it (checked on its own); OUT itself is written as OUT."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not k.endswith("_s")}
        return [strip(v) for v in x] if isinstance(x, list) else x

    rec = json.loads((out / "records" / f"{cell}.json").read_text().replace(str(out), "OUT"))
    for key in ("created", "environment", "marker"):
        rec.pop(key, None)
    rec.get("text_embeddings", {}).pop("cache", None)
    rec["bench"].pop("executor")
    return strip(rec)


def assert_same_records(a, b, cells=CELLS) -> None:
    for cell in cells:
        ra, rb = normalized(a, cell), normalized(b, cell)
        assert ra == rb, (cell, [k for k in ra if ra[k] != rb.get(k)])


def assert_same_adapter(a, b) -> None:
    from safetensors.torch import load_file

    wa, wb = (load_file(str(d / "adapters" / "ft" / "adapter_model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


@pytest.fixture(scope="module")
def local(tmp_path_factory, one_thread):
    """The suite file and the records --executor local writes."""
    from clipguard.tasks.bench import run_suite

    root = tmp_path_factory.mktemp("suite")
    (root / "four.toml").write_text(SUITE)
    rows = run_suite(root / "four.toml", root / "local", progress=False)
    assert [r["status"] for r in rows] == ["ran"] * 4 and {r["executor"] for r in rows} == {"local"}
    return root / "four.toml", root / "local"


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for the module (run_suite uses a session this process opened, and leaves it open)."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'clipguard[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def ray_run(suite, out, **kw):
    from clipguard.tasks.bench import run_suite
    from clipguard.tasks.executors import RayOptions

    return run_suite(suite, out, progress=False, executor="ray", options=RayOptions(cpus_per_cell=1), **kw)


def statuses(rows) -> dict[str, str]:
    return {r["cell"]: r["status"] for r in rows}


def mark_done_records(out, cells) -> None:
    """Put a marker in finished records: a cell that ran again would write its record anew, without it."""
    for cell in cells:
        path = out / "records" / f"{cell}.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "marker": True}))


def marked(out, cell) -> bool:
    return json.loads((out / "records" / f"{cell}.json").read_text()).get("marker", False)


def test_dependency_waves_put_a_cell_one_wave_after_the_adapter_it_needs(tmp_path):
    from clipguard.tasks.bench import CellTask, config_hash, dependency_waves, load_suite

    (tmp_path / "four.toml").write_text(SUITE)
    _, cells = load_suite(tmp_path / "four.toml")
    hashes = {}
    tasks = [CellTask("four", c, hashes.setdefault(c["id"], config_hash(c, hashes)), "OUT", "ray") for c in cells]
    assert [[t.id for t in w] for w in dependency_waves(tasks)] == [["base", "transfer", "ft"], ["ft-pgd"]]
    # ft already done: ft-pgd needs nothing that still runs, so it starts at once
    assert [[t.id for t in w] for w in dependency_waves([t for t in tasks if t.id != "ft"])] == [
        ["base", "transfer", "ft-pgd"]]


def test_ray_writes_the_records_of_the_local_executor(local, ray_cluster, tmp_path):
    suite, ref = local
    rows = ray_run(suite, tmp_path)
    assert statuses(rows) == dict.fromkeys(CELLS, "ran") and {r["executor"] for r in rows} == {"ray"}
    assert all(json.loads((tmp_path / "records" / f"{c}.json").read_text())["bench"]["executor"] == "ray"
               for c in CELLS)
    assert_same_records(ref, tmp_path)


def test_ray_redoes_a_killed_cell_and_skips_finished_ones(local, ray_cluster, tmp_path, monkeypatch,
                                                         kill_at_checkpoint):
    from clipguard.tasks.bench import run_suite

    suite, ref = local
    # A local run killed in the fine-tune right after its step-1 checkpoint (of 2): base and transfer are done,
    # ft left a checkpoint and no record, ft-pgd never started.
    with pytest.raises(kill_at_checkpoint(1)):
        run_suite(suite, tmp_path, progress=False)
    monkeypatch.undo()
    assert (tmp_path / "adapters" / "ft" / "checkpoint.json").exists()
    assert sorted(p.stem for p in (tmp_path / "records").iterdir()) == ["base", "transfer"]
    mark_done_records(tmp_path, ["base", "transfer"])

    rows = ray_run(suite, tmp_path)
    assert statuses(rows) == {"base": "skipped", "transfer": "skipped", "ft": "ran", "ft-pgd": "ran"}
    assert marked(tmp_path, "base") and marked(tmp_path, "transfer")  # not rewritten: they did not run again
    assert_same_records(ref, tmp_path, ["base", "transfer", "ft-pgd"])
    # ft was redone from its checkpoint, not from scratch: its training statistics cover the resumed step only;
    # its weights, metrics and config are those of the uninterrupted run
    ft, ft_ref = normalized(tmp_path, "ft"), normalized(ref, "ft")
    assert ft["finetune"].pop("train")["resumed_from_step"] == 1
    ft_ref["finetune"].pop("train")
    assert ft == ft_ref
    assert_same_adapter(ref, tmp_path)


def test_a_changed_option_reruns_its_cell_and_the_cells_that_need_it(local, ray_cluster, tmp_path):
    suite, ref = local
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    mark_done_records(out, CELLS)
    changed = tmp_path / "changed.toml"
    changed.write_text(suite.read_text().replace("lr = 1e-2", "lr = 5e-3"))
    rows = ray_run(changed, out)
    # ft's hash changed, and ft-pgd's hash covers ft's: both rerun; the evals of the base model do not
    assert statuses(rows) == {"base": "skipped", "transfer": "skipped", "ft": "ran", "ft-pgd": "ran"}
    assert [marked(out, c) for c in CELLS] == [True, True, False, False]
    assert json.loads((out / "records" / "ft.json").read_text())["finetune"]["config"]["lr"] == 5e-3
    kept = [p.name for p in (out / "adapters").iterdir() if p.name != "ft"]
    assert len(kept) == 1 and kept[0].startswith("ft.stale-")  # the old adapter is kept beside, never deleted


def test_a_cell_failing_on_a_worker_is_one_line_and_blocks_its_dependents(ray_cluster, tmp_path):
    """A failure only running can find (an empty image folder: the options are valid, so the suite's check passes)."""
    from clipguard.tasks.bench import CellsFailed

    empty = tmp_path / "empty"
    empty.mkdir()
    suite = tmp_path / "bad.toml"
    suite.write_text('[defaults]\nmodel = "toy"\ndataset = "toy"\ndevice = "cpu"\n'
                     f'[[cell]]\nid = "ft"\nkind = "finetune"\ndataset = "imagefolder:{empty}"\n'
                     '[[cell]]\nid = "ft-pgd"\nadapter = "@ft"\n')
    with pytest.raises(CellsFailed) as err:
        ray_run(suite, tmp_path / "out")
    assert statuses(err.value.summary) == {"ft": "failed", "ft-pgd": "blocked"}
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "ft: --dataset 'imagefolder:" in message and "no class folders" in message
    log = tmp_path / "out" / "ray" / "ft.err"
    assert f"(full error: {log})" in message and 'bench.py", line' in log.read_text()  # the worker's traceback
    assert not (tmp_path / "out" / "records").exists()


def test_a_submitit_worker_traceback_becomes_its_last_line():
    from clipguard.tasks.executors import _one_line

    trace = ("Job (task=0) failed during processing with trace:\n----------------------\n"
             "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n    raise ClipguardError('no')\n"
             "{error}\n\n----------------------\nYou can check full logs with 'job.stderr(0)'\n  - /x/1_0_log.err")
    assert _one_line(Exception(trace.format(error="clipguard.errors.ClipguardError: --limit 0 must be positive"))) \
        == "--limit 0 must be positive"
    assert _one_line(Exception(trace.format(error="torch.OutOfMemoryError: CUDA out of memory."))) \
        == "OutOfMemoryError: CUDA out of memory."


def test_submitit_job_array_writes_the_records_of_the_local_executor(local, tmp_path, cli):
    pytest.importorskip("submitit", reason="the slurm extra is not installed: pip install 'clipguard[slurm]'")
    suite, ref = local
    slurm = ["--executor", "slurm", "--submitit-cluster", "local", "--slurm-time", "10", "--slurm-cpus-per-task", "1",
             "--json"]
    code, out, err = cli("bench", "run", suite, "--out", tmp_path, *slurm)
    assert code == 0, err
    rows = json.loads(out)
    assert statuses(rows) == dict.fromkeys(CELLS, "ran") and {r["executor"] for r in rows} == {"slurm"}
    assert_same_records(ref, tmp_path)
    assert_same_adapter(ref, tmp_path)
    logs = sorted((tmp_path / "slurm").glob("*_log.out"))
    assert len(logs) == 4  # one job (and log) per cell

    # A second pass (the array resubmitted after a preemption) submits nothing: every cell is done.
    mark_done_records(tmp_path, CELLS)
    code, out, err = cli("bench", "run", suite, "--out", tmp_path, *slurm)
    assert code == 0, err
    assert statuses(json.loads(out)) == dict.fromkeys(CELLS, "skipped")
    assert all(marked(tmp_path, c) for c in CELLS) and sorted((tmp_path / "slurm").glob("*_log.out")) == logs


def test_a_requeued_cell_task_skips_a_done_cell_and_requeues_itself(local, tmp_path):
    """What a Slurm array task does when Slurm starts it again (preemption, time limit): a cell whose record is done
    returns at once; ``checkpoint`` (submitit's requeue hook) resubmits the same cell."""
    from clipguard.tasks.bench import CellTask, config_hash, load_suite, run_cell
    from clipguard.tasks.executors import CellJob

    suite, ref = local
    _, cells = load_suite(suite)
    out = tmp_path / "out"
    shutil.copytree(ref / "records", out / "records")
    mark_done_records(out, ["base"])
    task = CellTask("four", cells[0], config_hash(cells[0], {}), str(out), "slurm")
    assert run_cell(task)["status"] == "skipped" and marked(out, "base")
    other = CellTask("four", {**cells[0], "eps": "4/255"}, config_hash({**cells[0], "eps": "4/255"}, {}), str(out),
                     "slurm")
    assert run_cell(other)["status"] == "ran" and not marked(out, "base")  # a stale record: the cell runs again
    pytest.importorskip("submitit", reason="the slurm extra is not installed: pip install 'clipguard[slurm]'")
    again = CellJob(run_cell).checkpoint(task)
    assert isinstance(again.function, CellJob) and again.args == (task,)


@pytest.mark.parametrize(("args", "blocked", "needle"), [
    (["--executor", "ray"], "ray", "--executor ray needs ray: pip install 'clipguard[ray]'"),
    (["--executor", "slurm", "--submitit-cluster", "local"], "submitit",
     "--executor slurm needs submitit: pip install 'clipguard[slurm]'"),
    (["--executor", "slurm"], None, "no sbatch on this machine"),
    (["--executor", "local", "--ray-address", "auto"], None, "--ray-address applies to --executor ray, not local"),
    (["--executor", "dask"], None, "--executor 'dask' is unknown"),
], ids=["no-ray", "no-submitit", "no-sbatch", "stray-option", "unknown-executor"])
def test_a_missing_extra_or_a_wrong_option_is_one_line_exit_2(local, tmp_path, cli, monkeypatch, args, blocked,
                                                              needle):
    if blocked:
        monkeypatch.setitem(sys.modules, blocked, None)  # `import ray` now raises ImportError, as when not installed
    elif "sbatch" in needle:
        pytest.importorskip("submitit", reason="the slurm extra is not installed: pip install 'clipguard[slurm]'")
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no Slurm here, even on a machine that has one
    code, out, err = cli("bench", "run", local[0], "--out", tmp_path, "--json", *args)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "records").exists()
