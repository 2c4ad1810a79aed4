"""Parallel runtime: the only package that imports mpi4py. Started explicitly, never on import."""
