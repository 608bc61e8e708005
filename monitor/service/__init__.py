"""The long-running daemon: scheduler, HTTP API, Prometheus metrics, sd_notify."""
