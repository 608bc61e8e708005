"""driftd's monitoring side: ingest -> signals -> policy -> service.

Inference services import the writers from here::

    from monitor import LabelWriter, LogWriter

They load lazily and need only numpy and pyarrow (no torch, scipy or timm), so a producer can
install driftd without its dependencies (README, "Writing logs from an inference service").
Everything else is used through the ``driftd`` CLI.
"""

# The one place the version is written: pyproject.toml reads it (tool.setuptools.dynamic).
__version__ = "0.1.0"

__all__ = ["LabelWriter", "LogWriter", "__version__"]

_WRITERS = ("LabelWriter", "LogWriter")


def __getattr__(name: str):  # lazy, so `import monitor` stays cheap for producers and the CLI
    if name in _WRITERS:
        from monitor.ingest import writer

        return getattr(writer, name)
    raise AttributeError(f"module 'monitor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WRITERS])
