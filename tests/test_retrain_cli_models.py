"""`driftd models` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

from monitor.cli import main
from retrain.registry import Registry

SERVED = {"input_size": [3, 64, 64], "crop_pct": 1.0, "interpolation": "bilinear",
          "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "start.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), path)
    return path


def _import(registry: Path, checkpoint: Path, *extra: str) -> int:
    return main(["models", "import", "--registry", str(registry), "--arch", "test_resnet", "--num-classes", "3",
                 "--checkpoint", str(checkpoint), *extra])


def test_import_list_promote_rollback(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "driftd.yaml"
    config.write_text(yaml.safe_dump({"logs": {"inference": "logs"}, "retrain": {"registry_dir": "reg"}}))
    args = ["--arch", "test_resnet", "--num-classes", "3", "--checkpoint", str(checkpoint), "--timm-defaults",
            "--input-size", "32"]
    assert main(["models", "import", "--config", str(config), *args, "--class-names", "a,b,c"]) == 0
    assert main(["models", "import", "--registry", str(tmp_path / "reg"), *args]) == 0
    out = capsys.readouterr().out
    assert "imported" in out
    assert ("preprocessing recorded (from timm's default for test_resnet with --input-size): input_size 3x32x32, "
            "interpolation bilinear, crop_pct 0.95") in out
    assert main(["models", "list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "* v2" in out and "  v1" in out
    assert main(["models", "rollback", "--config", str(config)]) == 0
    assert "CURRENT is now v1" in capsys.readouterr().out
    assert (tmp_path / "reg" / "CURRENT").read_text().strip() == "v1"
    assert main(["models", "promote", "v2", "--config", str(config)]) == 0
    assert main(["models", "show", "v1", "--config", str(config)]) == 0
    assert '"class_names": [\n    "a",' in capsys.readouterr().out


def test_import_refuses_to_guess_the_preprocessing(tmp_path: Path, checkpoint: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    assert _import(tmp_path / "reg", checkpoint, "--input-size", "64") == 2
    err = capsys.readouterr().err
    assert "the checkpoint records no preprocessing" in err and "driftd will not guess" in err
    assert "--data-config FILE" in err and "--interpolation, --crop-pct, --mean, --std" in err
    assert "--timm-defaults" in err and "crop_pct 0.95" in err  # what the guess would have been
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "reg").exists()  # nothing was written


def test_import_records_the_served_preprocessing_from_a_file(tmp_path: Path, checkpoint: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    served = tmp_path / "served.json"
    served.write_text(json.dumps(SERVED))
    assert _import(tmp_path / "reg", checkpoint, "--data-config", str(served)) == 0
    out = capsys.readouterr().out
    assert (f"preprocessing recorded (from --data-config {served}): input_size 3x64x64, interpolation bilinear, "
            "crop_pct 1 (crop_mode center), mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]") in out
    meta = Registry(tmp_path / "reg").current().meta
    assert meta.data_config == {**SERVED, "crop_mode": "center"}
    assert meta.data_config_source == f"--data-config {served}"
    # a flag overrides one field of the file
    assert _import(tmp_path / "reg", checkpoint, "--data-config", str(served), "--input-size", "96") == 0
    meta = Registry(tmp_path / "reg").current().meta
    assert meta.data_config["input_size"] == [3, 96, 96] and meta.data_config["crop_pct"] == 1.0
    assert meta.data_config_source == f"--data-config {served} with --input-size"


def test_import_from_flags_alone(tmp_path: Path, checkpoint: Path) -> None:
    assert _import(tmp_path / "reg", checkpoint, "--input-size", "64", "--crop-pct", "1.0", "--interpolation",
                   "bilinear", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225") == 0
    meta = Registry(tmp_path / "reg").current().meta
    assert meta.data_config == {**SERVED, "crop_mode": "center"} and meta.data_config_source == "flags"


def test_import_takes_the_pretrained_cfg_timm_saved(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = timm.create_model("test_resnet", num_classes=3)
    export = tmp_path / "exported"
    timm.models.save_for_hf(model, str(export), safe_serialization=True,
                            data_config={"input_size": (3, 48, 48), "crop_pct": 1.0, "interpolation": "bicubic"})
    assert _import(tmp_path / "reg", export) == 0
    assert f"(from checkpoint: {export / 'config.json'} (pretrained_cfg))" in capsys.readouterr().out
    meta = Registry(tmp_path / "reg").current().meta
    assert (meta.data_config["input_size"], meta.data_config["crop_pct"], meta.data_config["interpolation"]) == (
        [3, 48, 48], 1.0, "bicubic")
    # the config.json describes another architecture: refused, naming both
    assert main(["models", "import", "--registry", str(tmp_path / "reg"), "--arch", "resnet18", "--num-classes", "3",
                 "--checkpoint", str(export)]) == 2
    assert "describes architecture 'test_resnet', but --arch is 'resnet18'" in capsys.readouterr().err


def test_import_takes_a_pretrained_cfg_entry_of_a_checkpoint(tmp_path: Path) -> None:
    wrapped = tmp_path / "train-output.pth"
    torch.save({"state_dict": timm.create_model("test_resnet", num_classes=3).state_dict(), "epoch": 7,
                "pretrained_cfg": {**SERVED, "num_classes": 3, "url": ""}}, wrapped)
    assert _import(tmp_path / "reg", wrapped) == 0
    meta = Registry(tmp_path / "reg").current().meta
    assert meta.data_config == {**SERVED, "crop_mode": "center"}
    assert meta.data_config_source == f"checkpoint: {wrapped} (its pretrained_cfg entry)"


@pytest.mark.parametrize("doc, message", [
    ({**SERVED, "crop_pct": 1.5}, "crop_pct: must be a number in (0, 1]"),
    ({**SERVED, "interpolation": "cubic"}, "interpolation: must be one of bilinear"),
    ({k: v for k, v in SERVED.items() if k != "std"}, "missing std"),
    ({**SERVED, "mean": [0.5, 0.5]}, "mean: 2 values for 3 input channels"),
], ids=["crop", "interpolation", "missing", "channels"])
def test_a_bad_data_config_file_names_the_key(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture,
                                              doc: dict, message: str) -> None:
    served = tmp_path / "served.json"
    served.write_text(json.dumps(doc))
    assert _import(tmp_path / "reg", checkpoint, "--data-config", str(served)) == 2
    err = capsys.readouterr().err
    assert f"--data-config {served}: invalid data config" in err and message in err


def test_errors_are_one_line_with_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["models", "show", "v9", "--registry", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert main(["models", "list"]) == 2
    assert "pass --registry DIR or --config FILE" in capsys.readouterr().err
    assert main(["models", "import", "--registry", str(tmp_path), "--arch", "test_resnet", "--num-classes", "3",
                 "--checkpoint", str(tmp_path / "missing.pth")]) == 1
    assert "checkpoint file not found" in capsys.readouterr().err


def test_read_only_commands_create_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "driftd.yaml"
    config.write_text(yaml.safe_dump({"logs": {"inference": "logs"}, "retrain": {"registry_dir": "reg"}}))
    assert main(["models", "list", "--config", str(config)]) == 0
    assert "no versions yet" in capsys.readouterr().out
    assert main(["models", "show", "v1", "--config", str(config)]) == 1
    assert main(["models", "promote", "v1", "--config", str(config)]) == 1
    assert main(["models", "rollback", "--config", str(config)]) == 1
    assert main(["config", "validate", "--config", str(config), "--skip-paths"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["driftd.yaml"]


def test_help_shows_an_example(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "--help"])
    assert exit_info.value.code == 0
    assert "driftd models import --config driftd.yaml --arch" in capsys.readouterr().out
