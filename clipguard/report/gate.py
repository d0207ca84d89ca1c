"""``clipguard gate``: robustness rules over records, for CI.

A rule reads ``METRIC[(key=value, ...)] OP NUMBER``, e.g. ``robust_acc(attack=pgd, eps=1/255) >= 0.40`` or
``clean_acc1 >= 0.85``. Every record row that matches the filters must satisfy it; a rule that matches no
row fails (a gate that checks nothing must not pass). Exit 0 when all hold, 1 when any fails, 2 when a rule
is malformed.

Integrity checks are gated the same way (1 = passed, 0 = failed): ``checks_passed == 1`` holds when every record
that ran checks passed all of them; ``checks_passed(check=no_nan) == 1`` reads every check of that name (at every
eps; ``eps=`` and the other filters narrow it).

Against a baseline (``--baseline RECORDS``): ``robust_acc(attack=pgd, eps=4/255) >= baseline`` (or ``>= baseline -
0.01``) compares each matching row with the baseline's row of the same metric, dataset, attack and eps. In a TOML
rule table, ``significant = true`` fails such a drop only when the exact McNemar test on the two runs' per-image
predictions rejects at the table's ``level`` (default 0.05; each row tested on its own, no multiplicity
adjustment: a gate errs towards failing); without predictions the rule fails ("no predictions: not tested").
``min_lower = 0.40`` asks the lower end of each matching number's interval (``<metric>_ci``) to clear 0.40; its
``expr`` may then be the bare metric, ``robust_acc(attack=pgd, eps=4/255)``.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from xml.etree import ElementTree as ET

from clipguard.errors import ClipguardError
from clipguard.fsutil import read_toml
from clipguard.report.significance import NOT_TESTED, PAIRED_METRICS, counterpart, paired_test
from clipguard.specs import parse_eps

OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
METRICS = {"clean_acc1": "acc1", "acc1": "acc1", "acc5": "acc5", "mean_per_class_recall": "mean_per_class_recall",
           "robust_acc": "robust_acc", "attack_success_rate": "attack_success_rate", "fooling_rate": "fooling_rate",
           "perturbed_acc": "perturbed_acc", "checks_passed": "checks_passed"}
FILTERS = ("attack", "eps", "model", "adapter", "label", "dataset", "cell", "surrogate", "task", "check")
_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*(?:(>=|<=|==|>|<)\s*(baseline\s*(?:[-+]\s*"
                   r"[0-9.eE+-]+)?|[-+0-9.eE]+))?\s*$")
TABLE_KEYS = ("expr", "significant", "level", "min_lower")


@dataclass
class Rule:
    text: str
    metric: str
    filters: dict = field(default_factory=dict)
    op: str | None = ">="  # None: a bare metric, checked by min_lower alone
    threshold: float = 0.0  # against a baseline: the margin added to the baseline's value (">= baseline - 0.01")
    baseline: bool = False  # the bar is the baseline record's value of the same number (--baseline)
    significant: bool = False  # a baseline rule fails only when the paired test rejects at ``level``
    level: float = 0.05
    min_lower: float | None = None  # the lower end of each number's interval must be >= this


def parse_rule(text: str, *, bare: bool = False) -> Rule:
    """A rule string; ``bare`` (a table with ``min_lower``) also accepts a metric without a comparison."""
    m = _RULE.match(text)
    if not m or (m.group(3) is None and not bare):
        raise ClipguardError(f"gate rule {text!r} is malformed: write e.g. robust_acc(attack=pgd, eps=1/255) >= 0.40"
                             " or ... >= baseline")
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
    baseline = number is not None and number.startswith("baseline")
    margin = number[len("baseline"):].replace(" ", "") if baseline else number
    try:
        threshold = float(margin) if margin else 0.0
    except ValueError:
        raise ClipguardError(f"gate rule {text!r}: {margin!r} is not a number") from None
    return Rule(text.strip(), METRICS[name], filters, op, threshold, baseline=baseline)


def table_rule(table: dict, where: str) -> Rule:
    """A ``[[rule]]`` table: ``expr`` plus ``significant`` / ``level`` (a baseline rule) and ``min_lower``."""
    unknown = sorted(set(table) - set(TABLE_KEYS))
    if unknown or not isinstance(table.get("expr"), str):
        raise ClipguardError(f"{where}: a [[rule]] table takes expr = \"...\" and optionally "
                             f"{', '.join(TABLE_KEYS[1:])}" + (f" (not {', '.join(unknown)})" if unknown else ""))
    min_lower, level = table.get("min_lower"), table.get("level", 0.05)
    rule = parse_rule(table["expr"], bare=min_lower is not None)
    if min_lower is not None and (isinstance(min_lower, bool) or not isinstance(min_lower, int | float)):
        raise ClipguardError(f"{where}: rule {rule.text!r}: min_lower = {min_lower!r} must be a number (e.g. 0.40)")
    if isinstance(level, bool) or not isinstance(level, int | float) or not 0 < level < 1:
        raise ClipguardError(f"{where}: rule {rule.text!r}: level = {level!r} must be in (0, 1), e.g. 0.05")
    significant = table.get("significant", False)
    if not isinstance(significant, bool):
        raise ClipguardError(f"{where}: rule {rule.text!r}: significant must be true or false")
    if significant and not rule.baseline:
        raise ClipguardError(f"{where}: rule {rule.text!r}: significant = true tests a drop against a baseline: "
                             "write METRIC(...) >= baseline and give --baseline RECORDS")
    if significant and rule.metric not in PAIRED_METRICS:
        raise ClipguardError(f"{where}: rule {rule.text!r}: significant = true pairs per-image predictions, which "
                             f"exist for {', '.join(PAIRED_METRICS)} only")
    return Rule(rule.text, rule.metric, rule.filters, rule.op, rule.threshold, baseline=rule.baseline,
                significant=significant, level=float(level),
                min_lower=None if min_lower is None else float(min_lower))


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


def evaluate_rule(rule: Rule, rows: list[dict], baseline: list[dict] | None = None) -> Outcome:
    """One rule over the rows of RECORDS (``baseline``: the rows of --baseline, for ``>= baseline`` rules)."""
    hits = [r for r in rows if _matches(r, rule)]
    if not hits:
        names = sorted({r["check"] for r in rows if r.get("check")}) if "check" in rule.filters else []
        known = f" (checks in these records: {', '.join(names)})" if names else ""
        return Outcome(rule, False, f"FAIL {rule.text}: no record matches{known}", 0)
    if rule.baseline or rule.min_lower is not None:
        return _evaluate_against(rule, hits, baseline)
    bad = [r for r in hits if not OPS[rule.op](r["value"], rule.threshold)]
    if not bad:
        worst = min(hits, key=lambda r: r["value"]) if rule.op in (">=", ">") else max(hits, key=lambda r: r["value"])
        return Outcome(rule, True, f"ok   {rule.text}: {len(hits)} value(s), worst {worst['value']:.4f}", len(hits))
    shown = "; ".join(_what(r) + f"={r['value']:.4f}" + (f" ({r['cell']})" if r.get("cell") else "") for r in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return Outcome(rule, False, f"FAIL {rule.text}: {shown}{more}", len(hits))


def _evaluate_against(rule: Rule, hits: list[dict], baseline: list[dict] | None) -> Outcome:
    """A rule with ``min_lower`` and / or a baseline bar: each hit's failure, or its note when it passed only
    because a drop was not significant."""
    if rule.baseline and baseline is None:
        raise ClipguardError(f"gate rule {rule.text!r} compares against a baseline: give --baseline RECORDS (the "
                             "records of the run to compare with)")
    failures, notes = [], []
    for r in hits:
        failure, note = _judge(rule, r, baseline or [])
        failures += [failure] if failure else []
        notes += [note] if note else []
    if not failures:
        extra = f"; {'; '.join(notes[:3])}" if notes else ""
        return Outcome(rule, True, f"ok   {rule.text}: {len(hits)} value(s){extra}", len(hits))
    more = f" and {len(failures) - 3} more" if len(failures) > 3 else ""
    return Outcome(rule, False, f"FAIL {rule.text}: {'; '.join(failures[:3])}{more}", len(hits))


def _judge(rule: Rule, r: dict, baseline: list[dict]) -> tuple[str | None, str | None]:
    """(why row ``r`` fails the rule or None, a note on a drop that passed as not significant)."""
    where = _what(r) + (f" ({r['cell']})" if r.get("cell") else "")
    if rule.min_lower is not None:
        ci = r.get("ci")
        if ci is None:
            return f"{where}: its record holds no interval (made before intervals: run it again)", None
        if ci[0] < rule.min_lower:
            return f"{where}: interval lower end {ci[0]:.4f} < {rule.min_lower:g} (value {r['value']:.4f})", None
    if rule.op is None:
        return None, None
    if not rule.baseline:
        return (None if OPS[rule.op](r["value"], rule.threshold) else f"{where}={r['value']:.4f}"), None
    base = counterpart(r, baseline)
    if base is None:
        return f"{where}: no single baseline number of the same metric, dataset, attack and eps", None
    if OPS[rule.op](r["value"], base["value"] + rule.threshold):
        return None, None
    msg = f"{where}={r['value']:.4f} vs baseline {base['label']}={base['value']:.4f}"
    if not rule.significant:
        return msg, None
    test = paired_test(r, base, confidence=1 - rule.level)
    if test is None:
        return f"{msg} ({NOT_TESTED})", None
    if test["p"] >= rule.level:
        return None, f"{msg}, not significant (exact McNemar p={test['p']:.3g} >= {rule.level:g})"
    return f"{msg}, significant (exact McNemar p={test['p']:.3g} < {rule.level:g})", None


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
    texts, tables = list(data.get("rules", [])), list(data.get("rule", []))
    if not texts and not tables:
        raise ClipguardError(f"--rules {str(path)!r} holds no rules: add rules = [\"clean_acc1 >= 0.85\"]")
    return [parse_rule(t) for t in texts] + [table_rule(t, f"--rules {str(path)!r}") for t in tables]


def junit_xml(outcomes: list[Outcome], name: str = "clipguard-gate") -> str:
    failures = sum(not o.passed for o in outcomes)
    suite = ET.Element("testsuite", name=name, tests=str(len(outcomes)), failures=str(failures), errors="0")
    for o in outcomes:
        case = ET.SubElement(suite, "testcase", classname=name, name=o.rule.text)
        if not o.passed:
            ET.SubElement(case, "failure", message=o.message).text = o.message
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode", xml_declaration=True)
