"""Retraining: registry of model versions, guarded fine-tuning recipe, promotion gate, launchers.

For inference services: ``from retrain import CurrentModel`` (retrain.serving) serves the
registry's CURRENT model with its own preprocessing and follows promotions and rollbacks.
"""

__all__ = ["CurrentModel"]


def __getattr__(name: str):  # lazy: `import retrain.config` (every CLI command) must not load torch
    if name == "CurrentModel":
        from retrain.serving import CurrentModel

        return CurrentModel
    raise AttributeError(f"module 'retrain' has no attribute {name!r}")
