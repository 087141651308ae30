"""Reconcile logic per kind: pure `compute_*` functions plus thin `reconcile_*` adapters."""
