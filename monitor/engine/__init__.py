"""Per-version monitoring above ingest and signals: the reference each version is judged against
(``reference``), one version's running window and detectors (``window``), and the cycle that
feeds them with an exactly-once checkpoint (``cycle``)."""
