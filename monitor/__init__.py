"""driftd's monitoring side: ingest -> signals -> policy -> service.

Inference services import :class:`monitor.ingest.writer.LogWriter` from here to write
rows in the log contract; everything else is used through the ``driftd`` CLI.
"""

__all__ = ["LogWriter"]


def __getattr__(name: str):  # lazy, so `import monitor` stays cheap for producers
    if name == "LogWriter":
        from monitor.ingest.writer import LogWriter

        return LogWriter
    raise AttributeError(name)
