"""Drift signals. Each module computes one signal from numpy arrays and a reference; none knows
about files, Prometheus or the daemon. Results are the dataclasses in ``results``."""
