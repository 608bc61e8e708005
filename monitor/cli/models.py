"""`driftd models`: list, inspect, promote, roll back and import versions in the model registry."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from monitor.cli.common import add_config_argument
from monitor.config import load_config
from monitor.errors import ConfigError

EXAMPLES = """examples:
  driftd models list --config driftd.yaml
  driftd models show v3 --registry /var/lib/driftd/registry
  driftd models promote v3 --config driftd.yaml
  driftd models rollback --config driftd.yaml
  driftd models import --config driftd.yaml --arch resnet50 --num-classes 10 \\
      --checkpoint resnet50.pth --class-names cat,dog,... --input-size 224
"""


def _registry(args: argparse.Namespace):
    from retrain.registry import Registry

    if args.registry:
        return Registry(Path(args.registry).expanduser().resolve())
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


def promote(args: argparse.Namespace) -> int:
    mv = _registry(args).promote(args.version)
    print(f"CURRENT is now {mv.version}; restart or reload the inference service to serve it")
    return 0


def rollback(args: argparse.Namespace) -> int:
    version = _registry(args).rollback()
    print(f"rolled back: CURRENT is now {version}")
    return 0


def import_model(args: argparse.Namespace) -> int:
    from retrain.registry import import_safetensors, import_timm_checkpoint

    if args.num_classes < 1:
        raise ConfigError(f"--num-classes must be >= 1, got {args.num_classes}")
    names = tuple(n.strip() for n in args.class_names.split(",")) if args.class_names else ()
    registry = _registry(args)
    importer = import_safetensors if args.exact else import_timm_checkpoint
    version = importer(registry, args.arch, args.num_classes, Path(args.checkpoint), class_names=names,
                       input_size=args.input_size, promote=not args.no_promote)
    state = "not promoted" if args.no_promote else "promoted to CURRENT"
    print(f"imported {args.checkpoint} as {version} ({args.arch}, {args.num_classes} classes), {state}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models", help="list, show, promote, roll back or import model versions",
        description="The model registry: immutable versions, the CURRENT pointer and its history.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=lambda args: parser.error("choose a models command: list, show, promote, rollback, import"))
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", parser_class=type(parser))

    def action(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_config_argument(p)
        p.add_argument("--registry", metavar="DIR", help="registry directory (instead of --config)")
        p.set_defaults(func=func)
        return p

    action("list", list_versions, "list versions (* marks CURRENT)")
    action("show", show, "print one version's meta.json").add_argument("version", help="e.g. v3")
    action("promote", promote, "make VERSION the CURRENT model").add_argument("version", help="e.g. v3")
    action("rollback", rollback, "return CURRENT to the previously promoted version")
    imp = action("import", import_model, "add a starting model from a local checkpoint (nothing downloads)")
    imp.add_argument("--arch", required=True, help="timm architecture name, e.g. resnet50")
    imp.add_argument("--num-classes", required=True, type=int)
    imp.add_argument("--checkpoint", required=True, help=".pth/.bin (loaded weights-only) or .safetensors file")
    imp.add_argument("--class-names", help="comma-separated, in class-index order")
    imp.add_argument("--input-size", type=int, help="override the model's input size in pixels")
    imp.add_argument("--exact", action="store_true",
                     help="the file is this exact model's safetensors state dict (no head adaptation)")
    imp.add_argument("--no-promote", action="store_true", help="add the version without making it CURRENT")
