"""Per-version monitoring above ingest and signals: the reference each version is judged against
(``reference``), one version's running window and detectors (``window``), the references and
trackers of every version (``versions``), the stream's own clock (``event_time``), and the cycle
that feeds them (``cycle``) with an exactly-once checkpoint (``checkpoint``) and the windows
handed to the daemon but not yet acknowledged (``handover``)."""
