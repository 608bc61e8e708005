"""Trigger policy: parsing, hysteresis, cooldown, deferral, persisted state."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.config import parse_config
from monitor.configutil import Section
from monitor.errors import ConfigError, StateError
from monitor.policy import DEFAULT_RULES, Policy, PolicyConfig, RetrainBudget, Rule, parse_policy
from daemon_helpers import make_window

NOW = 1_800_000_000.0


def _parse(data: dict) -> tuple[PolicyConfig, list[str]]:
    errors: list[str] = []
    cfg = parse_policy(Section(data, "policy", errors))
    return cfg, errors


def _budget(labelled: int = 10_000, need: int = 100, busy: str | None = None) -> RetrainBudget:
    return RetrainBudget(labelled_since=lambda since: labelled, min_labelled_rows=need, busy_job=busy)


def test_defaults_when_no_rules_configured() -> None:
    cfg, errors = _parse({})
    assert errors == []
    assert cfg.default_rules and cfg.rules == DEFAULT_RULES
    assert {r.name: r.action for r in cfg.rules} == {
        "online_mmd_alarm": "alert", "mmd_p_value": "alert", "accuracy_drop": "retrain", "estimated_accuracy_drop": "retrain",
    }


def test_every_bad_rule_key_is_named() -> None:
    _, errors = _parse({"rules": [
        {"name": "a", "signal": "nope", "threshold": 1},
        {"name": "b", "signal": "mmd2", "threshold": 1, "drop_from_reference": 0.1},
        {"name": "c", "signal": "mmd2", "drop_from_reference": 0.1},
        {"name": "a", "signal": "mmd2", "threshold": 1, "action": "page", "typo": 1},
    ]})
    text = "\n".join(errors)
    assert "policy.rules[0].signal: rule 'a': unknown signal 'nope'; allowed: activation_max_abs_shift" in text
    assert "policy.rules[1].threshold: rule 'b': set exactly one of threshold or drop_from_reference" in text
    assert "policy.rules[2].drop_from_reference: rule 'c': only for accuracy" in text
    assert "policy.rules[3].action: must be one of 'alert', 'retrain'" in text
    assert "policy.rules[3].typo: unknown key" in text
    assert "duplicate rule name 'a'" in text


def test_config_error_through_whole_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"policy.rules\[0\].signal"):
        parse_config({"logs": {"inference": "x"}, "policy": {"rules": [{"name": "r", "signal": "bad", "threshold": 1}]}},
                     source="t.yaml", base=tmp_path)


def test_fires_after_consecutive_and_clears_after_as_many_inside() -> None:
    rule = Rule("p", "mmd_p_value", "below", threshold=0.01, consecutive=2, action="alert")
    pol = Policy(PolicyConfig(rules=(rule,)))
    seen = []
    for i, p in enumerate([0.001, 0.5, 0.001, 0.001, 0.5, 0.001, 0.5, 0.5]):
        seen.append([d.outcome for d in pol.evaluate(make_window(index=i, mmd_p_value=p), reference_accuracy=None, now=NOW, budget=_budget())])
    assert seen == [[], [], [], ["alert"], [], [], [], ["cleared"]]
    assert pol.breaches["p"] == 4


def test_unmeasured_value_neither_breaches_nor_clears() -> None:
    rule = Rule("p", "mmd_p_value", "below", threshold=0.01, action="alert")
    pol = Policy(PolicyConfig(rules=(rule,)))
    pol.evaluate(make_window(mmd_p_value=0.001), reference_accuracy=None, now=NOW, budget=_budget())
    assert pol.alarms() == {"p": True}
    assert pol.evaluate(make_window(mmd_p_value=None), reference_accuracy=None, now=NOW, budget=_budget()) == []
    assert pol.alarms() == {"p": True}


def test_drop_from_reference_needs_min_labels_and_reference() -> None:
    rule = Rule("acc", "accuracy", "below", drop_from_reference=0.05, min_rows=200, action="retrain")
    pol = Policy(PolicyConfig(rules=(rule,)))
    # too few labels, then no reference: nothing
    assert pol.evaluate(make_window(accuracy=0.5, labels=100), reference_accuracy=0.9, now=NOW, budget=_budget()) == []
    assert pol.evaluate(make_window(accuracy=0.5, labels=300), reference_accuracy=None, now=NOW, budget=_budget()) == []
    # 0.86 is inside 0.9 - 0.05
    assert pol.evaluate(make_window(accuracy=0.86, labels=300), reference_accuracy=0.9, now=NOW, budget=_budget()) == []
    [d] = pol.evaluate(make_window(accuracy=0.8, labels=300), reference_accuracy=0.9, now=NOW, budget=_budget())
    assert d.outcome == "retrain" and d.threshold == pytest.approx(0.85)
    assert d.message("job-1") == (
        "rule acc: accuracy=0.8 below threshold 0.85 for model_version v1: retrain queued as job job-1"
    )


def test_deferral_until_labels_then_retrain_then_cooldown() -> None:
    rule = Rule("acc", "accuracy", "below", threshold=0.85, action="retrain")
    pol = Policy(PolicyConfig(cooldown_seconds=600, rules=(rule,)))
    labelled = {"n": 10}
    since_seen = []

    def count(since: float | None) -> int:
        since_seen.append(since)
        return labelled["n"]

    budget = RetrainBudget(count, 100)
    [d] = pol.evaluate(make_window(accuracy=0.5, labels=50), reference_accuracy=None, now=NOW, budget=budget)
    assert d.outcome == "deferred"
    assert "deferred until 100 labelled rows (have 10)" in d.message()
    assert pol.retry_pending(now=NOW + 1, budget=budget) is None  # unchanged: no new line
    assert pol.deferred_total == 1
    labelled["n"] = 150
    d2 = pol.retry_pending(now=NOW + 2, budget=budget)
    assert d2 is not None and d2.outcome == "retrain"
    pol.note_retrain(NOW + 2)
    assert since_seen[-1] is None
    # a second breach within the cooldown is held back, and retried once it has passed
    pol2_window = make_window(accuracy=0.5, labels=50, model_version="v2")
    [d3] = pol.evaluate(pol2_window, reference_accuracy=None, now=NOW + 10, budget=budget)
    assert d3.outcome == "cooldown" and "in cooldown until" in d3.message()
    d4 = pol.retry_pending(now=NOW + 700, budget=budget)
    assert d4 is not None and d4.outcome == "retrain"
    assert since_seen[-1] == NOW + 2


def test_busy_retrain_is_not_queued_twice() -> None:
    rule = Rule("acc", "accuracy", "below", threshold=0.85, action="retrain")
    pol = Policy(PolicyConfig(rules=(rule,)))
    [d] = pol.evaluate(make_window(accuracy=0.5, labels=50), reference_accuracy=None, now=NOW, budget=_budget(busy="j1"))
    assert d.outcome == "busy" and "already queued as job j1" in d.message()


def test_state_round_trip_and_version_check() -> None:
    rule = Rule("acc", "accuracy", "below", threshold=0.85, consecutive=2, action="retrain")
    pol = Policy(PolicyConfig(rules=(rule,)))
    pol.evaluate(make_window(accuracy=0.5, labels=50), reference_accuracy=None, now=NOW, budget=_budget(labelled=0))
    pol.evaluate(make_window(accuracy=0.5, labels=50), reference_accuracy=None, now=NOW, budget=_budget(labelled=0))
    state = pol.state_dict()
    again = Policy(PolicyConfig(rules=(rule,)))
    again.load_state_dict(state)
    assert again.state_dict() == state
    assert again.alarms() == {"acc": True} and again.pending is not None
    with pytest.raises(StateError, match="newer than this driftd"):
        again.load_state_dict({**state, "version": 99})


def test_a_window_handed_over_twice_moves_a_streak_once() -> None:
    """After a crash the engine hands committed windows over again; each counts once."""
    policy = Policy(PolicyConfig(rules=(Rule("shift", "activation_max_abs_shift", "above", threshold=1.0,
                                             consecutive=2, action="alert"),)))
    w = make_window(max_abs_shift=5.0, index=3)
    budget = RetrainBudget(lambda since: 0, 0, None)
    assert policy.is_new(w)
    assert policy.evaluate(w, reference_accuracy=None, now=0.0, budget=budget) == []
    assert not policy.is_new(w)  # the daemon skips it when the engine hands it over again
    restored = Policy(policy.config)
    restored.load_state_dict(policy.state_dict())
    assert not restored.is_new(w)
    fired = restored.evaluate(make_window(max_abs_shift=5.0, index=4), reference_accuracy=None, now=2.0, budget=budget)
    assert [d.outcome for d in fired] == ["alert"]
