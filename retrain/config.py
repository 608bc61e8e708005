"""The ``retrain`` config section: where models live, what data to train on, the recipe's knobs.

Parsed once by :func:`parse_retrain` into frozen dataclasses; every bad key is reported with its
dotted path (``retrain.hyper.lr_head: must be > 0``). Relative paths resolve against the config
file's directory.
"""

from __future__ import annotations

import re
import shlex
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from monitor.configutil import Section, resolve_location

MODES = ("auto", "images", "features")
STRATEGIES = ("auto", "head", "top_blocks", "all_but_stem", "full")
SCHEDULES = ("cosine", "onecycle")
DEVICES = ("auto", "cpu", "cuda")
BATCHNORM_MODES = ("auto", "frozen", "adapt")
LAUNCHERS = ("local", "kubernetes")
_TOLERATION_OPERATORS = ("Exists", "Equal")
_TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


@dataclass(frozen=True)
class GateConfig:
    """Promotion rule: candidate must gain on production data and not forget the reference,
    both shown by paired tests on held-out rows (retrain.gate, retrain.paired)."""

    min_gain: float = 0.02          # production accuracy gain required (absolute, 0..1)
    max_forgetting: float = 0.01    # largest allowed drop in reference accuracy (absolute, 0..1)
    gate_fraction: float = 0.25     # share of labelled rows (the newest) and of replay rows held out for the gate
    alpha: float = 0.05             # one-sided level of both paired tests
    min_rows: int = 50              # smallest gate slice judged at all (distinct inputs)


@dataclass(frozen=True)
class HyperConfig:
    """The fine-tuning recipe's hyper-parameters (see retrain.recipe).

    lr_backbone None and batchnorm "auto" were chosen on the pretrained MobileNetV2 bench
    (bench/README.md, "Retraining on a pretrained backbone"): a fixed 1e-3 sent validation loss
    from 0.99 to 3.19 in the first fine-tune epoch (noise:1); re-estimated BN statistics took the
    served model from 0.91 to 0.08 clean accuracy, while they help a model trained on its own data.
    """

    epochs_head: int = 10           # phase 1 upper bound; stops earlier when validation loss plateaus
    epochs_finetune: int = 8        # phase 2 upper bound
    batch_size: int = 64
    lr_head: float = 1e-2
    lr_backbone: float | None = None  # phase-2 LR of the head (each group below: x layer_decay); None: range test
    layer_decay: float | None = None  # None: the strategy's default
    warmup_epochs: float = 1.0
    schedule: str = "cosine"
    grad_clip: float = 1.0          # max global gradient norm (0 = off)
    l2sp_weight: float = 0.01       # L2-SP pull toward the starting weights
    ewc_weight: float = 0.0         # EWC (Fisher-weighted) pull, 0 = off
    replay_fraction: float = 0.5    # share of every batch drawn from the replay buffer (strategies may raise it)
    patience: int = 2               # epochs without validation-loss improvement before stopping
    spike_factor: float = 10.0      # gradient norm above this x running median stops the phase
    grad_ratio: float = 10.0        # phase 2: gradient norm above this x the head-trained model's trips a guard
    val_rise: float = 1.5           # phase 2: validation loss above this x the head phase's trips a guard
    max_backoffs: int = 2           # retries of phase 2 at 1/10 the LR after a guard trip
    batchnorm: str = "auto"         # phase-2 BN statistics: auto (re-estimate, keep if val loss holds) | frozen | adapt
    cache_mb: int = 2048            # memory for cached frozen-prefix activations (0 = run the whole network)
    wise_ft: bool = False           # interpolate start and fine-tuned weights, alpha chosen on gate slices
    seed: int = 0


@dataclass(frozen=True)
class Toleration:
    key: str | None = None
    operator: str = "Equal"
    value: str | None = None
    effect: str | None = None
    toleration_seconds: int | None = None


@dataclass(frozen=True)
class KubernetesConfig:
    """What the Kubernetes Job renderer (retrain.launch.kubernetes) needs."""

    namespace: str = "default"
    image: str | None = None        # required when launcher = "kubernetes"
    gpus: int = 1
    cpu: str = "4"
    memory: str = "16Gi"
    shm_size: str = "8Gi"           # /dev/shm for DataLoader workers
    tolerations: tuple[Toleration, ...] = ()
    node_selector: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs
    active_deadline_seconds: int = 6 * 3600
    ttl_seconds_after_finished: int = 24 * 3600
    service_account: str | None = None
    state_pvc: str | None = None    # PVC holding registry, state and reference dirs
    data_pvc: str | None = None     # PVC holding the inputs (input_root) and logs, mounted read-only
    config_map: str | None = None   # ConfigMap holding the driftd config file


@dataclass(frozen=True)
class OnPromoteConfig:
    """What runs after every promotion and rollback (retrain.hooks): how the serving side hears."""

    command: tuple[str, ...] = ()   # argv; the event's JSON on stdin, DRIFTD_* variables in the environment
    webhook: str | None = None      # http(s) URL that gets the event as a JSON POST
    webhook_token_env: str | None = None  # environment variable holding a bearer token for the webhook
    timeout_seconds: float = 30.0   # per hook; a hook that overruns counts as failed


@dataclass(frozen=True)
class RetrainConfig:
    registry_dir: Path = Path("./driftd-registry")
    input_root: Path | None = None  # input_uri values must resolve under this directory
    replay_logs: str | None = None  # labelled Parquet logs (input_uri + label + features): source data
    mode: str = "auto"
    strategy: str = "auto"
    min_labelled_rows: int = 200
    max_rows: int = 5000
    lookback_seconds: float = 7 * 86400.0
    gate: GateConfig = field(default_factory=GateConfig)
    hyper: HyperConfig = field(default_factory=HyperConfig)
    device: str = "auto"
    launcher: str = "local"
    nproc_per_node: int = 1         # > 1 launches the job through torchrun (DDP)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
    on_promote: OnPromoteConfig = field(default_factory=OnPromoteConfig)


def _optional_path(section: Section, name: str, base: Path) -> Path | None:
    value = section.optional_str(name)
    return None if value is None else Path(resolve_location(value, base))


def _parse_gate(s: Section) -> GateConfig:
    d = GateConfig()
    gate = GateConfig(
        min_gain=s.float("min_gain", d.min_gain, minimum=-1.0, maximum=1.0),
        max_forgetting=s.float("max_forgetting", d.max_forgetting, minimum=0.0, maximum=1.0),
        gate_fraction=s.float("gate_fraction", d.gate_fraction, minimum=0.01, maximum=0.9),
        alpha=s.float("alpha", d.alpha, minimum=1e-6, maximum=0.5),
        min_rows=s.int("min_rows", d.min_rows, minimum=10),
    )
    s.finish()
    return gate


def _lr_backbone(s: Section) -> float | None:
    """A number, or "auto"/null: chosen by an LR range test on the head-trained model."""
    if s.data.get("lr_backbone") == "auto":
        s.str("lr_backbone")
        return None
    return s.float("lr_backbone", None, minimum=1e-12)


def _parse_hyper(s: Section) -> HyperConfig:
    d = HyperConfig()
    layer_decay = s.float("layer_decay", None, minimum=0.01, maximum=1.0)
    hyper = HyperConfig(
        epochs_head=s.int("epochs_head", d.epochs_head, minimum=0),
        epochs_finetune=s.int("epochs_finetune", d.epochs_finetune, minimum=0),
        batch_size=s.int("batch_size", d.batch_size, minimum=2),
        lr_head=s.float("lr_head", d.lr_head, minimum=1e-12),
        lr_backbone=_lr_backbone(s),
        layer_decay=layer_decay,
        warmup_epochs=s.float("warmup_epochs", d.warmup_epochs, minimum=0.0),
        schedule=s.choice("schedule", SCHEDULES, d.schedule),
        grad_clip=s.float("grad_clip", d.grad_clip, minimum=0.0),
        l2sp_weight=s.float("l2sp_weight", d.l2sp_weight, minimum=0.0),
        ewc_weight=s.float("ewc_weight", d.ewc_weight, minimum=0.0),
        replay_fraction=s.float("replay_fraction", d.replay_fraction, minimum=0.0, maximum=0.9),
        patience=s.int("patience", d.patience, minimum=1),
        spike_factor=s.float("spike_factor", d.spike_factor, minimum=1.5),
        grad_ratio=s.float("grad_ratio", d.grad_ratio, minimum=1.5),
        val_rise=s.float("val_rise", d.val_rise, minimum=1.0),
        max_backoffs=s.int("max_backoffs", d.max_backoffs, minimum=0, maximum=6),
        batchnorm=s.choice("batchnorm", BATCHNORM_MODES, d.batchnorm),
        cache_mb=s.int("cache_mb", d.cache_mb, minimum=0),
        wise_ft=s.bool("wise_ft", d.wise_ft),
        seed=s.int("seed", d.seed),
    )
    s.finish()
    if hyper.epochs_head + hyper.epochs_finetune == 0:
        s.error("epochs_head", "epochs_head and epochs_finetune are both 0: nothing would be trained")
    return hyper


def _parse_toleration(s: Section) -> Toleration:
    t = Toleration(
        key=s.optional_str("key"),
        operator=s.choice("operator", _TOLERATION_OPERATORS, "Equal"),
        value=s.optional_str("value"),
        effect=s.choice("effect", _TOLERATION_EFFECTS, None),
        toleration_seconds=s.int("toleration_seconds", None, minimum=0),
    )
    s.finish()
    if t.operator == "Exists" and t.value is not None:
        s.error("value", "must be empty when operator is 'Exists'")
    if t.operator == "Equal" and t.key is None:
        s.error("key", "required when operator is 'Equal'")
    return t


def _quantity(s: Section, name: str, default: str) -> str:
    """A Kubernetes resource quantity: ``4``, ``500m``, ``16Gi`` (YAML may give a bare number)."""
    if isinstance(s.data.get(name), (int, float)) and not isinstance(s.data.get(name), bool):
        return str(s.float(name, minimum=0.0)).removesuffix(".0")
    value = s.str(name, default)
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?", value):
        s.error(name, f"expected a Kubernetes quantity such as '4', '500m' or '16Gi', got {value!r}")
    return value


def _parse_kubernetes(s: Section) -> KubernetesConfig:
    d = KubernetesConfig()
    selector = s.section("node_selector")
    node_selector = tuple(sorted((str(k), selector.str(str(k))) for k in selector.data))
    selector.finish()
    k8s = KubernetesConfig(
        namespace=s.str("namespace", d.namespace),
        image=s.optional_str("image"),
        gpus=s.int("gpus", d.gpus, minimum=0),
        cpu=_quantity(s, "cpu", d.cpu),
        memory=_quantity(s, "memory", d.memory),
        shm_size=_quantity(s, "shm_size", d.shm_size),
        tolerations=tuple(_parse_toleration(t) for t in s.sections("tolerations")),
        node_selector=node_selector,
        active_deadline_seconds=s.int("active_deadline_seconds", d.active_deadline_seconds, minimum=60),
        ttl_seconds_after_finished=s.int("ttl_seconds_after_finished", d.ttl_seconds_after_finished, minimum=0),
        service_account=s.optional_str("service_account"),
        state_pvc=s.optional_str("state_pvc"),
        data_pvc=s.optional_str("data_pvc"),
        config_map=s.optional_str("config_map"),
    )
    s.finish()
    return k8s


def _parse_on_promote(s: Section, base: Path) -> OnPromoteConfig:
    d = OnPromoteConfig()
    command: tuple[str, ...] = ()
    if isinstance(s.data.get("command"), str):
        text = s.str("command")
        try:
            command = tuple(shlex.split(text))  # split as a shell would, but never run by one
        except ValueError as exc:
            s.error("command", f"cannot split {text!r} into arguments ({exc}); give a list of strings instead")
    else:
        command = tuple(s.str_list("command", ()))
    if command and command[0].startswith(("./", "../")):  # a relative program is relative to the config file
        command = (str((base / command[0]).resolve()), *command[1:])
    if s.has("command") and s.data.get("command") is not None and not command:
        s.error("command", "is empty; remove the key or name the program to run")
    webhook = s.optional_str("webhook")
    if webhook is not None:
        parts = urllib.parse.urlsplit(webhook)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            s.error("webhook", "expected an http:// or https:// URL")
    config = OnPromoteConfig(
        command=command,
        webhook=webhook,
        webhook_token_env=s.optional_str("webhook_token_env"),
        timeout_seconds=s.float("timeout_seconds", d.timeout_seconds, minimum=0.1),
    )
    s.finish()
    if config.webhook_token_env is not None and config.webhook is None:
        s.error("webhook_token_env", "set without retrain.on_promote.webhook")
    return config


def parse_retrain(section: Section, base: Path) -> RetrainConfig:
    """Read the ``retrain`` section; errors are appended to the section's shared error list."""
    d = RetrainConfig()
    replay = section.optional_str("replay_logs")
    config = RetrainConfig(
        registry_dir=Path(resolve_location(section.str("registry_dir", str(d.registry_dir)), base)),
        input_root=_optional_path(section, "input_root", base),
        replay_logs=None if replay is None else resolve_location(replay, base),
        mode=section.choice("mode", MODES, d.mode),
        strategy=section.choice("strategy", STRATEGIES, d.strategy),
        min_labelled_rows=section.int("min_labelled_rows", d.min_labelled_rows, minimum=1),
        max_rows=section.int("max_rows", d.max_rows, minimum=2),
        lookback_seconds=section.float("lookback_seconds", d.lookback_seconds, minimum=1.0),
        gate=_parse_gate(section.section("gate")),
        hyper=_parse_hyper(section.section("hyper")),
        device=section.choice("device", DEVICES, d.device),
        launcher=section.choice("launcher", LAUNCHERS, d.launcher),
        nproc_per_node=section.int("nproc_per_node", d.nproc_per_node, minimum=1),
        kubernetes=_parse_kubernetes(section.section("kubernetes")),
        on_promote=_parse_on_promote(section.section("on_promote"), base),
    )
    section.finish()
    if config.max_rows < config.min_labelled_rows:
        section.error("max_rows", f"must be >= min_labelled_rows ({config.min_labelled_rows}), got {config.max_rows}")
    if config.launcher == "kubernetes" and config.kubernetes.image is None:
        section.error("kubernetes.image", "required when launcher is 'kubernetes' (the image with driftd installed)")
    return config
