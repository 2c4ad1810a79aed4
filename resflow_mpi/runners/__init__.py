"""Runners that drive the pipeline: MPI ranks, Spark executors and their shared-resource helpers."""
