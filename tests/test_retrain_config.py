"""The `retrain` config section: defaults, relative paths, key-named errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.config import parse_config
from monitor.errors import ConfigError


def _parse(retrain: dict, base: Path = Path("/srv/driftd")):
    return parse_config({"logs": {"inference": "logs"}, "retrain": retrain}, source="driftd.yaml", base=base).retrain


def test_defaults_and_relative_paths() -> None:
    cfg = _parse({"registry_dir": "reg", "input_root": "inputs", "replay_logs": "replay"})
    assert cfg.registry_dir == Path("/srv/driftd/reg")
    assert cfg.input_root == Path("/srv/driftd/inputs")
    assert cfg.replay_logs == "/srv/driftd/replay"
    assert (cfg.mode, cfg.strategy, cfg.min_labelled_rows, cfg.max_rows) == ("auto", "auto", 200, 5000)
    assert cfg.gate.min_gain == 0.02 and cfg.gate.max_forgetting == 0.01 and cfg.gate.gate_fraction == 0.25
    assert cfg.hyper.replay_fraction == 0.5 and cfg.hyper.layer_decay is None
    assert _parse({"hyper": {"max_finetune_steps": 200}}).hyper.max_finetune_steps == 200
    with pytest.raises(ConfigError, match="retrain.hyper.max_finetune_steps: must be >= 1, got 0"):
        _parse({"hyper": {"max_finetune_steps": 0}})
    assert cfg.launcher == "local" and cfg.nproc_per_node == 1


def test_kubernetes_section_is_typed() -> None:
    cfg = _parse(
        {
            "launcher": "kubernetes",
            "kubernetes": {
                "image": "registry.local/driftd:1",
                "cpu": 8,
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "node_selector": {"gpu": "h100"},
            },
        }
    )
    assert cfg.kubernetes.cpu == "8"
    assert cfg.kubernetes.tolerations[0].key == "nvidia.com/gpu"
    assert cfg.kubernetes.node_selector == (("gpu", "h100"),)


def test_every_bad_key_is_named_in_one_error() -> None:
    with pytest.raises(ConfigError) as err:
        _parse(
            {
                "mode": "pixels",
                "hyper": {"lr_head": 0, "schedul": "cosine"},
                "launcher": "kubernetes",
                "kubernetes": {"memory": "lots", "tolerations": [{"operator": "Equal"}]},
            }
        )
    text = str(err.value)
    for key in (
        "retrain.mode:",
        "retrain.hyper.lr_head:",
        "retrain.hyper.schedul: unknown key",
        "retrain.kubernetes.memory:",
        "retrain.kubernetes.tolerations[0].key:",
        "retrain.kubernetes.image: required",
    ):
        assert key in text


def test_group_pattern_must_be_a_regex_with_a_capture_group() -> None:
    assert _parse({}).group_pattern is None
    assert _parse({"group_pattern": r"^products/([^/]+)/"}).group_pattern == r"^products/([^/]+)/"
    with pytest.raises(ConfigError, match=r"retrain.group_pattern: '\^products/\[\^/\]\+/' has no capture group"):
        _parse({"group_pattern": r"^products/[^/]+/"})
    with pytest.raises(ConfigError, match=r"retrain.group_pattern: '\(unclosed' is not a regular expression"):
        _parse({"group_pattern": "(unclosed"})


def test_a_yaml_file_reads_exponent_floats_as_numbers(tmp_path: Path) -> None:
    """YAML 1.1 (PyYAML's default) reads 1e-4 as a string: `lr_backbone: 1e-4` was a config error."""
    from monitor.config import load_config

    path = tmp_path / "driftd.yaml"
    path.write_text("logs: {inference: logs}\nretrain:\n  hyper:\n    lr_backbone: 1e-4\n    l2sp_weight: 1.5e-2\n"
                    "    epochs_head: 10\n  gate: {max_forgetting: 2E-2}\n")
    retrain = load_config(path).retrain
    assert (retrain.hyper.lr_backbone, retrain.hyper.l2sp_weight, retrain.gate.max_forgetting) == (1e-4, 0.015, 0.02)
    assert retrain.hyper.epochs_head == 10 and isinstance(retrain.hyper.epochs_head, int)
    path.write_text('logs: {inference: logs}\nretrain:\n  hyper:\n    lr_backbone: "1e-4"\n')  # quoted: a string
    with pytest.raises(ConfigError, match="retrain.hyper.lr_backbone: expected a number, got '1e-4'"):
        load_config(path)
