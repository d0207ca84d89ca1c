"""One config per command: every option declared once, on its config field, and read from there by --help, the
parser, records, suite cells and hashes."""

import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from clipguard.cli import options as o
from clipguard.cli.app import app
from clipguard.config import ATTACK, TRAIN, flat, from_options, option, option_fields
from clipguard.errors import ClipguardError
from clipguard.finetune.config import FinetuneConfig, config_hash, finetune_config
from clipguard.tasks.configs import EvalConfig, eval_config


def _commands(group=None, path=()):
    """(path, click command) for every command of the app, sub-apps included."""
    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*path, name))
        else:
            yield (*path, name), cmd


CONFIG_COMMANDS = [(p, c) for p, c in _commands() if o.config_of(c.callback)]


def test_every_command_is_generated_from_its_config():
    assert len(CONFIG_COMMANDS) == len(list(_commands())) == 14, [p for p, _ in _commands()]


@pytest.mark.parametrize("path,cmd", CONFIG_COMMANDS, ids=[" ".join(p) for p, _ in CONFIG_COMMANDS])
def test_each_option_default_and_help_come_from_its_config_field(path, cmd):
    cls = o.config_of(cmd.callback)
    fields = {f.name: f for f in option_fields(cls, cli_only=True)}
    own = ("json_out", "strict")  # output behaviour, not part of what a run measures: declared in cli/options
    params = {p.name: p for p in cmd.params if p.name not in own and (p.name != "out" or "out" in fields)}
    assert set(params) == set(fields)  # every field is an option, and nothing else is
    for name, p in params.items():
        f = fields[name]
        assert p.help == f.opt.help, name
        assert p.default == f.default, name
        assert p.opts[0] == (name if f.opt.argument else "--" + name.replace("_", "-"))


def test_a_field_added_to_a_config_appears_everywhere_with_no_other_edit(monkeypatch, tmp_path):
    """A throwaway field on a config: --help, the parsed value in the command, the record's config, the suite cell
    schema (type check) and the training hash all see it."""
    monkeypatch.chdir(tmp_path)  # the configs probe (create) their --run-dir: not in the checkout

    @dataclass(frozen=True)
    class Thrown(FinetuneConfig):
        throwaway: int = option(3, panel=TRAIN, help="A throwaway option (test).")

    seen = {}
    demo = typer.Typer()

    @demo.command(cls=o.Command)
    @o.command(Thrown)
    def run(cfg: Thrown, out: o.OutOpt = None, json_out: o.JsonOpt = False) -> None:
        seen["cfg"] = cfg

    @demo.command("other")
    def other() -> None:  # two commands, so Typer keeps the command name
        pass

    runner = CliRunner()
    help_text = runner.invoke(demo, ["run", "--help"], env={"COLUMNS": "200"}).output
    assert "--throwaway" in help_text and "A throwaway option (test)." in help_text and "[default: 3]" in help_text
    res = runner.invoke(demo, ["run", "--throwaway", "5", "--run-dir", "unused"])
    assert res.exit_code == 0, res.output
    cfg = seen["cfg"]
    assert cfg.throwaway == 5 and flat(cfg)["throwaway"] == 5  # the record's config
    with pytest.raises(ClipguardError, match=r"suite cell 'c': throwaway = 'x' should be int"):
        from_options(Thrown, {"throwaway": "x", "run_dir": "unused"}, where="suite cell 'c'")
    same = from_options(Thrown, {"throwaway": 3, "run_dir": "unused"}, where="suite cell 'c'")
    other_value = from_options(Thrown, {"throwaway": 4, "run_dir": "unused"}, where="suite cell 'c'")
    assert config_hash(same) != config_hash(other_value)  # the training hash covers it


def test_finetune_hashes_of_existing_fields_are_those_of_the_code_before_the_configs(monkeypatch, tmp_path):
    """Computed with the pre-config code (commit f3710f5): a run started before the change resumes after it."""
    monkeypatch.chdir(tmp_path)  # the configs probe (create) their --run-dir: not in the checkout
    assert config_hash(finetune_config(run_dir="x")) == \
        "f65f7313da39b44d099e8eae08285e162530267a119d903b8359a46c494284e7"
    assert config_hash(finetune_config(method="vpt", vpt_tokens=50, objective="fare", eps="2/255", alpha="1/255",
                                       max_steps=30, run_dir="x")) == \
        "5acfac0b2b185bc89c2ce81b9c20555b69f8b558d34dfcf283b6e7817a8b289e"
    # twin: a field that trains changes it; one that does not (where the run writes) does not
    assert config_hash(finetune_config(run_dir="x", lr=1e-3)) != config_hash(finetune_config(run_dir="x"))
    assert config_hash(finetune_config(run_dir="y", eval_steps=3)) == config_hash(finetune_config(run_dir="x"))


def test_options_are_parsed_once_into_typed_values():
    from clipguard.specs import Eps, Norm

    cfg = eval_config(attack="pgd", eps="0,4/255", norm="L2", alpha="1/255", aa_attacks=None)
    assert cfg.eps == (Eps(0.0, "0"), Eps(4 / 255, "4/255")) and cfg.norm is Norm.L2 and cfg.alpha.text == "1/255"
    assert flat(cfg)["eps"] == "0,4/255" and flat(cfg)["norm"] == "l2"
    assert eval_config(**{k: v for k, v in flat(cfg).items() if v is not None}) == cfg  # records round-trip
    with pytest.raises(ClipguardError, match="--eps 9 = 9 is above 1: .*did you mean 9/255"):
        eval_config(attack="pgd", eps="9")


def test_an_l2_radius_may_exceed_1_an_linf_one_may_not():
    """An L2 radius is a norm over the whole image (3.0 is a common ImageNet radius; the toy's 32 px images reach
    55): above 1 is allowed for --norm l2, in eval/attack and uap, and refused for L-inf, where a fraction above 1
    gets no "x/255/255" hint."""
    from clipguard.tasks.configs import UAPFitConfig

    assert [e.value for e in eval_config(attack="pgd", norm="l2", eps="0.5,3,1000/255").eps] == [0.5, 3.0, 1000 / 255]
    assert eval_config(attack="pgd", norm="l2", eps="3", alpha="0.75").alpha.value == 0.75
    assert UAPFitConfig(uap="/tmp/u.safetensors", norm="l2", eps="2").eps.value == 2.0
    with pytest.raises(ClipguardError, match=r"--eps 300/255 = 1.17647 is above 1: an L-inf radius .*whole range") \
            as e:
        eval_config(attack="pgd", eps="300/255")
    assert "/255/255" not in str(e.value)
    with pytest.raises(ClipguardError, match="--eps 2 = 2 is above 1"):
        UAPFitConfig(uap="/tmp/u.safetensors", eps="2")
    with pytest.raises(ClipguardError, match="--alpha 2 = 2 is above 1"):
        eval_config(attack="pgd", eps="8/255", alpha="2")
    with pytest.raises(ClipguardError, match="--steps is not used by --attack fgsm"):
        eval_config(attack="fgsm", steps=3)
    with pytest.raises(ClipguardError, match="--batch-size 0 must be a positive whole number"):
        eval_config(batch_size=0)


def test_a_suite_cell_with_an_unknown_option_or_type_is_one_line():
    with pytest.raises(ClipguardError, match=r"suite cell 'x': option\(s\) epss unknown here"):
        from_options(EvalConfig, {"epss": "1/255"}, where="suite cell 'x'")
    with pytest.raises(ClipguardError, match="suite cell 'x': limit = '10' should be int | None"):
        from_options(EvalConfig, {"limit": "10"}, where="suite cell 'x'")


def test_help_metavars_read_as_the_ecosystem_writes_them():
    env = {**os.environ, "COLUMNS": "200"}
    for path, _ in _commands():
        out = subprocess.run([sys.executable, "-m", "clipguard.cli.app", *path, "--help"], capture_output=True,
                             text=True, env=env).stdout
        assert out and not re.search(r"<(str|int|float|bool|Path)>", out), (path, out)
    eval_help = subprocess.run([sys.executable, "-m", "clipguard.cli.app", "eval", "--help"], capture_output=True,
                               text=True, env=env).stdout
    assert re.search(r"--eps\s+EPS", eval_help) and re.search(r"--limit\s+N\b", eval_help)
    assert re.search(r"--sanity\s+Also run", eval_help)  # a flag shows no metavar
    assert re.search(r"--resolution\s+model\|native", eval_help)  # a choice shows its choices
    assert ATTACK in eval_help


@pytest.mark.parametrize("suite, records", [("toy.toml", "bench-toy-cpu"), ("certify-toy.toml", "certify-toy-cpu"),
                                            ("leaderboard-toy.toml", "leaderboard-toy-cpu")])
def test_committed_suite_records_still_count_as_done(suite, records):
    """The records committed under benchmarks/results were made before the configs moved onto field metadata: their
    config hashes must still match, so `bench run` skips those cells instead of recomputing them."""
    import json
    from pathlib import Path

    from clipguard.tasks.bench import config_hash, load_suite

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    _, cells = load_suite(root / suite)
    hashes, checked = {}, 0
    for cell in cells:
        hashes[cell["id"]] = h = config_hash(cell, hashes)
        path = root / "results" / records / f"{cell['id']}.json"
        assert path.is_file(), path
        assert json.loads(path.read_text())["bench"]["config_hash"] == h, cell["id"]
        checked += 1
    assert checked == len(cells) > 3
    # twin: one changed option changes the hash, so the comparison above could fail
    assert config_hash({**cells[0], "seed": 1}, {}) != hashes[cells[0]["id"]]


def test_sanity_with_fgsm_needs_a_sweep():
    """FGSM has no steps to double, no restarts and no FGSM to beat: at one eps --sanity would add no check while the
    record says sanity: true. Refused there; with a sweep the monotone check runs, and PGD takes it at one eps."""
    with pytest.raises(ClipguardError, match="--sanity with --attack fgsm .* two or more eps"):
        eval_config(attack="fgsm", eps="8/255", sanity=True)
    assert eval_config(attack="fgsm", eps="0,8/255", sanity=True).sanity
    assert eval_config(attack="pgd", eps="8/255", sanity=True).sanity
