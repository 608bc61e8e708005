"""Trigger policy: parsing, floors, hysteresis, label time, margins, one retrain at a time, persisted state."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.config import parse_config
from monitor.configutil import Section
from monitor.errors import ConfigError, StateError
from monitor.policy.config import PolicyConfig, parse_policy
from monitor.policy.decisions import ReferenceFacts, RetrainPreconditions
from monitor.policy.policy import Policy
from monitor.policy.rules import DEFAULT_RULES, Rule
from daemon_helpers import make_evaluation, make_window

NOW = 1_800_000_000.0
REF = ReferenceFacts(0.9)  # exact: no margin


def _parse(data: dict) -> tuple[PolicyConfig, list[str]]:
    errors: list[str] = []
    cfg = parse_policy(Section(data, "policy", errors))
    return cfg, errors


def _pre(labelled: int = 10_000, need: int = 100, busy: str | None = None, served=lambda v: True) -> RetrainPreconditions:
    return RetrainPreconditions(labelled=lambda after, since, version: labelled, min_labelled_rows=need,
                                active_job_id=busy, served=served)


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
        {"name": "e", "signal": "mmd2", "threshold": 1, "confidence": 0.9},
    ]})
    text = "\n".join(errors)
    assert "policy.rules[0].signal: rule 'a': unknown signal 'nope'; allowed: activation_max_abs_shift" in text
    assert "policy.rules[1].threshold: rule 'b': set exactly one of threshold or drop_from_reference" in text
    assert "policy.rules[2].drop_from_reference: rule 'c': only for accuracy" in text
    assert "policy.rules[3].action: must be one of 'alert', 'retrain'" in text
    assert "policy.rules[3].typo: unknown key" in text
    assert "duplicate rule name 'a'" in text
    assert "policy.rules[4].confidence: rule 'e': only for drop_from_reference rules" in text


def test_config_error_through_whole_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"policy.rules\[0\].signal"):
        parse_config({"logs": {"inference": "x"}, "policy": {"rules": [{"name": "r", "signal": "bad", "threshold": 1}]}},
                     source="t.yaml", base=tmp_path)


def test_a_rule_below_its_signals_floor_is_refused_with_both_numbers(tmp_path: Path) -> None:
    rules = [{"name": "p", "signal": "mmd_p_value", "op": "below", "threshold": 0.01},
             {"name": "share", "signal": "activation_share_significant", "threshold": 1.0}]
    with pytest.raises(ConfigError) as err:
        parse_config({"logs": {"inference": "x"}, "signals": {"mmd": {"permutations": 50}},
                      "policy": {"rules": rules}}, source="t.yaml", base=tmp_path)
    text = str(err.value)
    assert ("policy.rules[0].threshold: rule 'p': threshold 0.01 can never be crossed: the smallest p-value "
            "50 permutations can give is 1/(1+50) = 0.01961; raise signals.mmd.permutations above 99") in text
    assert "policy.rules[1].threshold: rule 'share': threshold 1 can never be crossed" in text
    # 200 permutations make 0.01 reachable
    parse_config({"logs": {"inference": "x"}, "signals": {"mmd": {"permutations": 200}},
                  "policy": {"rules": rules[:1]}}, source="t.yaml", base=tmp_path)


def test_fires_after_consecutive_and_clears_after_as_many_inside() -> None:
    rule = Rule("p", "mmd_p_value", "below", threshold=0.01, consecutive=2, action="alert")
    pol = Policy(PolicyConfig(rules=(rule,)))
    seen = []
    for i, p in enumerate([0.001, 0.5, 0.001, 0.001, 0.5, 0.001, 0.5, 0.5]):
        seen.append([d.outcome for d in pol.evaluate(make_window(index=i, mmd_p_value=p))])
    assert seen == [[], [], [], ["alert"], [], [], [], ["cleared"]]
    assert pol.breaches["p"] == 4


def test_unmeasured_value_neither_breaches_nor_clears() -> None:
    rule = Rule("p", "mmd_p_value", "below", threshold=0.01, action="alert")
    pol = Policy(PolicyConfig(rules=(rule,)))
    pol.evaluate(make_window(mmd_p_value=0.001))
    assert pol.alarms() == {"p": True}
    assert pol.evaluate(make_window(mmd_p_value=None)) == []
    assert pol.alarms() == {"p": True}


def test_accuracy_rules_judge_label_evaluations_not_windows() -> None:
    rule = Rule("acc", "accuracy", "below", drop_from_reference=0.05, min_rows=200, action="retrain")
    pol = Policy(PolicyConfig(rules=(rule,)))
    # a feature window carries an accuracy snapshot, but label time is what the rule judges
    assert pol.evaluate(make_window(accuracy=0.5, labels=300), reference=REF) == []
    # too few labels, then no reference: nothing
    assert pol.evaluate_labels(make_evaluation(accuracy=0.5, labels=100), reference=REF) == []
    assert pol.evaluate_labels(make_evaluation(accuracy=0.5, labels=300), reference=None) == []
    # 0.86 is inside 0.9 - 0.05
    assert pol.evaluate_labels(make_evaluation(accuracy=0.86, labels=300), reference=REF) == []
    [d] = pol.evaluate_labels(make_evaluation(accuracy=0.8, labels=300), reference=REF)
    assert d.outcome == "ask" and d.threshold == pytest.approx(0.85)
    decisions, plan = pol.resolve(now=NOW, pre=_pre())
    assert plan is not None and plan.rules == ("acc",) and plan.model_version == "v1"
    assert decisions[0].message("job-1") == (
        "rule acc: accuracy=0.8 below threshold 0.85 for model_version v1: retrain queued as job job-1"
    )


def test_a_clean_window_against_a_300_row_reference_does_not_breach() -> None:
    """Issue figures: a 300-row reference said 0.797 where clean production ran at 0.764; a clean
    window of 1000 labels at 0.745 breached the point threshold 0.747. Both are samples."""
    rule = DEFAULT_RULES[2]
    assert rule.name == "accuracy_drop" and rule.confidence == 0.95
    pol = Policy(PolicyConfig(rules=(rule,)))
    small_reference = ReferenceFacts(0.797, labelled_rows=300)
    for i in range(4):
        assert pol.evaluate_labels(make_evaluation(index=i, accuracy=0.745, labels=1000), reference=small_reference) == []
    # a real drop is still caught through the same margin
    fired = [pol.evaluate_labels(make_evaluation(index=4 + i, accuracy=0.62, labels=1000), reference=small_reference)
             for i in range(2)]
    assert [d.outcome for ds in fired for d in ds] == ["ask"]
    assert fired[1][0].threshold < 0.747  # the margin widened the threshold below the point value


def test_two_rules_breaching_together_make_one_job_listing_both() -> None:
    rules = (Rule("acc", "accuracy", "below", threshold=0.85, action="retrain"),
             Rule("est", "estimated_accuracy", "below", threshold=0.85, action="retrain"))
    pol = Policy(PolicyConfig(cooldown_seconds=3600, rules=rules))
    pol.evaluate(make_window(index=0, estimated_accuracy=0.5))
    pol.evaluate_labels(make_evaluation(index=0, accuracy=0.5))
    decisions, plan = pol.resolve(now=NOW, pre=_pre())
    assert plan is not None and set(plan.rules) == {"acc", "est"}
    assert sorted(d.outcome for d in decisions) == ["joined", "retrain"]
    assert "rule acc:" in plan.reason() and "rule est:" in plan.reason()
    pol.note_retrain("v1", now=NOW, join_seq=10, job_id="j1")
    # nothing else is queued: the plan took both asks
    assert pol.resolve(now=NOW + 1, pre=_pre(busy="j1")) == ([], None)


def test_deferral_until_labels_then_retrain_then_cooldown_per_version() -> None:
    rule = Rule("acc", "accuracy", "below", threshold=0.85, action="retrain")
    pol = Policy(PolicyConfig(cooldown_seconds=600, rules=(rule,)))
    labelled = {"n": 10}
    asked = []

    def count(after: int, since: float | None, version: str | None) -> int:
        asked.append(after)
        return labelled["n"]

    pre = RetrainPreconditions(count, 100, join_seq=42)
    pol.evaluate_labels(make_evaluation(accuracy=0.5, labels=50))
    [d], plan = pol.resolve(now=NOW, pre=pre)
    assert plan is None and d.outcome == "deferred"
    assert "deferred until 100 labelled rows joined since the last retrain (have 10)" in d.message()
    assert pol.resolve(now=NOW + 1, pre=pre) == ([], None)  # unchanged: no new line
    assert pol.deferred_total == 1
    labelled["n"] = 150
    [d2], plan = pol.resolve(now=NOW + 2, pre=pre)
    assert d2.outcome == "retrain" and plan is not None
    pol.note_retrain("v1", now=NOW + 2, join_seq=42, job_id="j1")
    assert asked[-1] == 0
    # a second breach of v1 within its cooldown is held back (joined to j1), and retried once it has passed
    pol.evaluate_labels(make_evaluation(index=1, accuracy=0.9))
    pol.evaluate_labels(make_evaluation(index=2, accuracy=0.5))
    [d3], plan = pol.resolve(now=NOW + 10, pre=pre)
    assert plan is None and d3.outcome == "cooldown" and "joined retrain job j1; model_version v1 in cooldown until" in d3.message()
    # ... but the cooldown is v1's: v2 retrains at once
    pol.evaluate_labels(make_evaluation("v2", accuracy=0.5))
    decisions, plan = pol.resolve(now=NOW + 11, pre=pre)
    assert plan is not None and plan.model_version == "v2"
    pol.note_retrain("v2", now=NOW + 11, join_seq=50, job_id="j2")
    [d4], plan = pol.resolve(now=NOW + 700, pre=pre)
    assert d4.outcome == "retrain" and plan is not None and plan.model_version == "v1"
    assert asked[-1] == 42  # labelled rows counted from v1's last retrain


def test_an_ask_while_a_job_runs_is_joined_to_it() -> None:
    rule = Rule("acc", "accuracy", "below", threshold=0.85, action="retrain")
    pol = Policy(PolicyConfig(rules=(rule,)))
    pol.evaluate_labels(make_evaluation(accuracy=0.5, labels=50))
    [d], plan = pol.resolve(now=NOW, pre=_pre(busy="j1"))
    assert plan is None and d.outcome == "joined" and "joined retrain job j1" in d.message()
    assert pol.pending()[0]["joined_job"] == "j1"


def test_a_label_free_ask_waits_for_labels_after_the_onset() -> None:
    rule = Rule("est", "estimated_accuracy", "below", threshold=0.85, consecutive=2, action="retrain")
    pol = Policy(PolicyConfig(rules=(rule,)))
    onset = 1_700_000_000.0 + 60 * 3
    for i in range(3, 5):
        pol.evaluate(make_window(index=i, estimated_accuracy=0.5))
    since_asked = []

    def count(after: int, since: float | None, version: str | None) -> int:
        since_asked.append((since, version))
        return 30

    [d], plan = pol.resolve(now=NOW, pre=RetrainPreconditions(count, 200))
    assert plan is None and d.outcome == "deferred" and d.onset == onset
    assert "until 200 labelled rows predicted after the onset at" in d.detail
    assert since_asked[-1] == (onset, "v1")
    [d], plan = pol.resolve(now=NOW, pre=RetrainPreconditions(lambda a, s, v: 250, 200))
    assert plan is not None and plan.onset == onset and plan.label_free


def test_retiring_a_version_clears_its_alarms_and_ask() -> None:
    rules = (Rule("shift", "activation_max_abs_shift", "above", threshold=1.0, action="alert"),
             Rule("acc", "accuracy", "below", threshold=0.85, action="retrain"))
    pol = Policy(PolicyConfig(rules=rules))
    pol.evaluate(make_window("v1", max_abs_shift=5.0))
    pol.evaluate_labels(make_evaluation("v1", accuracy=0.5))
    pol.evaluate(make_window("v2", max_abs_shift=0.1))
    assert pol.alarm_states(["v1", "v2"]) == {("shift", "v1"): True, ("acc", "v1"): True,
                                              ("shift", "v2"): False, ("acc", "v2"): False}
    assert pol.retire("v1") == ["acc", "shift"]
    assert pol.active() == [] and pol.pending() == [] and pol.versions() == {"v2"}
    # an ask of a version retired before it resolved is dropped
    pol.evaluate_labels(make_evaluation("v2", accuracy=0.5))
    [d], plan = pol.resolve(now=NOW, pre=_pre(served=lambda v: v != "v2"))
    assert plan is None and d.outcome == "dropped" and "no longer served" in d.message()


def test_state_round_trip_and_version_check() -> None:
    rule = Rule("acc", "accuracy", "below", threshold=0.85, consecutive=2, action="retrain")
    pol = Policy(PolicyConfig(rules=(rule,)))
    pol.evaluate_labels(make_evaluation(index=0, accuracy=0.5, labels=50))
    pol.evaluate_labels(make_evaluation(index=1, accuracy=0.5, labels=50))
    pol.resolve(now=NOW, pre=_pre(labelled=0))
    pol.note_retrain("v2", now=NOW, join_seq=5, job_id="j0")
    state = pol.state_dict()
    again = Policy(PolicyConfig(rules=(rule,)))
    again.load_state_dict(state)
    assert again.state_dict() == state
    assert again.alarms() == {"acc": True} and again.pending()[0]["outcome"] == "deferred"
    assert not again.is_new_evaluation(make_evaluation(index=1))
    with pytest.raises(StateError, match="newer than this driftd"):
        again.load_state_dict({**state, "version": 99})


def test_a_version_2_state_keeps_its_alarms() -> None:
    rule = Rule("acc", "accuracy", "below", threshold=0.85, action="retrain")
    old = {"version": 2, "evaluated": {"v1": ["r", 3]}, "breaches": {"acc": 2}, "deferred_total": 1,
           "cooldown_until": None, "last_retrain_at": None, "pending": None,
           "rules": [{"rule": "acc", "model_version": "v1", "breach_streak": 2, "ok_streak": 0, "active": True,
                      "value": 0.5, "threshold": 0.85}]}
    pol = Policy(PolicyConfig(rules=(rule,)))
    pol.load_state_dict(old)
    assert pol.alarms() == {"acc": True} and pol.breaches == {"acc": 2} and pol.pending() == []


def test_a_window_handed_over_twice_moves_a_streak_once() -> None:
    """After a crash the engine hands committed windows over again; each counts once."""
    policy = Policy(PolicyConfig(rules=(Rule("shift", "activation_max_abs_shift", "above", threshold=1.0,
                                             consecutive=2, action="alert"),)))
    w = make_window(max_abs_shift=5.0, index=3)
    assert policy.is_new(w)
    assert policy.evaluate(w) == []
    assert not policy.is_new(w)  # the daemon skips it when the engine hands it over again
    restored = Policy(policy.config)
    restored.load_state_dict(policy.state_dict())
    assert not restored.is_new(w)
    fired = restored.evaluate(make_window(max_abs_shift=5.0, index=4))
    assert [d.outcome for d in fired] == ["alert"]


def test_the_estimates_interval_widens_the_margin_of_a_credible_drop() -> None:
    import dataclasses

    rule = Rule("est", "estimated_accuracy", "below", drop_from_reference=0.05, action="alert", confidence=0.95)
    pol = Policy(PolicyConfig(rules=(rule,)))
    base = make_window(estimated_accuracy=0.82)
    narrow = dataclasses.replace(base, estimate=dataclasses.replace(base.estimate, lower=0.81, upper=0.83))
    wide = dataclasses.replace(base, estimate=dataclasses.replace(base.estimate, lower=0.70, upper=0.94, interval=0.9))
    # 0.82 < 0.9 - 0.05: a breach when the estimate is sharp, not when its interval spans the threshold
    assert [d.outcome for d in pol.evaluate(narrow, reference=REF)] == ["alert"]
    pol = Policy(PolicyConfig(rules=(rule,)))
    assert pol.evaluate(wide, reference=REF) == []
    assert pol.active() == [] and pol.thresholds({"v1": REF}, ["v1"])[("est", "v1")] < 0.82
