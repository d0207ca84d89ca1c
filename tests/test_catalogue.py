"""The dataset catalogue: its prompt files, their parity with CLIP_benchmark's published lists, `clipguard
datasets`, the zs-robust suite and the report's zero-shot tables."""

import ast
import copy
import json
import re
import tarfile
from pathlib import Path

import pytest

from clipguard.catalogue import CatalogueEntry, catalogue, get_entry, prompts_dir, wds_dir, wds_repo

NAMES = list(catalogue())
ZS_MAIN = {"imagenet1k", "cifar10", "cifar100", "stl10", "caltech101", "pets", "flowers", "fgvc_aircraft", "cars",
           "dtd", "eurosat", "pcam", "sun397", "food101"}
SHIFT = {"imagenet-r", "imagenet-a", "imagenet_sketch"}


# --- the catalogue and its prompt files ---------------------------------------------------------------------


def test_catalogue_holds_the_issue_sets_with_clip_benchmark_names():
    assert set(NAMES) == ZS_MAIN | SHIFT
    for name, e in catalogue().items():
        assert isinstance(e, CatalogueEntry) and e.name == name and re.fullmatch(r"[a-z0-9_-]+", name)
        assert e.wds.removeprefix("vtab/") == name  # clipguard's name is CLIP_benchmark's without "vtab/"
        assert wds_repo(e) == "clip-benchmark/wds_" + e.wds.replace("/", "-")
        assert wds_dir(e).name == wds_repo(e).split("/")[1]
        assert set(e.suites) <= {"tecoa", "fare", "shift"} and e.suites
        assert (e.image_column is None) == (e.label_column is None) == (e.hf is None)
    assert {n for n, e in catalogue().items() if "shift" in e.suites} == SHIFT
    assert catalogue()["cifar10"].hf == "uoft-cs/cifar10" and catalogue()["cifar100"].label_column == "fine_label"


def test_unknown_name_is_one_error_with_close_matches():
    from clipguard.errors import ClipguardError

    assert get_entry("pets").title == "Oxford-IIIT Pets"
    with pytest.raises(ClipguardError, match=r"'caltech10' is unknown \(did you mean caltech101"):
        get_entry("caltech10")


def test_a_slip_in_the_catalogue_file_names_the_entry(tmp_path):
    from clipguard.catalogue import _load
    from clipguard.errors import ClipguardError

    bad = tmp_path / "catalogue.toml"
    bad.write_text('[x]\ntitle = "X"\nwds = "x"\nsplit = "test"\nn_classes = 2\nsuites = []\nhf_spilt = "val"\n')
    with pytest.raises(ClipguardError, match=r"\[x\] has unknown key\(s\) hf_spilt"):
        _load(str(bad))


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_loads_its_class_names_and_templates(name):
    from clipguard.data.prompts import load_prompts

    entry = catalogue()[name]
    openai, seed = load_prompts(name, templates="openai"), load_prompts(name, templates="seed")
    assert len(openai.classnames) == len(seed.classnames) == entry.n_classes
    assert seed.templates == ["a photo of a {c}."] and openai.templates
    assert openai.source == seed.source == f"{name}.json"


# --- parity with CLIP_benchmark's published lists ------------------------------------------------------------

# Entries whose class names CLIP_benchmark publishes (en_classnames.json key, as its builder.py picks it for the
# wds name); the others come from torchvision there (CLIP's data/prompts.md here) and only their templates compare.
CB_CLASSNAMES = {"imagenet1k": "imagenet1k", "imagenet_sketch": "imagenet1k", "caltech101": "caltech101_vtab",
                 "pets": "pets", "flowers": "flowers", "eurosat": "eurosat", "pcam": "pcam",
                 "imagenet-r": "imagenet_r_wnids", "imagenet-a": "imagenet_a_wnids"}


@pytest.fixture(scope="module")
def published():
    """CLIP_benchmark's class names and templates as installed (a dev dependency), plus builder.py's wnid lists."""
    cb = pytest.importorskip("clip_benchmark")
    folder = Path(cb.__file__).parent / "datasets"
    lists = {}
    for node in ast.walk(ast.parse((folder / "builder.py").read_text())):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id in (
                "all_imagenet_wordnet_ids", "imagenet_r_wnids", "imagenet_a_wnids"):
            lists[node.targets[0].id] = ast.literal_eval(node.value)
    return {"classnames": json.loads((folder / "en_classnames.json").read_text()),
            "templates": json.loads((folder / "en_zeroshot_classification_templates.json").read_text()), **lists}


def expected(entry, pub) -> tuple[list[str] | None, list[str]]:
    """(class names or None, templates) CLIP_benchmark uses for ``entry``'s wds set: templates looked up as its
    builder does (wds name, name without vtab/, else imagenet1k); ImageNet-R/-A masked out of the 1,000."""
    short = entry.wds.removeprefix("vtab/")
    templates = next(pub["templates"][k] for k in (entry.wds, short, "imagenet1k") if k in pub["templates"])
    key = CB_CLASSNAMES.get(entry.name)
    if key is None:
        return None, templates
    if key.endswith("_wnids"):
        keep = set(pub[key])
        names = [c for c, w in zip(pub["classnames"]["imagenet1k"], pub["all_imagenet_wordnet_ids"], strict=True)
                 if w in keep]
        return names, templates
    return pub["classnames"][key], templates


def mismatches(entry, data: dict, pub) -> list[str]:
    """How the prompt file ``data`` differs from CLIP_benchmark's published lists for ``entry`` (empty: equal)."""
    names, templates = expected(entry, pub)
    out = []
    if names is not None and data["classnames"] != names:
        out.append(f"{entry.name}: class names differ")
    if data["templates"]["openai"] != templates:
        out.append(f"{entry.name}: openai templates differ")
    return out


def _prompt_file(name: str) -> dict:
    return json.loads((prompts_dir() / f"{name}.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_prompt_files_equal_clip_benchmark(name, published):
    assert mismatches(catalogue()[name], _prompt_file(name), published) == []


def test_parity_check_catches_a_corrupted_copy(published):
    r = copy.deepcopy(_prompt_file("imagenet-r"))
    r["classnames"][3], r["classnames"][4] = r["classnames"][4], r["classnames"][3]
    assert mismatches(catalogue()["imagenet-r"], r, published) == ["imagenet-r: class names differ"]
    cars = copy.deepcopy(_prompt_file("cars"))
    cars["templates"]["openai"] = cars["templates"]["openai"][:-1]
    assert mismatches(catalogue()["cars"], cars, published) == ["cars: openai templates differ"]


def test_existing_cifar_sets_are_clip_benchmarks(published):
    """cifar10/cifar100 kept their files: the openai sets already were CLIP_benchmark's 18 templates."""
    for name in ("cifar10", "cifar100"):
        assert _prompt_file(name)["templates"]["openai"] == published["templates"][name]
        assert len(published["templates"][name]) == 18


# --- clipguard datasets ----------------------------------------------------------------------------------------


def _tar(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w"):
        pass


@pytest.fixture
def fake_machine(tmp_path, monkeypatch):
    """A data root with cifar10's shards, a Hub cache with dtd's, a datasets cache with pets prepared."""
    monkeypatch.setenv("CLIPGUARD_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(var, raising=False)
    local = tmp_path / "data" / "wds_vtab-cifar10"
    _tar(local / "test" / "0.tar")
    _tar(local / "test" / "1.tar")
    (local / "classnames.txt").write_text("airplane\n")
    _tar(tmp_path / "hf" / "hub" / "datasets--clip-benchmark--wds_vtab-dtd" / "snapshots" / "abc" / "test" / "0.tar")
    (tmp_path / "hf" / "datasets" / "timm___oxford-iiit-pet" / "default" / "0.0.0" / "f00").mkdir(parents=True)
    return tmp_path


def test_datasets_json_lists_every_entry_and_what_is_local(cli, fake_machine):
    code, out, err = cli("datasets", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert list(rows) == NAMES
    c10 = rows["cifar10"]
    assert c10["wds_repo"] == "clip-benchmark/wds_vtab-cifar10" and c10["n_templates"] == 18
    assert c10["local"]["wds"] == {"path": str(fake_machine / "data" / "wds_vtab-cifar10"), "shards": 2,
                                   "classnames": True}
    assert c10["local"]["present"] and c10["local"]["hf"]["cached"] is False
    assert rows["dtd"]["local"]["hub"]["shards"] == 1 and rows["dtd"]["local"]["present"]
    assert rows["pets"]["local"]["hf"]["cached"] and rows["pets"]["local"]["present"]
    assert rows["caltech101"]["local"]["hf"] is None
    assert {n for n, r in rows.items() if r["local"]["present"]} == {"cifar10", "dtd", "pets"}
    assert rows["imagenet1k"]["hf_split"] == "validation" and rows["imagenet1k"]["n_templates"] == 80


def test_datasets_table_and_suite_filter(cli, fake_machine, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps to the terminal's width
    code, out, _ = cli("datasets")
    assert code == 0 and "cifar10" in out and "wds (2 shards)" in out
    code, out, _ = cli("datasets", "--suite", "shift", "--json")
    assert code == 0 and {r["name"] for r in json.loads(out)} == SHIFT
    code, _, err = cli("datasets", "--suite", "fair")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "did you mean fare" in err


# --- benchmarks/zs-robust.toml ------------------------------------------------------------------------------


def test_zs_robust_suite_runs_every_catalogue_set_under_the_fare_protocol():
    from clipguard.fsutil import read_toml
    from clipguard.tasks.bench import load_suite, typed
    from clipguard.tasks.configs import EvalConfig

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    _, cells = load_suite(root / "zs-robust.toml")
    fare = read_toml(root / "fare-protocol.toml", "suite")["defaults"]
    assert {c["dataset"] for c in cells} == ZS_MAIN | SHIFT and all(c["dataset"] in catalogue() for c in cells)
    robust = [c for c in cells if "attack" in c]
    clean = [c for c in cells if "attack" not in c]
    assert len(robust) == len(clean) == len(ZS_MAIN | SHIFT)  # one attacked and one attack-free cell per set
    for c in robust:  # FARE's settings, as fare-protocol.toml states them
        assert {k: c[k] for k in fare if k != "split"} == {k: v for k, v in fare.items() if k != "split"}
    _, fare_cells = load_suite(root / "fare-protocol.toml")
    for f in fare_cells:  # where the perturbation lives, per set, as fare-protocol.toml has it (attacked and clean)
        assert {c.get("resolution") for c in cells if c["dataset"] == f["dataset"]} == {f["resolution"]}
    for c in clean:
        assert "limit" not in c and "eps" not in c and c["id"] == f"{c['dataset']}-clean"
    for c in cells:
        typed(EvalConfig, {k: v for k, v in c.items() if k not in ("id", "kind")}, c["id"])  # parsed and checked


# --- the report's zero-shot tables ----------------------------------------------------------------------------


def _record(label: str, dataset: str, acc1: float, robust: dict[str, float] | None = None) -> dict:
    """A hand-written record: attack-free (task zeroshot_classification) or AutoAttack at the given eps."""
    rec = {"schema": "clipguard.result/1", "dataset": dataset, "model_spec": "ViT-B-32:openai",
           "task": "zeroshot_classification", "metrics": {"acc1": acc1},
           "bench": {"label": label, "cell": f"{label}-{dataset}"}}
    if robust:
        values = {"2/255": 2 / 255, "4/255": 4 / 255}
        rec.update(task="robustness", attack={"name": "autoattack", "norm": "linf"})
        rec["metrics"]["robust"] = [{"attack": "autoattack", "eps": e, "eps_value": values[e], "robust_acc": v,
                                     "attack_success_rate": 1 - v / acc1} for e, v in robust.items()]
    return rec


CLEAN = {"clip": {"cifar10": 0.90, "pets": 0.80, "caltech101": 0.70},
         "fare": {"cifar10": 0.70, "pets": 0.60, "caltech101": 0.50}}
ROBUST = {"clip": {"cifar10": {"2/255": 0.10, "4/255": 0.00}, "pets": {"2/255": 0.20, "4/255": 0.05},
                   "caltech101": {"2/255": 0.30, "4/255": 0.10}},
          "fare": {"cifar10": {"2/255": 0.40, "4/255": 0.20}, "pets": {"2/255": 0.35, "4/255": 0.15}}}  # no caltech


@pytest.fixture
def zs_records(tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    for label, per in CLEAN.items():
        for ds, acc1 in per.items():
            (folder / f"{label}-{ds}-clean.json").write_text(json.dumps(_record(label, ds, acc1)))
    for label, per in ROBUST.items():
        for ds, robust in per.items():  # the attacked 1,000 images have their own clean accuracy (not shown)
            (folder / f"{label}-{ds}.json").write_text(json.dumps(_record(label, ds, 0.99, robust)))
    return folder


def test_zero_shot_tables_one_row_per_model_one_column_per_dataset(zs_records, tmp_path):
    from clipguard.report.build import build_report

    info = build_report(zs_records, tmp_path / "r.md", html_out=tmp_path / "r.html")
    tables = {t["title"]: t for t in info["zero_shot"]}
    assert list(tables) == ["clean", "Linf 2/255 (autoattack)", "Linf 4/255 (autoattack)"]
    cols = [n for n in catalogue() if n in CLEAN["clip"]]  # catalogue order (cifar10 first), not file order
    assert cols == ["cifar10", "caltech101", "pets"]
    for t in tables.values():
        assert t["header"] == ["model", *cols, "average"]
    clean = {row[0]: row[1:] for row in tables["clean"]["body"]}
    for label, per in CLEAN.items():  # clean from the attack-free records, averaged over the complete row
        assert clean[label] == [*(per[c] for c in cols), pytest.approx(sum(per.values()) / 3)]
    for eps in ("2/255", "4/255"):
        body = {row[0]: row[1:] for row in tables[f"Linf {eps} (autoattack)"]["body"]}
        assert body["clip"][-1] == pytest.approx(sum(v[eps] for v in ROBUST["clip"].values()) / 3)
        assert body["fare"][cols.index("caltech101")] is None and body["fare"][-1] is None  # missing: no average
        assert body["fare"][cols.index("pets")] == ROBUST["fare"]["pets"][eps]
    md, html = (tmp_path / "r.md").read_text(), (tmp_path / "r.html").read_text()
    assert "## Zero-shot robustness" in md and "### Linf 4/255 (autoattack)" in md
    assert "| model | " + " | ".join(cols) + " | average |" in md
    fare = ROBUST["fare"]
    row = {"caltech101": "—", "cifar10": f"{fare['cifar10']['2/255']:.4f}", "pets": f"{fare['pets']['2/255']:.4f}"}
    assert "| fare | " + " | ".join(row[c] for c in cols) + " | — |" in md
    assert "Zero-shot robustness" in html and "<h3>Linf 2/255 (autoattack)</h3>" in html


def test_no_zero_shot_tables_for_a_single_dataset(tmp_path):
    from clipguard.report.build import build_report

    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(_record("clip", "cifar10", 0.9, {"2/255": 0.1})))
    info = build_report(folder, tmp_path / "r.md")
    assert info["zero_shot"] == [] and "Zero-shot robustness" not in (tmp_path / "r.md").read_text()
