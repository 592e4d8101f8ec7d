"""The master process: supervision, routing of hand-offs, upgrade in place."""
