"""Build a kustomization without kubectl: the subset of kustomize that driftd's manifests use.

    python deploy/kubernetes/build.py deploy/kubernetes/overlays/example > driftd.yaml

Supported (anything else in a kustomization.yaml is an error, never silently ignored):
``resources`` (files and directories), ``namespace``, ``images`` (newName/newTag/digest),
``configMapGenerator`` / ``secretGenerator`` with ``files`` and ``literals``, behaviors create/
replace/merge, and only with ``options.disableNameSuffixHash: true``; ``patches`` holding
JSON 6902 operations (add/replace/remove) with a ``target`` of kind and name. Where kubectl is
installed, tests/test_ops_kubernetes.py checks that this builder's output equals
``kubectl kustomize``.
"""

from __future__ import annotations

import base64
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

KNOWN_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "configMapGenerator",
              "secretGenerator", "patches"}
# Kinds that have no namespace (the namespace transformer leaves them alone).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass", "ValidatingWebhookConfiguration",
                  "MutatingWebhookConfiguration"}
POD_TEMPLATE_PATHS = {
    "Deployment": ("spec", "template", "spec"), "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"), "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"), "Pod": ("spec",),
}


class KustomizeError(Exception):
    """A kustomization this builder cannot build; the message names the file and key."""


def _load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except (OSError, yaml.YAMLError) as exc:
        raise KustomizeError(f"{path}: cannot read: {exc}") from None
    for doc in docs:
        if not isinstance(doc, dict) or "kind" not in doc or "metadata" not in doc:
            raise KustomizeError(f"{path}: every document must be a Kubernetes object with kind and metadata")
    return docs


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _generated(kind: str, spec: dict[str, Any], root: Path, where: str) -> dict[str, Any]:
    unknown = set(spec) - {"name", "behavior", "files", "literals", "options", "type"}
    if unknown:
        raise KustomizeError(f"{where}: unsupported keys {sorted(unknown)}")
    if not (spec.get("options") or {}).get("disableNameSuffixHash"):
        raise KustomizeError(f"{where}: set options.disableNameSuffixHash: true (name hashing is not implemented)")
    data: dict[str, str] = {}
    for item in spec.get("files", []):
        name, _, file = item.partition("=") if "=" in item else (Path(item).name, "", item)
        try:
            data[name] = (root / file).read_text(encoding="utf-8")
        except OSError as exc:
            raise KustomizeError(f"{where}: file {root / file}: {exc.strerror}") from None
    for item in spec.get("literals", []):
        name, _, value = item.partition("=")
        data[name] = value
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if kind == "Secret":
        doc["type"] = spec.get("type", "Opaque")
        doc["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        doc["data"] = data
    return doc


def _apply_generators(resources: list[dict[str, Any]], kustomization: dict[str, Any], root: Path) -> None:
    for field, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")):
        for i, spec in enumerate(kustomization.get(field, [])):
            where = f"{root / 'kustomization.yaml'}: {field}[{i}]"
            doc = _generated(kind, spec, root, where)
            behavior = spec.get("behavior", "create")
            index = next((n for n, r in enumerate(resources) if _key(r) == _key(doc)), None)
            if behavior == "create":
                if index is not None:
                    raise KustomizeError(f"{where}: {kind} {spec['name']} already exists; use behavior: replace or merge")
                resources.append(doc)
            elif behavior in ("replace", "merge"):
                if index is None:
                    raise KustomizeError(f"{where}: no {kind} {spec['name']} to {behavior}")
                if behavior == "merge":
                    doc["data"] = {**resources[index].get("data", {}), **doc["data"]}
                doc["metadata"] = {**resources[index]["metadata"], "name": spec["name"]}
                resources[index] = doc
            else:
                raise KustomizeError(f"{where}: behavior must be create, replace or merge, got {behavior!r}")


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json_patch(doc: Any, ops: list[dict[str, Any]], where: str) -> None:
    for op in ops:
        parts = _pointer(op["path"])
        parent = doc
        try:
            for part in parts[:-1]:
                parent = parent[int(part)] if isinstance(parent, list) else parent[part]
            last = parts[-1]
            if op["op"] == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            elif op["op"] in ("add", "replace"):
                value = copy.deepcopy(op["value"])
                if isinstance(parent, list):
                    if last == "-":
                        parent.append(value)
                    elif op["op"] == "add":
                        parent.insert(int(last), value)
                    else:
                        parent[int(last)] = value
                else:
                    if op["op"] == "replace" and last not in parent:
                        raise KeyError(last)
                    parent[last] = value
            else:
                raise KustomizeError(f"{where}: op {op['op']!r} not supported (add, replace, remove)")
        except (KeyError, IndexError, ValueError, TypeError):
            raise KustomizeError(f"{where}: path {op['path']} does not exist in the target") from None


def _apply_patches(resources: list[dict[str, Any]], kustomization: dict[str, Any], root: Path) -> None:
    for i, patch in enumerate(kustomization.get("patches", [])):
        where = f"{root / 'kustomization.yaml'}: patches[{i}]"
        target = patch.get("target") or {}
        if set(target) - {"kind", "name"} or not target.get("kind") or not target.get("name"):
            raise KustomizeError(f"{where}: target must name exactly a kind and a name")
        text = (root / patch["path"]).read_text(encoding="utf-8") if "path" in patch else patch.get("patch", "")
        ops = yaml.safe_load(text)
        if not isinstance(ops, list):
            raise KustomizeError(f"{where}: only JSON 6902 patches (a list of operations) are supported")
        matches = [r for r in resources if _key(r) == (target["kind"], target["name"])]
        if not matches:
            raise KustomizeError(f"{where}: no {target['kind']} {target['name']} to patch")
        for doc in matches:
            _json_patch(doc, ops, where)


def _split_image(image: str) -> tuple[str, str]:
    """("name", ":tag" or "@digest" or "")."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def _apply_images(resources: list[dict[str, Any]], images: list[dict[str, Any]]) -> None:
    for doc in resources:
        path = POD_TEMPLATE_PATHS.get(doc["kind"])
        if path is None:
            continue
        spec: Any = doc
        for part in path:
            spec = spec.get(part, {})
        for container in [*spec.get("containers", []), *spec.get("initContainers", [])]:
            name, suffix = _split_image(container["image"])
            for rule in images:
                if rule["name"] != name:
                    continue
                if "digest" in rule:
                    suffix = "@" + rule["digest"]
                elif "newTag" in rule:
                    suffix = ":" + str(rule["newTag"])
                container["image"] = rule.get("newName", name) + suffix


def _apply_namespace(resources: list[dict[str, Any]], namespace: str, filled: set[int]) -> None:
    for doc in resources:
        if doc["kind"] in CLUSTER_SCOPED:
            continue
        doc["metadata"]["namespace"] = namespace
        if doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            # As kustomize does: ServiceAccount subjects without a namespace, in "default", or
            # whose namespace an inner kustomization filled in, follow; others stay as written.
            for subject in doc.get("subjects", []):
                if subject.get("kind") != "ServiceAccount":
                    continue
                if subject.get("namespace") in (None, "default") or id(subject) in filled:
                    subject["namespace"] = namespace
                    filled.add(id(subject))


def build(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize DIRECTORY`` would print, in the order resources are listed."""
    return _build(Path(directory), set())


def _build(directory: Path, filled: set[int]) -> list[dict[str, Any]]:
    path = directory / "kustomization.yaml"
    try:
        kustomization = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise KustomizeError(f"{path}: cannot read: {exc}") from None
    unknown = set(kustomization) - KNOWN_KEYS
    if unknown:
        raise KustomizeError(f"{path}: unsupported kustomize fields {sorted(unknown)} (see {Path(__file__).name})")
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        target = directory / entry
        resources.extend(_build(target, filled) if target.is_dir() else _load_yaml_docs(target))
    seen: set[tuple[str, str]] = set()
    for doc in resources:
        if _key(doc) in seen:
            raise KustomizeError(f"{path}: {doc['kind']} {doc['metadata']['name']} is defined twice")
        seen.add(_key(doc))
    _apply_generators(resources, kustomization, directory)
    _apply_patches(resources, kustomization, directory)
    _apply_images(resources, kustomization.get("images", []))
    if "namespace" in kustomization:
        _apply_namespace(resources, kustomization["namespace"], filled)
    return resources


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: python {argv[0]} KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    try:
        docs = build(Path(argv[1]))
    except KustomizeError as exc:
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
