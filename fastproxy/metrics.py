"""Prometheus metrics, aggregated across workers (SKELETON: contract for the master)."""

from __future__ import annotations


def prepare_multiproc_dir() -> str:
    """Make ``PROMETHEUS_MULTIPROC_DIR`` exist and empty; called by the master before forking."""
    raise NotImplementedError


def mark_process_dead(pid: int) -> None:
    """Drop the live gauges of a reaped worker; called by the master after each reap."""
    raise NotImplementedError
