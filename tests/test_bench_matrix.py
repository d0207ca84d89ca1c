"""Suite files for leaderboards: ``dataset = [...]`` makes one cell per dataset, ``[dataset_options.<name>]`` adds a
dataset's own options, and ``base_adapter = "@cell"`` (a prompt adapter's image tower) is a dependency like
``adapter = "@cell"``: resolved to the cell's folder, hashed, waited for. No cell does real work here."""

import pytest

import clipguard.tasks.bench as bench
from clipguard.tasks.cells import CellTask, dependency_waves

SUITE = '''
[defaults]
model = "toy"
device = "cpu"
limit = 10
dataset = "toy"

[dataset_options.cifar10]
resolution = "native"
limit = 20

[[cell]]
id = "tecoa"
kind = "finetune"
epochs = 1

[[cell]]
id = "apt"
kind = "finetune"
method = "prompt"
base_adapter = "@tecoa"

[[cell]]
id = "apt-pgd"
dataset = ["toy", "cifar10"]
adapter = "@apt"
base_adapter = "@tecoa"
attack = "pgd"
eps = "4/255"

[[cell]]
id = "own"
dataset = "cifar10"
limit = 5
'''


@pytest.fixture
def suite(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SUITE)
    return path


def _tasks(path, out):
    _, cells = bench.load_suite(path)
    hashes, tasks = {}, []
    for c in cells:
        hashes[c["id"]] = h = bench.config_hash(c, hashes)
        tasks.append(CellTask("s", c, h, str(out), "local"))
    return tasks, hashes


def test_a_dataset_list_makes_one_cell_per_dataset_with_its_options(suite):
    _, cells = bench.load_suite(suite)
    by_id = {c["id"]: c for c in cells}
    assert list(by_id) == ["tecoa", "apt", "apt-pgd-toy", "apt-pgd-cifar10", "own"]
    assert by_id["apt-pgd-toy"]["dataset"] == "toy" and "resolution" not in by_id["apt-pgd-toy"]
    assert by_id["apt-pgd-cifar10"]["resolution"] == "native" and by_id["apt-pgd-cifar10"]["limit"] == 20
    assert by_id["own"]["resolution"] == "native" and by_id["own"]["limit"] == 5  # the cell's own key wins


def test_base_adapter_references_resolve_hash_and_order_the_waves(suite, tmp_path):
    out = tmp_path / "out"
    tasks, hashes = _tasks(suite, out)
    t = {x.id: x for x in tasks}
    opts = bench.cell_options(t["apt-pgd-toy"])
    assert opts["adapter"] == str(out / "adapters" / "apt") and opts["base_adapter"] == str(out / "adapters" / "tecoa")
    assert bench.cell_options(t["apt"])["base_adapter"] == str(out / "adapters" / "tecoa")
    assert [[x.id for x in w] for w in dependency_waves(tasks)] == [
        ["tecoa", "own"], ["apt"], ["apt-pgd-toy", "apt-pgd-cifar10"]]
    # the hash chain: retraining the backbone changes the hash of every cell built on it
    changed = suite.read_text().replace("epochs = 1", "epochs = 2")
    suite.write_text(changed)
    _, again = _tasks(suite, out)
    assert all(again[c] != hashes[c] for c in ("tecoa", "apt", "apt-pgd-toy", "apt-pgd-cifar10"))
    assert again["own"] == hashes["own"]


def test_a_base_adapter_reference_before_its_cell_is_refused(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[[cell]]\nid = "apt"\nkind = "finetune"\nmethod = "prompt"\nbase_adapter = "@later"\n'
                    '[[cell]]\nid = "later"\nkind = "finetune"\n')
    with pytest.raises(bench.ClipguardError, match='uses base_adapter = "@later" before that cell is defined'):
        bench.load_suite(path)


@pytest.mark.parametrize("value", ["[]", "[1, 2]"])
def test_a_dataset_list_must_name_datasets(tmp_path, value):
    path = tmp_path / "s.toml"
    path.write_text(f'[[cell]]\nid = "x"\ndataset = {value}\n')
    with pytest.raises(bench.ClipguardError, match="dataset = \\[...\\] must list dataset names"):
        bench.load_suite(path)


def test_a_cell_waits_for_both_of_its_adapters(suite, tmp_path, monkeypatch):
    """The base adapter's fine-tune failing blocks every cell built on it (on an executor that runs waves)."""
    from clipguard.tasks import executors

    def fake(task):
        if task.id == "tecoa":
            return bench.summary_row(task, "failed", error="boom", log="-")
        return bench.summary_row(task, "ran", 1.0)

    class Waves(executors.Local):  # this process, but in dependency waves as ray and slurm run them
        in_order = False

    monkeypatch.setattr(bench, "run_cell", fake)
    monkeypatch.setitem(executors.EXECUTORS._entries, "waves", Waves)
    with pytest.raises(bench.CellsFailed) as err:
        bench.run_suite(suite, tmp_path / "out", progress=False, executor="waves")
    status = {r["cell"]: r["status"] for r in err.value.summary}
    assert status == {"tecoa": "failed", "own": "ran", "apt": "blocked", "apt-pgd-toy": "blocked",
                      "apt-pgd-cifar10": "blocked"}
