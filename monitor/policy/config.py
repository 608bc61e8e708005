"""The ``policy`` config section: the cooldown and the rules, each rule checked once at the edge,
and the rules that could never fire refused with both numbers named."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from monitor.configutil import Reading, Section, parse_section, setting
from monitor.policy.rules import ACCURACY_SIGNALS, DEFAULT_RULES, UNIT_SIGNALS, Rule, signal_floor
from monitor.signals.results import SIGNAL_NAMES


def _rules(r: Reading) -> tuple[Rule, ...]:
    """``policy.rules``, each rule checked; absent: the default rules (present but empty: none)."""
    if not r.section.has(r.name):
        return DEFAULT_RULES
    rules: list[Rule] = []
    seen: set[str] = set()
    for rs in r.section.sections(r.name):
        rule = parse_section(rs, Rule)
        valid = _check_rule(rs, rule)
        name = rs.data.get("name")
        if isinstance(name, str) and name in seen:
            rs.error("name", f"duplicate rule name {name!r}; names must be unique")
        seen.add(name if isinstance(name, str) else "")
        if valid:
            rules.append(rule)
    return tuple(rules)


@dataclass(frozen=True)
class PolicyConfig:
    cooldown_seconds: float = setting(3600.0, minimum=0)  # no new retrain of a version this long after one was queued
    rules: tuple[Rule, ...] = setting(DEFAULT_RULES, parse=_rules)
    default_rules: bool = setting(True, derived=True)     # True when policy.rules was absent


def parse_policy(section: Section) -> PolicyConfig:
    """Read the ``policy`` section; errors (naming the rule and key) are collected in ``section``."""
    return replace(parse_section(section, PolicyConfig), default_rules=not section.has("rules"))


def _check_rule(rs: Section, rule: Rule) -> bool:
    """What no single key can say: a known signal, exactly one of threshold or drop, a drop only
    on an accuracy signal and below it, a confidence only on a drop. False when the rule is unusable."""
    name, signal, drop = rule.name, rule.signal, rule.drop_from_reference
    where = f"rule {name!r}" if name else "rule"
    ok = True
    if signal and signal not in SIGNAL_NAMES:
        rs.error("signal", f"{where}: unknown signal {signal!r}; allowed: {', '.join(SIGNAL_NAMES)}")
        ok = False
    if (rule.threshold is None) == (drop is None):
        rs.error("threshold", f"{where}: set exactly one of threshold or drop_from_reference")
        ok = False
    if drop is not None:
        if signal not in ACCURACY_SIGNALS:
            rs.error("drop_from_reference", f"{where}: only for {', '.join(ACCURACY_SIGNALS)}, not {signal!r}")
            ok = False
        if rule.op != "below":
            rs.error("op", f"{where}: drop_from_reference rules fire below the reference; use op: below")
            ok = False
    elif rule.confidence:
        rs.error("confidence", f"{where}: only for drop_from_reference rules (a fixed threshold has no reference "
                               "sample to be uncertain about)")
        ok = False
    return ok and bool(name) and bool(signal)


def unreachable_rules(policy: PolicyConfig, *, permutations: int) -> list[tuple[int | None, str]]:
    """Rules that cannot fire by construction, as (index in policy.rules or None for a default
    rule, message naming both numbers): a "below" threshold at or under the smallest value its
    signal can take (the permutation floor of a p-value), an "above" threshold at or over 1 for
    a signal confined to [0, 1]."""
    out: list[tuple[int | None, str]] = []
    for i, rule in enumerate(policy.rules):
        if rule.threshold is None:
            continue
        index = None if policy.default_rules else i
        floor = signal_floor(rule.signal, permutations=permutations)
        if rule.op == "below" and floor is not None and rule.threshold <= floor:
            why = (f"the smallest p-value {permutations} permutations can give is 1/(1+{permutations}) = {floor:.4g}"
                   if rule.signal == "mmd_p_value" else f"{rule.signal} is never below {floor:g}")
            fix = (f"raise signals.mmd.permutations above {math.ceil(1 / rule.threshold) - 1} or the threshold"
                   if rule.signal == "mmd_p_value" else "raise the threshold")
            out.append((index, f"rule {rule.name!r}: threshold {rule.threshold:g} can never be crossed: {why}; {fix}"))
        if rule.op == "above" and rule.signal in UNIT_SIGNALS and rule.threshold >= 1.0:
            out.append((index, f"rule {rule.name!r}: threshold {rule.threshold:g} can never be crossed: "
                               f"{rule.signal} is at most 1; lower the threshold"))
    return out
