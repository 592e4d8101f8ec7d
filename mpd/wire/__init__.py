"""The wire between master and workers: the channel, its messages, routing."""
