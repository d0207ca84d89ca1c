"""Typed, frozen command configs whose fields declare their own options (tyro / simple_parsing's idea, with Typer).

A config is a frozen dataclass deriving from :class:`Config`; each field is declared with :func:`option`: its
default (as a user types it), help text, help panel and parser. Everything else reads that one declaration:

- ``cli.options.command(Cfg)`` generates the command's Typer options (flag, metavar, default, help, panel);
- :func:`from_options` builds a config from flat options (command-line values, a suite cell, keyword arguments),
  refusing unknown names and values of the wrong type in one line;
- construction parses every field once (``"8/255"`` -> :class:`~clipguard.specs.Eps`, a comma list -> a tuple, an
  output path -> probed for writing) and runs the config's ``check()``: tasks receive parsed, checked configs;
- :func:`flat` is what records and config hashes store (parsed values written back as text).

A field whose type is itself a Config (``run: RunOptions``) is inlined: its options are the command's options.
No torch import here (``clipguard --help`` stays fast).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

from clipguard.errors import ClipguardError

# Help panels, in the order every command shows them.
MODEL_DATA, ATTACK, TRAIN, EVALUATION, SMOOTHING, CHECK, OUTPUT, PERF = (
    "Model & data", "Attack", "Training", "Final evaluation", "Smoothing", "Integrity check", "Output", "Performance")
PANELS = (MODEL_DATA, ATTACK, TRAIN, EVALUATION, SMOOTHING, CHECK, OUTPUT, PERF, "Ray (--executor ray)",
          "Slurm (--executor slurm)")


@dataclass(frozen=True)
class Opt:
    """What one config field says about itself as an option."""

    help: str  # the --help text (units included)
    panel: str  # the --help panel
    parse: Callable[[Any, str], Any] | None = None  # (value, "--flag") -> typed value; must accept its own output
    dump: Callable[[Any], Any] | None = None  # typed value -> what records / hashes store (default: see _dump)
    metavar: str | None = None  # TEXT, INTEGER, EPS, SPEC ... (default: from the type)
    short: str | None = None  # a one-letter alias ("-m")
    cli: bool = True  # False: not offered on the command line (set by the command or a suite)
    argument: bool = False  # a positional argument (report RECORDS) instead of an option
    omit_at_default: bool = False  # flat() leaves it out at its default: hashes of runs made before it stay valid
    speed_only: bool = False  # changes how fast a run goes, not what it measures: omitted at default, never hashed
    trains: bool = True  # part of a training run's trajectory (FinetuneConfig's hash); False: free to change on resume


def option(default: Any = MISSING, *, help: str, panel: str, factory: Callable[[], Any] | None = None, **kw) -> Any:
    """A config field with its option metadata (see :class:`Opt`); ``default`` is written as a user types it."""
    meta = {"opt": Opt(help=help, panel=panel, **kw)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class Config:
    """Base of every command config (use with ``@dataclass(frozen=True)``): parses its fields on construction,
    then runs :meth:`check`. ``EXCLUDE`` names inlined options a command does not offer; ``HELP`` overrides
    the help text of an inlined option for this command."""

    EXCLUDE: ClassVar[tuple[str, ...]] = ()
    HELP: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        parsed = [(f.name, f.metadata["opt"].parse) for f in fields(self)
                  if "opt" in f.metadata and f.metadata["opt"].parse is not None and getattr(self, f.name) is not None]
        outputs = [(name, parse) for name, parse in parsed if getattr(parse, "probes", False)]
        for name, parse in parsed:
            if (name, parse) not in outputs:
                object.__setattr__(self, name, parse(getattr(self, name), flag(name)))
        self.check()
        for name, parse in outputs:  # probed last, after every other check: a bad option leaves no folder behind
            object.__setattr__(self, name, parse(getattr(self, name), flag(name)))

    def check(self) -> None:
        """Checks across fields (each field's own checks are in its parser). One ClipguardError naming the option."""

    @classmethod
    def complete(cls, opts: dict) -> dict:
        """Flat options before they are parsed: a config may fill in what is implied (a resumed run's own options)."""
        return opts


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def given(cfg, names: tuple[str, ...]) -> list[str]:
    """The flags among ``names`` whose value in ``cfg`` differs from the command's default (what a user set)."""
    defaults = {f.name: _parsed(f, f.default) for f in option_fields(type(cfg))}
    return [flag(n) for n in names if getattr(cfg, n) != defaults[n]]


# ------------------------------------------------------------------------------------------- field walking


@dataclass(frozen=True)
class Field:
    """One option of a config, with nested configs inlined."""

    name: str
    type: Any  # the resolved annotation
    opt: Opt
    default: Any  # as declared (the text a user types), for --help and flat()'s omit-at-default
    owner: type  # the config class that declares it


def nested(cls) -> dict[str, type]:
    """{field name: Config class} for the fields of ``cls`` that are configs themselves (inlined options)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)
            if isinstance(hints[f.name], type) and issubclass(hints[f.name], Config)}


def option_fields(cls, *, cli_only: bool = False) -> list[Field]:
    """Every option of ``cls`` in declared order, inlined configs' options in place; ``cli_only``: only those the
    command line offers (``Opt.cli``, less the config's ``EXCLUDE``)."""
    hints, inner, out = typing.get_type_hints(cls), nested(cls), []
    for f in fields(cls):
        if f.name in inner:
            base = f.default_factory() if f.default_factory is not MISSING else inner[f.name]()
            for sub in option_fields(inner[f.name], cli_only=cli_only):
                if cli_only and sub.name in cls.EXCLUDE:  # not offered by this command, still recorded and hashed
                    continue
                default = getattr(base, sub.name)
                declared = sub.default if default == _parsed(sub, sub.default) else _dump(default)
                opt = dataclasses.replace(sub.opt, help=cls.HELP[sub.name]) if sub.name in cls.HELP else sub.opt
                out.append(dataclasses.replace(sub, default=declared, opt=opt))
            continue
        o = f.metadata.get("opt")
        if o is None or (cli_only and not o.cli):
            continue
        default = f.default if f.default is not MISSING else _dump(f.default_factory())
        out.append(Field(f.name, hints[f.name], o, default, cls))
    return out


def _parsed(f: Field, value: Any) -> Any:
    return f.opt.parse(value, flag(f.name)) if f.opt.parse is not None and value is not None else value


def _dump(value: Any) -> Any:
    """A parsed value as records and hashes store it: Eps -> its text, a tuple of Eps -> "a,b", Path -> str,
    an enum -> its value, a tuple -> a list."""
    from clipguard.specs import Eps  # lazy: keeps `import clipguard` light

    if isinstance(value, Eps):
        return value.text
    if isinstance(value, tuple) and value and all(isinstance(v, Eps) for v in value):
        return ",".join(v.text for v in value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_dump(v) for v in value]
    return value


def dumped(f: Field, value: Any) -> Any:
    return f.opt.dump(value) if f.opt.dump is not None else _dump(value)


# ---------------------------------------------------------------------------------------- build and flatten


def from_options(cls, opts: dict, *, where: str | None = None):
    """A ``cls`` config from flat options (inlined configs' options by their own names), with the command's
    defaults for the rest. ``where`` (e.g. "suite cell 'base'") makes unknown names and wrongly typed values a
    one-line error naming it; without it, values are trusted to be the command line's."""
    opts = cls.complete(opts)
    known = {f.name: f for f in option_fields(cls)}
    if where is not None:
        unknown = sorted(set(opts) - set(known))
        if unknown:
            raise ClipguardError(f"{where}: option(s) {', '.join(unknown)} unknown here")
        for key, value in opts.items():
            _check_type(known[key], value, where)
    kwargs: dict[str, Any] = {}
    for name, sub in nested(cls).items():
        f = next(f for f in fields(cls) if f.name == name)
        base = f.default_factory() if f.default_factory is not MISSING else sub()
        given = {k: v for k, v in opts.items() if k in {g.name for g in fields(sub)}}
        kwargs[name] = dataclasses.replace(base, **given) if given else base
    own = {f.name for f in fields(cls)} - set(kwargs)
    kwargs.update({k: v for k, v in opts.items() if k in own})
    return cls(**kwargs)


_JSON_TYPES = {int: (int,), float: (int, float), str: (str,), bool: (bool,), type(None): (type(None),),
               Path: (str,), list: (list,), tuple: (list,)}


def _check_type(f: Field, value: Any, where: str) -> None:
    """A suite value must be of the field's declared type (or, for a parsed field, text or a number)."""
    args = typing.get_args(f.type) if _is_union(f.type) else (f.type,)
    plain = all(t in (int, float, bool, str, type(None)) for t in args)
    allowed: tuple = (str, int, float) if f.opt.parse is not None and not plain else ()  # "8/255" or 0.0314
    for t in args:
        allowed += _JSON_TYPES.get(typing.get_origin(t) or t, (t,) if isinstance(t, type) else ())
    if f.opt.parse is not None and value is None and type(None) not in allowed:
        allowed = ()
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise ClipguardError(f"{where}: {f.name} = {value!r} should be {_type_name(f.type)}")


def _is_union(t) -> bool:
    return typing.get_origin(t) in (typing.Union, types.UnionType)


def _type_name(t) -> str:
    if _is_union(t):
        return " | ".join(_type_name(a) for a in typing.get_args(t))
    return "None" if t is type(None) else getattr(t, "__name__", str(t))


def flat(cfg) -> dict:
    """A config as one flat dict (inlined configs first): what records and config hashes store. Fields marked
    ``omit_at_default`` or ``speed_only`` are left out at their default."""
    out = {}
    for f in option_fields(type(cfg)):
        value = getattr(_owner(cfg, f), f.name)
        if (f.opt.omit_at_default or f.opt.speed_only) and value == _parsed(f, f.default):
            continue
        out[f.name] = dumped(f, value)
    return out


def _owner(cfg, f: Field):
    """The (possibly inlined) config instance that holds field ``f``."""
    if f.owner is type(cfg):
        return cfg
    for name in nested(type(cfg)):
        inner = getattr(cfg, name)
        if any(g.name == f.name for g in fields(inner)):
            return inner
    raise KeyError(f.name)


# -------------------------------------------------------------------------------------------------- parsers


def positive(value, name: str):
    """An integer option that must be >= 1."""
    if int(value) != value or value < 1:
        raise ClipguardError(f"{name} {value} must be a positive whole number")
    return int(value)


def non_negative(value, name: str):
    if int(value) != value or value < 0:
        raise ClipguardError(f"{name} {value} must be a whole number >= 0")
    return int(value)


def in_range(lo: float, hi: float | None, what: str, *, lo_open: bool = False, hi_open: bool = True, cast=float):
    """A parser of a number in [lo, hi) (``lo_open`` / ``hi_open`` choose the ends; ``hi`` None: no upper end);
    outside, one line: "--NAME VALUE must be WHAT"."""

    def parse(value, name: str):
        v = float(value)
        below = v <= lo if lo_open else v < lo
        above = hi is not None and (v >= hi if hi_open else v > hi)
        if below or above:
            raise ClipguardError(f"{name} {value} must be {what}")
        return cast(v)

    return parse


def choice(*names: str):
    """A parser accepting one of ``names`` (case-insensitive), else a one-line error listing them."""

    def parse(value, name: str) -> str:
        text = str(value).strip().lower()
        if text not in names:
            from clipguard.registry import unknown_choice  # lazy: keeps `import clipguard` light

            raise unknown_choice(name, value, list(names))
        return text

    parse.choices = names
    return parse


def pixel_units(*, allow_zero: bool = True, upper: float | None = 1):
    """A parser of one pixel-unit value (``8/255``, ``0.0314``) into an Eps; ``upper=None`` for a radius whose
    norm the config checks (an L2 radius may exceed 1)."""

    def parse(value, name: str):
        from clipguard.specs import Eps, parse_eps  # lazy: keeps `import clipguard` light

        return value if isinstance(value, Eps) else parse_eps(str(value), name=name, allow_zero=allow_zero,
                                                                  upper=upper)

    parse.takes_text = True
    return parse


def pixel_float(*, allow_zero: bool = True):
    """A parser of one pixel-unit value into a plain float (``64/255`` accepted, ``25`` asks about /255)."""
    inner = pixel_units(allow_zero=allow_zero)

    def parse(value, name: str) -> float:
        return inner(value, name).value  # a float too: 0.0 or 25.0 from a script is checked like the CLI's text

    parse.takes_text = True
    return parse


def eps_list(value, name: str, *, upper: float | None = 1) -> tuple:
    """A comma list of pixel-unit values (``0,4/255,8/255``) into a tuple of Eps."""
    from clipguard.specs import Eps, parse_eps_list  # lazy: keeps `import clipguard` light

    if isinstance(value, Eps):
        return (value,)
    if isinstance(value, tuple) and all(isinstance(v, Eps) for v in value):
        return value
    first: dict[float, Eps] = {}
    for e in parse_eps_list(str(value), name=name, upper=upper):  # a value given twice (8/255,8/255): once
        first.setdefault(e.value, e)
    return tuple(first.values())


eps_list.takes_text = True


def radius_list(value, name: str) -> tuple:
    """:func:`eps_list` without the bound of 1: radii whose config checks them by norm (an L2 radius may exceed 1;
    an L-inf one is refused above 1 by ``specs.check_linf_eps``)."""
    return eps_list(value, name, upper=None)


radius_list.takes_text = True


def comma_list(value, name: str) -> tuple[str, ...]:
    """``"a, b"`` (or a list) -> ("a", "b"); empty is refused."""
    parts = value if isinstance(value, list | tuple) else [value]
    items = tuple(v.strip() for part in parts for v in str(part).split(","))
    items = tuple(v for v in items if v)
    if not items:
        raise ClipguardError(f"{name} is empty: give a comma list")
    return items


def output_file(value, name: str) -> Path:
    """An output file path, probed for writing now (before any work)."""
    from clipguard.fsutil import check_writable  # lazy: keeps `import clipguard` light

    check_writable(value, name)
    return Path(value)


output_file.probes = True


def output_dir(value, name: str) -> Path:
    """An output folder, probed for writing now (before any work)."""
    from clipguard.fsutil import check_writable  # lazy: keeps `import clipguard` light

    check_writable(value, name, directory=True)
    return Path(value)


output_dir.probes = True


def input_path(value, name: str) -> Path:
    return Path(value)
