"""The ``policy`` config section: the cooldown and the rules, each rule checked once at the edge,
and the rules that could never fire refused with both numbers named."""

from __future__ import annotations

import math
from dataclasses import dataclass

from monitor.configutil import Section
from monitor.policy.rules import ACCURACY_SIGNALS, ACTIONS, DEFAULT_RULES, OPS, UNIT_SIGNALS, Rule, signal_floor
from monitor.signals.results import SIGNAL_NAMES


@dataclass(frozen=True)
class PolicyConfig:
    cooldown_seconds: float = 3600.0        # no new retrain of a version this long after one was queued
    rules: tuple[Rule, ...] = DEFAULT_RULES
    default_rules: bool = True              # True when policy.rules was absent


def parse_policy(section: Section) -> PolicyConfig:
    """Read the ``policy`` section; errors (naming the rule and key) are collected in ``section``."""
    cooldown = section.float("cooldown_seconds", PolicyConfig.cooldown_seconds, minimum=0)
    if not section.has("rules"):
        section.finish()
        return PolicyConfig(cooldown_seconds=cooldown)
    rules: list[Rule] = []
    seen: set[str] = set()
    for rs in section.sections("rules"):
        rule = _parse_rule(rs)
        rs.finish()
        name = rs.data.get("name")
        if isinstance(name, str) and name in seen:
            rs.error("name", f"duplicate rule name {name!r}; names must be unique")
        seen.add(name if isinstance(name, str) else "")
        if rule is not None:
            rules.append(rule)
    section.finish()
    return PolicyConfig(cooldown_seconds=cooldown, rules=tuple(rules), default_rules=False)


def _parse_rule(rs: Section) -> Rule | None:
    name = rs.str("name")
    signal = rs.str("signal")
    op = rs.choice("op", OPS, "below" if rs.has("drop_from_reference") else "above")
    threshold = rs.float("threshold", None)
    drop = rs.float("drop_from_reference", None, minimum=0)
    min_rows = rs.int("min_rows", 0, minimum=0)
    consecutive = rs.int("consecutive", 1, minimum=1)
    action = rs.choice("action", ACTIONS, "alert")
    confidence = rs.float("confidence", 0.0, minimum=0.0, maximum=0.999)
    where = f"rule {name!r}" if isinstance(name, str) and name else "rule"
    ok = True
    if isinstance(signal, str) and signal and signal not in SIGNAL_NAMES:
        rs.error("signal", f"{where}: unknown signal {signal!r}; allowed: {', '.join(SIGNAL_NAMES)}")
        ok = False
    if (threshold is None) == (drop is None):
        rs.error("threshold", f"{where}: set exactly one of threshold or drop_from_reference")
        ok = False
    if drop is not None:
        if signal not in ACCURACY_SIGNALS:
            rs.error("drop_from_reference", f"{where}: only for {', '.join(ACCURACY_SIGNALS)}, not {signal!r}")
            ok = False
        if op != "below":
            rs.error("op", f"{where}: drop_from_reference rules fire below the reference; use op: below")
            ok = False
    elif confidence:
        rs.error("confidence", f"{where}: only for drop_from_reference rules (a fixed threshold has no reference "
                               "sample to be uncertain about)")
        ok = False
    if not ok or not name or not signal:
        return None
    return Rule(name, signal, op, threshold, drop, min_rows, consecutive, action, confidence)


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
