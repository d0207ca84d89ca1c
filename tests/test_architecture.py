"""The codebase's shape: the layer contract (and that it catches an upward import), no import cycles (and that a
back-import is caught), the public Python API, and the CLI conventions every command shares (--out, --json, help
panels, deprecated names)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def _lint(cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **env})


def test_layer_contract_holds_and_fails_on_an_upward_import(tmp_path):
    ok = _lint(ROOT)
    assert ok.returncode == 0 and "2 kept, 0 broken" in ok.stdout, ok.stdout + ok.stderr
    # The same contract on a copy of the package with one upward import (models -> tasks) must break.
    shutil.copytree(ROOT / "clipguard", tmp_path / "clipguard", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    (tmp_path / "clipguard" / "models" / "upward.py").write_text("from clipguard.tasks.eval import run_eval\n")
    bad = _lint(tmp_path, PYTHONPATH=str(tmp_path))
    assert bad.returncode != 0, bad.stdout
    assert "clipguard.models is not allowed to import clipguard.tasks" in bad.stdout
    assert "clipguard.models.upward -> clipguard.tasks.eval" in bad.stdout


# Every import cycle of the package under the working directory, one line each (``a -> b -> ... -> a``), found with
# grimp (the graph lint-imports checks): every import counts, those inside functions and under TYPE_CHECKING too. Run
# in a child process, so a copy of the package is read instead of the one this process imported.
CYCLES = """
import json, grimp
g = grimp.build_graph("clipguard", cache_dir=None)
seen, cycles = set(), []
for m in sorted(g.modules):
    for w in sorted(g.find_modules_directly_imported_by(m)):
        back = g.find_shortest_chain(importer=w, imported=m)
        if back and frozenset(back) not in seen:
            seen.add(frozenset(back))
            cycles.append(" -> ".join((m, *back)))
print(json.dumps(cycles))
"""


def _cycles(root: Path) -> list[str]:
    out = subprocess.run([sys.executable, "-c", CYCLES], cwd=root, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(root)})
    return json.loads(out.stdout)


def _copy(tmp_path: Path, files: dict[str, str]) -> Path:
    """A copy of the package (and pyproject.toml, for lint-imports) with ``files`` (path -> text) appended."""
    shutil.copytree(ROOT / "clipguard", tmp_path / "clipguard", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    for name, text in files.items():
        path = tmp_path / "clipguard" / name
        path.write_text((path.read_text() if path.exists() else "") + text)
    return tmp_path


def test_no_module_imports_one_that_imports_it_back():
    assert _cycles(ROOT) == []


@pytest.mark.parametrize(("files", "cycle"), [
    # the circle the device decoder once made: a function-level import back into the module that imports it
    ({"data/images.py": "\n\ndef _back():\n    from clipguard.data.device_decode import decode_batch\n"},
     {"clipguard.data.images", "clipguard.data.device_decode"}),
    # a longer one, where no two modules import each other directly
    ({"tasks/_a.py": "import clipguard.tasks._b\n", "tasks/_b.py": "import clipguard.tasks._c\n",
      "tasks/_c.py": "def f():\n    import clipguard.tasks._a\n"},
     {"clipguard.tasks._a", "clipguard.tasks._b", "clipguard.tasks._c"}),
], ids=["back-import", "three-modules"])
def test_a_cycle_is_found_by_the_graph_check_and_by_lint_imports(tmp_path, files, cycle):
    root = _copy(tmp_path, files)
    found = _cycles(root)
    assert [set(c.split(" -> ")) for c in found] == [cycle], found
    bad = _lint(root, PYTHONPATH=str(root))
    assert bad.returncode != 0 and "no import cycles BROKEN" in bad.stdout, bad.stdout
    package = min(cycle).rsplit(".", 1)[0]
    assert f"No cycles are allowed in {package}." in bad.stdout, bad.stdout


def test_public_api_is_documented():
    code = "import clipguard, pydoc; print(pydoc.render_doc(clipguard, renderer=pydoc.plaintext))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("load_classifier", "load_images", "evaluate", "to_model_input", "Args:", "Returns:"):
        assert name in out, name


def test_public_api_reproduces_the_eval_command_exactly(cli):
    import torch

    import clipguard

    code, stdout, err = cli("eval", "--model", "toy", "--dataset", "toy", "--limit", "200", "--device", "cpu",
                            "--json")
    assert code == 0, err
    acc1 = json.loads(stdout)["metrics"]["acc1"]
    clf = clipguard.load_classifier("toy", dataset="toy", device="cpu")
    data = clipguard.load_images("toy", split="test", limit=200)
    with torch.no_grad():
        pred = clf(clipguard.to_model_input(clf, data.images)).argmax(1)
    assert (pred == data.labels).float().mean().item() == acc1
    assert clipguard.evaluate(model="toy", dataset="toy", limit=200, device="cpu")["metrics"]["acc1"] == acc1
    # A different class list gives a different classifier: the comparison above could fail.
    other = clipguard.load_classifier("toy", classnames=["red circle", "blue square"], device="cpu")
    assert other(clipguard.to_model_input(other, data.images[:4])).shape == (4, 2)
    with pytest.raises(clipguard.ClipguardError, match="exactly one of"):
        clipguard.load_classifier("toy", device="cpu")


COMMANDS = [["eval"], ["attack"], ["uap", "fit"], ["uap", "eval"], ["finetune"], ["bench", "run"], ["report"],
            ["gate"], ["certify"], ["prepare"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_takes_out_and_json(command):
    out = subprocess.run([sys.executable, "-m", "clipguard.cli.app", *command, "--help"], capture_output=True,
                         text=True, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0 and "--out" in out.stdout and "--json" in out.stdout, out.stdout


def test_eval_help_is_grouped_in_panels_and_finetune_takes_columns():
    env = {**os.environ, "COLUMNS": "200"}
    run = [sys.executable, "-m", "clipguard.cli.app"]
    help_eval = subprocess.run([*run, "eval", "--help"], capture_output=True, text=True, env=env).stdout
    for panel in ("Model & data", "Attack", "Output", "Performance"):
        assert f"─ {panel} " in help_eval, panel
    help_ft = subprocess.run([*run, "finetune", "--help"], capture_output=True, text=True, env=env).stdout
    assert "--image-column" in help_ft and "--label-column" in help_ft


def test_the_0_1_output_names_are_gone_and_the_artefact_option_is_asked_for(cli, tmp_path):
    adv, rec = tmp_path / "adv.safetensors", tmp_path / "rec.json"
    code, _, err = cli("attack", "--limit", "10", "--steps", "1", "--device", "cpu", "--adv-set", adv, "--record", rec)
    assert code == 2 and "--record" in err and not adv.exists()
    code, _, err = cli("attack", "--limit", "10", "--device", "cpu", "--out", tmp_path / "r.json")
    assert code == 2 and "--adv-set" in err and len(err.strip().splitlines()) == 1


def test_registry_names_the_option_and_the_close_matches():
    from clipguard.errors import ClipguardError
    from clipguard.registry import Registry

    reg = Registry("--attack")
    reg.register("pgd", 1)

    @reg.register("fgsm")
    def _fgsm():
        return 2

    assert reg.get("pgd") == 1 and reg.get("fgsm") is _fgsm and reg.names() == ["pgd", "fgsm"] and "pgd" in reg
    with pytest.raises(ClipguardError, match=r"^--attack 'pgdd' is unknown \(did you mean pgd\?\): choose from pgd, "
                                             r"fgsm$"):
        reg.get("pgdd")
    with pytest.raises(ClipguardError, match=r"^--train-attack 'zzz' is unknown: choose from"):
        reg.check("zzz", "--train-attack")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("pgd", 3)
