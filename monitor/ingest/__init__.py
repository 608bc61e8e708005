"""Getting rows in: the log contract, the producer's writer, the tailer, label joins and the checkpoint."""
