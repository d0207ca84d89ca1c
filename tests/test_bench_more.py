"""`bench run` before and around its cells (issue 26 item 14): every cell's options are checked before any cell runs
(each kind, the uap cell's eval part included), ``--only`` with an unknown id is refused, and the progress bar counts
only the cells that run, in seconds per cell. No cell does real work here: ``run_cell`` is replaced by a recorder."""

import json
from contextlib import contextmanager

import pytest

import clipguard.tasks.bench as bench

FIRST = {"id": "first", "kind": "eval", "attack": "pgd", "eps": "8/255"}


def write_suite(path, *cells: dict):
    """A suite of ``cells`` on the toy world (model, dataset, device and a small limit as defaults)."""
    body = '[defaults]\nmodel = "toy"\ndataset = "toy"\ndevice = "cpu"\nlimit = 10\n'
    for cell in cells:
        body += "[[cell]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in cell.items())
    path.write_text(body)
    return path


@pytest.fixture
def ran(monkeypatch) -> list[str]:
    """The ids of the cells handed to a worker (``run_cell`` recorded: it does no work and writes no record)."""
    seen = []

    def fake(task):
        seen.append(task.id)
        return bench.summary_row(task, "ran", 1.0)

    monkeypatch.setattr(bench, "run_cell", fake)
    return seen


@pytest.mark.parametrize("cell, needle", [
    ({"kind": "eval", "epss": "8/255"}, "option(s) epss unknown here"),
    ({"kind": "eval", "attack": "pgd", "eps": "abc"}, "--eps"),
    ({"kind": "uap", "eps": "8/255", "eval_limit": 0}, "--limit 0"),
    ({"kind": "uap", "eps": "8/255", "eval_epochs": 2}, "option(s) epochs unknown here"),
    ({"kind": "finetune", "epochs": "two"}, "epochs = 'two' should be int"),
    ({"kind": "finetune", "epochs": 0}, "--epochs 0"),
    ({"kind": "certify", "check_steps": 0}, "--check-steps 0"),
], ids=["eval-typo", "eval-value", "uap-eval-value", "uap-eval-unknown", "finetune-type", "finetune-value",
        "certify-value"])
def test_a_bad_cell_is_refused_before_any_cell_runs(tmp_path, ran, cell, needle):
    suite = write_suite(tmp_path / "s.toml", FIRST, {"id": "second", **cell})
    with pytest.raises(bench.ClipguardError) as err:
        bench.run_suite(suite, tmp_path / "out", progress=False)
    message = str(err.value)
    assert message.startswith("suite cell 'second': ") and needle in message and "\n" not in message, message
    assert ran == [] and not (tmp_path / "out" / "records").exists()


@pytest.mark.parametrize("cell", [
    {"kind": "eval", "attack": "pgd", "eps": "4/255"}, {"kind": "uap", "eps": "8/255", "eval_limit": 5},
    {"kind": "finetune", "epochs": 1}, {"kind": "certify", "check_steps": 2},
], ids=["eval", "uap", "finetune", "certify"])
def test_a_good_cell_of_each_kind_passes_the_check_and_runs(tmp_path, ran, cell):
    """The twin: the same suites with a valid second cell run both cells; the checked outputs stay under OUT."""
    suite = write_suite(tmp_path / "s.toml", FIRST, {"id": "second", **cell})
    rows = bench.run_suite(suite, tmp_path / "out", progress=False)
    assert ran == ["first", "second"] and [r["status"] for r in rows] == ["ran", "ran"]
    assert all(p.is_relative_to(tmp_path / "out") for p in tmp_path.rglob("*") if p.name != "s.toml")


def test_a_cell_checks_its_adapter_dependency_before_the_fine_tune_exists(tmp_path, ran):
    """``adapter = "@ft"`` is checked as the folder the fine-tune will write (it does not exist yet)."""
    suite = write_suite(tmp_path / "s.toml", {"id": "ft", "kind": "finetune", "epochs": 1},
                        {"id": "ft-pgd", "adapter": "@ft", "attack": "pgd", "eps": "8/255"})
    assert [r["status"] for r in bench.run_suite(suite, tmp_path / "out", progress=False)] == ["ran", "ran"]


def test_only_an_unknown_cell_is_exit_2_naming_it_and_the_known_ones(tmp_path, ran, cli):
    suite = write_suite(tmp_path / "s.toml", FIRST, {"id": "second", "attack": "pgd"})
    code, out, err = cli("bench", "run", suite, "--out", tmp_path / "out", "--only", "nosuch", "--only", "secnd")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--only nosuch, secnd" in err and "(did you mean second?)" in err and "its cells: first, second" in err
    assert ran == []


def test_only_a_known_cell_runs_just_that_one(tmp_path, ran, cli):
    """The twin: a known id runs that cell; the other is "not selected"."""
    suite = write_suite(tmp_path / "s.toml", FIRST, {"id": "second", "attack": "pgd"})
    code, out, err = cli("bench", "run", suite, "--out", tmp_path / "out", "--only", "second", "--json")
    assert code == 0, err
    assert {r["cell"]: r["status"] for r in json.loads(out)} == {"first": "not selected", "second": "ran"}
    assert ran == ["second"]


def test_only_takes_a_comma_list_and_repeats(tmp_path, ran, cli):
    suite = write_suite(tmp_path / "s.toml", FIRST, {"id": "second", "attack": "pgd"}, {"id": "third"})
    code, out, err = cli("bench", "run", suite, "--out", tmp_path / "out", "--only", "first,third", "--json")
    assert code == 0, err
    assert ran == ["first", "third"]
    code, out, err = cli("bench", "run", suite, "--out", tmp_path / "out", "--only", "first, nosuch", "--only", "x")
    assert code == 2 and "--only nosuch, x: no such cell" in err


@pytest.fixture
def bars(monkeypatch) -> list[dict]:
    """run_suite's progress bars, recorded: total, whether drawn, per_item, and how far they were advanced."""
    made = []

    @contextmanager
    def bar(total, description, *, enabled=True, unit="img", per_item=False, **_):
        made.append({"total": total, "enabled": enabled, "unit": unit, "per_item": per_item, "advanced": 0})
        yield lambda n=1, **fields: made[-1].__setitem__("advanced", made[-1]["advanced"] + n)

    monkeypatch.setattr(bench, "progress_bar", bar)
    return made


def test_the_bar_counts_only_the_cells_that_run_in_seconds_per_cell(tmp_path, ran, bars):
    """Of three cells, one done and one not selected: the bar's total is the one that runs, not three."""
    suite = write_suite(tmp_path / "s.toml", FIRST, {"id": "done", "attack": "pgd"}, {"id": "other", "attack": "pgd"})
    _, cells = bench.load_suite(suite)
    record = tmp_path / "out" / "records" / "done.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"bench": {"config_hash": bench.config_hash(cells[1], {})}}))
    rows = bench.run_suite(suite, tmp_path / "out", only=["first", "done"])
    assert [r["status"] for r in rows] == ["ran", "skipped", "not selected"]
    assert bars == [{"total": 1, "enabled": True, "unit": "cell", "per_item": True, "advanced": 1}]
    bars.clear()
    bench.run_suite(suite, tmp_path / "out", only=["done"])  # nothing to run: no bar at all
    assert [b["enabled"] for b in bars] == [False]


def test_seconds_per_cell_stay_meaningful_when_cells_finish_in_a_burst():
    """Three cells end after 60 s, two of them within a millisecond (a Ray wave): the windowed rate reads 2,000
    cells/s; seconds per cell over the run read 20."""
    from rich.progress import Progress

    from clipguard.progress import RateColumn

    clock = [0.0]
    progress = Progress(get_time=lambda: clock[0])
    task_id = progress.add_task("suite", total=3)
    assert str(RateColumn("cell", per_item=True).render(progress.tasks[0])) == "-- s/cell"
    for t, n in ((60.0, 1), (60.001, 2)):
        clock[0] = t
        progress.update(task_id, advance=n)
    task = progress.tasks[0]
    assert str(RateColumn("cell").render(task)) == "2,000.0 cell/s"  # what the bar showed before
    assert str(RateColumn("cell", per_item=True).render(task)) == "20.0 s/cell"
