"""Retraining: registry of model versions, guarded fine-tuning recipe, promotion gate, launchers."""
