"""Command-line options generated from the command configs (:mod:`clipguard.config`), plus the few options that
are not part of any config (--out, --json, --strict). No torch import here: ``clipguard --help`` stays fast."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

from clipguard.config import MODEL_DATA, OUTPUT, PANELS, Field, flag, from_options, option_fields

__all__ = ["MODEL_DATA", "OUTPUT", "Command", "JsonOpt", "OutOpt", "StrictOpt", "command", "config_of"]


class Command(TyperCommand):
    """Typer's command with metavars as the ecosystem writes them (TEXT, INTEGER, FLOAT, PATH; none for a flag or
    ``--help``), where Typer 0.29 would show ``<str>``, ``<int>``, ``<bool>``."""

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if p.param_type_name == "argument":  # its name (RECORDS) says it all: no "<str>" type column
                p.display_type_rich = lambda ctx: None
            elif p.param_type_name == "option" and p.metavar is None:
                bare = p.bare_type() if hasattr(p, "bare_type") else "str"
                p.metavar = "" if getattr(p, "is_flag", False) else _TYPE_METAVARS.get(bare, bare.upper())
        return params


_TYPE_METAVARS = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "Path": "PATH", "bool": ""}


# ---- output: every command writes its JSON record with --out and prints it with --json
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Write the JSON record to this file.", metavar="FILE",
                                             rich_help_panel=OUTPUT)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the JSON record to stdout instead of a table.",
                                       rich_help_panel=OUTPUT)]
# --strict decides the exit code, not what a run measures: no config field, so never in a record or a hash
StrictOpt = Annotated[bool, typer.Option("--strict", help="Exit 1 when an integrity check fails (after the record "
                                         "is written), so CI fails.", rich_help_panel=OUTPUT)]

def _cli_type(f: Field):
    """What Typer parses the option as: the field's own type when it is a plain one (its parser then checks the
    range), else text (the config's parser turns it into an Eps, a Norm, a tuple ...)."""
    args = typing.get_args(f.type) if typing.get_origin(f.type) in (typing.Union, types.UnionType) else (f.type,)
    base = next((t for t in args if t is not type(None)), str)
    repeatable = typing.get_origin(base) is list and (f.opt.parse is None or getattr(f.opt.parse, "repeatable",
                                                                                     False))  # --only a --only b
    text = getattr(f.opt.parse, "takes_text", False)  # pixel units: "64/255" is a float to the config, not to Typer
    base = base if (base in (int, float, bool, str) and not text) or repeatable else str
    return base | None if type(None) in args or f.default is None else base


def _parameter(f: Field) -> inspect.Parameter:
    kind = _cli_type(f)
    bare = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
    decls = [flag(f.name)] + ([f.opt.short] if f.opt.short else [])
    choices = getattr(f.opt.parse, "choices", None)
    listed = "|".join(choices) if choices and len("|".join(choices)) <= 20 else None
    metavar = "" if bare is bool else f.opt.metavar or listed
    if f.opt.argument:
        info = typer.Argument(help=f.opt.help, metavar=f.opt.metavar or f.name.upper(), show_default=False)
    else:
        info = typer.Option(*decls, help=f.opt.help, rich_help_panel=f.opt.panel, metavar=metavar)  # None: Command's
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, info],
                             default=f.default)


def command(cls):
    """Give a command every option of config ``cls`` (generated from its fields) and hand it one parsed ``cfg``.

    The command's own parameters (``out``, ``json_out``) follow. ``--out`` is probed for writing first, before the
    config's checks import anything heavy, so a bad output path fails in a second."""
    generated = [_parameter(f) for f in option_fields(cls, cli_only=True)]

    def deco(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values() if p.name != "cfg"]
        names = {p.name for p in generated}

        @functools.wraps(fn)
        def wrapper(**kw):
            if "out" not in names and kw.get("out") is not None:  # the record's --out (a config's own is parsed)
                from clipguard.fsutil import check_writable

                check_writable(kw["out"], "--out")
            cfg = from_options(cls, {k: kw.pop(k) for k in list(kw) if k in names})
            return fn(cfg, **kw)

        params = sorted(generated + own, key=_panel_rank)  # the same panel order in every command
        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        wrapper.clipguard_config = cls
        return wrapper

    return deco


def _panel_rank(p: inspect.Parameter) -> int:
    info = getattr(p.annotation, "__metadata__", [None])[0]
    panel = getattr(info, "rich_help_panel", None)
    return PANELS.index(panel) if panel in PANELS else len(PANELS)


def config_of(fn) -> type | None:
    """The config class a command's options were generated from (None for a command without one)."""
    return getattr(fn, "clipguard_config", None)
