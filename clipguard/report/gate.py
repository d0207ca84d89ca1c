"""``clipguard gate``: robustness rules over records, for CI.

A rule reads ``METRIC[(key=value, ...)] OP NUMBER``, e.g. ``robust_acc(attack=pgd, eps=1/255) >= 0.40`` or
``clean_acc1 >= 0.85``. Every record row that matches the filters must satisfy it; a rule that matches no
row fails (a gate that checks nothing must not pass). Exit 0 when all hold, 1 when any fails, 2 when a rule
is malformed.

Integrity checks are gated the same way (1 = passed, 0 = failed): ``checks_passed == 1`` holds when every record
that ran checks passed all of them; ``checks_passed(check=no_nan) == 1`` reads every check of that name (at every
eps; ``eps=`` and the other filters narrow it).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from xml.etree import ElementTree as ET

from clipguard.errors import ClipguardError
from clipguard.fsutil import read_toml
from clipguard.specs import parse_eps

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
METRICS = {"clean_acc1": "acc1", "acc1": "acc1", "acc5": "acc5", "mean_per_class_recall": "mean_per_class_recall",
           "robust_acc": "robust_acc", "attack_success_rate": "attack_success_rate", "fooling_rate": "fooling_rate",
           "perturbed_acc": "perturbed_acc", "checks_passed": "checks_passed"}
FILTERS = ("attack", "eps", "model", "adapter", "label", "dataset", "cell", "surrogate", "task", "check")
_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*(>=|<=|==|>|<)\s*([-+0-9.eE]+)\s*$")


@dataclass
class Rule:
    text: str
    metric: str
    filters: dict = field(default_factory=dict)
    op: str = ">="
    threshold: float = 0.0


def parse_rule(text: str) -> Rule:
    m = _RULE.match(text)
    if not m:
        raise ClipguardError(f"gate rule {text!r} is malformed: write e.g. robust_acc(attack=pgd, eps=1/255) >= 0.40")
    name, args, op, number = m.groups()
    if name not in METRICS:
        raise ClipguardError(f"gate rule {text!r}: unknown metric {name!r}; use one of {', '.join(METRICS)}")
    filters = {}
    for part in filter(None, (a.strip() for a in (args or "").split(","))):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in FILTERS or not value:
            raise ClipguardError(f"gate rule {text!r}: bad filter {part!r}; filters are key=value with key in "
                                 f"{', '.join(FILTERS)}")
        filters[key] = parse_eps(value, name="eps").value if key == "eps" else value
    try:
        threshold = float(number)
    except ValueError:
        raise ClipguardError(f"gate rule {text!r}: {number!r} is not a number") from None
    return Rule(text.strip(), METRICS[name], filters, op, threshold)


def _matches(row: dict, rule: Rule) -> bool:
    if row["metric"] != rule.metric:
        return False
    if row.get("check") is not None and "check" not in rule.filters:  # checks_passed alone: the whole record's
        return False
    for key, want in rule.filters.items():
        have = row.get("eps_value") if key == "eps" else row.get(key)
        if have is None or (abs(have - want) > 1e-9 if key == "eps" else str(have) != want):
            return False
    return True


@dataclass
class Outcome:
    rule: Rule
    passed: bool
    message: str
    checked: int


def evaluate_rule(rule: Rule, rows: list[dict]) -> Outcome:
    hits = [r for r in rows if _matches(r, rule)]
    if not hits:
        names = sorted({r["check"] for r in rows if r.get("check")}) if "check" in rule.filters else []
        known = f" (checks in these records: {', '.join(names)})" if names else ""
        return Outcome(rule, False, f"FAIL {rule.text}: no record matches{known}", 0)
    bad = [r for r in hits if not OPS[rule.op](r["value"], rule.threshold)]
    if not bad:
        worst = min(hits, key=lambda r: r["value"]) if rule.op in (">=", ">") else max(hits, key=lambda r: r["value"])
        return Outcome(rule, True, f"ok   {rule.text}: {len(hits)} value(s), worst {worst['value']:.4f}", len(hits))
    shown = "; ".join(_what(r) + f"={r['value']:.4f}" + (f" ({r['cell']})" if r.get("cell") else "") for r in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return Outcome(rule, False, f"FAIL {rule.text}: {shown}{more}", len(hits))


def _what(row: dict) -> str:
    """A failing row as a reader finds it: the model label, and for checks the failed ones (``name@eps``)."""
    check = row.get("check")
    if check:
        return f"{row['label']} {check}" + (f"@{row['eps']}" if row.get("eps") else "")
    failed = row.get("failed") or []
    return row["label"] + (f" [{', '.join(failed[:3])}{' ...' if len(failed) > 3 else ''}]" if failed else "")


def load_rules(path) -> list[Rule]:
    """Rules from a TOML file: ``rules = ["...", ...]`` and/or ``[[rule]] expr = "..."``."""
    data = read_toml(path, "--rules")
    texts = list(data.get("rules", [])) + [r.get("expr", "") for r in data.get("rule", [])]
    if not texts:
        raise ClipguardError(f"--rules {str(path)!r} holds no rules: add rules = [\"clean_acc1 >= 0.85\"]")
    return [parse_rule(t) for t in texts]


def junit_xml(outcomes: list[Outcome], name: str = "clipguard-gate") -> str:
    failures = sum(not o.passed for o in outcomes)
    suite = ET.Element("testsuite", name=name, tests=str(len(outcomes)), failures=str(failures), errors="0")
    for o in outcomes:
        case = ET.SubElement(suite, "testcase", classname=name, name=o.rule.text)
        if not o.passed:
            ET.SubElement(case, "failure", message=o.message).text = o.message
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode", xml_declaration=True)
