"""`driftd models`: list, inspect, promote, roll back and import versions in the model registry.

Only `import` loads torch; the other actions read JSON files and create nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

from monitor.cli.common import UsageError, add_config_argument
from monitor.config import load_config
from monitor.errors import ConfigError, DriftdError
from retrain.dataconfig import CROP_MODES, INTERPOLATIONS  # plain data: no torch

EXAMPLES = """examples:
  driftd models list --config driftd.yaml
  driftd models show v3 --registry /var/lib/driftd/registry
  driftd models promote v3 --config driftd.yaml
  driftd models rollback --config driftd.yaml
  driftd models import --config driftd.yaml --arch resnet50 --num-classes 10 \\
      --checkpoint resnet50.pth --class-names cat,dog,... --data-config served.json
"""

IMPORT_EPILOG = """The preprocessing the model is served with (timm's data config) is recorded with it, and
retraining and the gate use exactly it. It comes from, in this order: --data-config FILE; the
checkpoint's own pretrained_cfg (a config.json beside the weights, as timm's save_for_hf writes,
or a pretrained_cfg entry in the checkpoint); --timm-defaults (timm's default for --arch).
The flags --input-size, --crop-pct, --interpolation, --mean, --std and --crop-mode override
single fields, or give all of them. Without any of these the import stops and says what to pass.

examples:
  driftd models import --config driftd.yaml --arch resnet50 --num-classes 10 --checkpoint resnet50.pth \\
      --data-config served.json          # {"input_size": [3, 224, 224], "crop_pct": 1.0, ...}
  driftd models import --config driftd.yaml --arch resnet50 --num-classes 10 --checkpoint exported-dir/
  driftd models import --config driftd.yaml --arch resnet50 --num-classes 10 --checkpoint resnet50.pth \\
      --input-size 224 --crop-pct 1.0 --interpolation bilinear --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
"""

SERVING_HINT = ("inference services using retrain.serving.CurrentModel switch at their next request; "
                "others: restart or reload them (retrain.on_promote can do it)")

log = logging.getLogger("driftd")


def _config(args: argparse.Namespace) -> Any | None:
    return load_config(args.config) if args.config else None


def _registry(args: argparse.Namespace, config: Any | None = None):
    from retrain.registry import Registry

    if args.registry:
        return Registry(Path(args.registry).expanduser().resolve())
    if config is not None:
        return Registry(config.retrain.registry_dir)
    if args.config:
        return Registry(load_config(args.config).retrain.registry_dir)
    raise ConfigError("no registry: pass --registry DIR or --config FILE (retrain.registry_dir)")


def _when(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def list_versions(args: argparse.Namespace) -> int:
    registry = _registry(args)
    current = registry.current()
    versions = registry.list()
    if not versions:
        print(f"{registry.path}: no versions yet; add one with `driftd models import`")
        return 0
    print(f"  {'version':8s} {'created':21s} {'architecture':18s} {'parent':7s} {'strategy':13s} gate")
    for v in versions:
        gate = v.meta.gate
        verdict = ("-" if not gate else
                   f"{'promote' if gate.get('promote') else 'reject'} gain {gate.get('gain', 0):+.3f} "
                   f"forgetting {gate.get('forgetting', 0):.3f}")
        mark = "*" if current is not None and current.version == v.version else " "
        print(f"{mark} {v.version:8s} {_when(v.meta.created_at):21s} {v.meta.architecture:18s} "
              f"{v.meta.parent or '-':7s} {v.meta.strategy or '-':13s} {verdict}")
    return 0


def show(args: argparse.Namespace) -> int:
    mv = _registry(args).get(args.version)
    print(json.dumps({"version": mv.version, "path": str(mv.path), **mv.meta.to_json()}, indent=2, sort_keys=True))
    return 0


def _hand_off(config: Any | None, *, event: str, version: str, previous: str | None, by: str) -> int:
    """Run retrain.on_promote after CURRENT changed; exit 1 when a hook failed (CURRENT stays switched)."""
    if config is None:
        print("note: no --config, so retrain.on_promote did not run")
        return 0
    from retrain.hooks import run_on_promote

    outcomes = run_on_promote(config, event=event, version=version, previous=previous, by=by)
    failed = [o for o in outcomes if not o.ok]
    for o in outcomes:
        print(f"on_promote {o.kind}: {o.outcome} ({o.detail})")
    if failed:
        raise DriftdError(f"CURRENT is {version}, but retrain.on_promote failed ("
                          + "; ".join(f"{o.kind}: {o.detail}" for o in failed)
                          + f"); the serving side may still use {previous or 'the previous model'}. Fix it and run "
                            f"`driftd models promote {version}` again to repeat the hand-off")
    return 0


def promote(args: argparse.Namespace) -> int:
    config = _config(args)
    registry = _registry(args, config)
    before = registry.current()
    mv = registry.promote(args.version)
    previous = None if before is None else before.version
    again = " (it already was)" if previous == mv.version else ""
    print(f"CURRENT is now {mv.version}{again}; {SERVING_HINT}")
    return _hand_off(config, event="promotion", version=mv.version, previous=previous, by="driftd models promote")


def rollback(args: argparse.Namespace) -> int:
    config = _config(args)
    registry = _registry(args, config)
    before = registry.current()
    version = registry.rollback()
    print(f"rolled back: CURRENT is now {version}; {SERVING_HINT}")
    return _hand_off(config, event="rollback", version=version, previous=None if before is None else before.version,
                     by="driftd models rollback")


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated numbers such as 0.485,0.456,0.406, got {text!r}") from None


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.input_size is not None:
        out["input_size"] = args.input_size
    if args.crop_pct is not None:
        out["crop_pct"] = args.crop_pct
    if args.interpolation is not None:
        out["interpolation"] = args.interpolation
    if args.crop_mode is not None:
        out["crop_mode"] = args.crop_mode
    if args.mean is not None:
        out["mean"] = _floats(args.mean, "--mean")
    if args.std is not None:
        out["std"] = _floats(args.std, "--std")
    return out


_FLAG_OF = {"input_size": "--input-size", "crop_pct": "--crop-pct", "interpolation": "--interpolation",
            "mean": "--mean", "std": "--std"}


def choose_data_config(args: argparse.Namespace, checkpoint: Any) -> tuple[dict[str, Any], str]:
    """(data config, where it came from) for an import; refuses to guess (UsageError naming the flags)."""
    from retrain.dataconfig import REQUIRED, describe, parse_data_config, read_data_config_file
    from retrain.model_import import architecture_data_config

    overrides = _flag_overrides(args)
    base: dict[str, Any] | None
    if args.data_config:
        base, source = read_data_config_file(Path(args.data_config)), f"--data-config {args.data_config}"
    elif checkpoint.data_config is not None:
        base, source = checkpoint.data_config, checkpoint.data_config_source
    elif args.timm_defaults:
        base, source = architecture_data_config(args.arch, args.num_classes), f"timm's default for {args.arch}"
    else:
        base, source = None, "flags"
        missing = [k for k in REQUIRED if k not in overrides]
        if missing:
            default = describe(architecture_data_config(args.arch, args.num_classes))
            raise UsageError(
                f"{checkpoint.path}: the checkpoint records no preprocessing (no pretrained_cfg in it, no config.json "
                "beside it) and driftd will not guess: pass --data-config FILE (JSON with input_size, crop_pct, "
                f"interpolation, mean, std, as timm's pretrained_cfg), or the flags {', '.join(_FLAG_OF[k] for k in missing)}"
                f"{' too' if overrides else ''}, or --timm-defaults if the model is served with timm's default for "
                f"{args.arch} ({default})")
    if overrides and base is not None:
        source += " with " + ", ".join(f"{_FLAG_OF.get(k, '--' + k.replace('_', '-'))}" for k in overrides)
    merged = {**(base or {}), **overrides}
    return parse_data_config(merged, source), source


def import_model(args: argparse.Namespace) -> int:
    from retrain.dataconfig import describe
    from retrain.model_import import import_safetensors, import_timm_checkpoint, read_checkpoint

    if args.num_classes < 1:
        raise UsageError(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.data_config and args.timm_defaults:
        raise UsageError("--data-config and --timm-defaults both name the preprocessing: pass one")
    names = tuple(n.strip() for n in args.class_names.split(",")) if args.class_names else ()
    config = _config(args)
    registry = _registry(args, config)
    before = registry.current()
    checkpoint = read_checkpoint(Path(args.checkpoint), args.arch)
    data_config, source = choose_data_config(args, checkpoint)
    importer = import_safetensors if args.exact else import_timm_checkpoint
    version = importer(registry, args.arch, args.num_classes, checkpoint, class_names=names, data_config=data_config,
                       data_config_source=source, promote=not args.no_promote)
    state = "not promoted" if args.no_promote else "promoted to CURRENT"
    print(f"imported {args.checkpoint} as {version} ({args.arch}, {args.num_classes} classes), {state}")
    print(f"preprocessing recorded (from {source}): {describe(data_config)}")
    print("  retraining and the gate use exactly this; if production serves differently, import again with "
          "--data-config")
    if args.no_promote:
        return 0
    return _hand_off(config, event="promotion", version=version, previous=None if before is None else before.version,
                     by="driftd models import")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="list, show, promote, roll back or import model versions",
        description="The model registry: immutable versions, the CURRENT pointer and its history.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=lambda args: parser.error("choose a models command: list, show, promote, rollback, import"))
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", parser_class=type(parser))

    def action(name: str, func, help_text: str, epilog: str = EXAMPLES) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_argument(p)
        p.add_argument("--registry", metavar="DIR", help="registry directory (instead of --config)")
        p.set_defaults(func=func)
        return p

    action("list", list_versions, "list versions (* marks CURRENT)")
    action("show", show, "print one version's meta.json").add_argument("version", help="e.g. v3")
    action("promote", promote, "make VERSION the CURRENT model, then run retrain.on_promote").add_argument(
        "version", help="e.g. v3")
    action("rollback", rollback, "return CURRENT to the previously promoted version, then run retrain.on_promote")
    imp = action("import", import_model, "add a starting model from a local checkpoint (nothing downloads)",
                 IMPORT_EPILOG)
    imp.add_argument("--arch", required=True, help="timm architecture name, e.g. resnet50")
    imp.add_argument("--num-classes", required=True, type=int)
    imp.add_argument("--checkpoint", required=True,
                     help=".pth/.bin (loaded weights-only), .safetensors, or a directory as timm's save_for_hf writes")
    imp.add_argument("--class-names", help="comma-separated, in class-index order")
    pre = imp.add_argument_group("preprocessing (timm's data config; see below)")
    pre.add_argument("--data-config", metavar="FILE",
                     help="JSON with input_size, crop_pct, interpolation, mean, std (timm's keys)")
    pre.add_argument("--timm-defaults", action="store_true",
                     help="use timm's default preprocessing for --arch (only if production serves exactly that)")
    pre.add_argument("--input-size", type=int, metavar="PX", help="square input size in pixels")
    pre.add_argument("--crop-pct", type=float, metavar="F", help="resize to size/crop_pct, then centre-crop (1.0: no crop)")
    pre.add_argument("--interpolation", choices=INTERPOLATIONS)
    pre.add_argument("--crop-mode", choices=CROP_MODES)
    pre.add_argument("--mean", metavar="M,M,M", help="per-channel mean, e.g. 0.485,0.456,0.406")
    pre.add_argument("--std", metavar="S,S,S", help="per-channel std, e.g. 0.229,0.224,0.225")
    imp.add_argument("--exact", action="store_true",
                     help="the file is this exact model's state dict (no head adaptation)")
    imp.add_argument("--no-promote", action="store_true", help="add the version without making it CURRENT")
