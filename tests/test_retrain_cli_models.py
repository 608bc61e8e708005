"""`driftd models` through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import yaml

from monitor.cli import main


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "start.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), path)
    return path


def test_import_list_promote_rollback(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "driftd.yaml"
    config.write_text(yaml.safe_dump({"logs": {"inference": "logs"}, "retrain": {"registry_dir": "reg"}}))
    args = ["--arch", "test_resnet", "--num-classes", "3", "--checkpoint", str(checkpoint), "--input-size", "32"]
    assert main(["models", "import", "--config", str(config), *args, "--class-names", "a,b,c"]) == 0
    assert main(["models", "import", "--registry", str(tmp_path / "reg"), *args]) == 0
    assert "imported" in capsys.readouterr().out
    assert main(["models", "list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "* v2" in out and "  v1" in out
    assert main(["models", "rollback", "--config", str(config)]) == 0
    assert "CURRENT is now v1" in capsys.readouterr().out
    assert (tmp_path / "reg" / "CURRENT").read_text().strip() == "v1"
    assert main(["models", "promote", "v2", "--config", str(config)]) == 0
    assert main(["models", "show", "v1", "--config", str(config)]) == 0
    assert '"class_names": [\n    "a",' in capsys.readouterr().out


def test_errors_are_one_line_with_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["models", "show", "v9", "--registry", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["models", "list"]) == 2
    assert "pass --registry DIR or --config FILE" in capsys.readouterr().err
    assert main(["models", "import", "--registry", str(tmp_path), "--arch", "test_resnet", "--num-classes", "3",
                 "--checkpoint", str(tmp_path / "missing.pth")]) == 1
    assert "checkpoint file not found" in capsys.readouterr().err


def test_help_shows_an_example(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "--help"])
    assert exit_info.value.code == 0
    assert "driftd models import --config driftd.yaml --arch" in capsys.readouterr().out
