"""Prometheus metrics of all worker processes (``serve --workers N``): prometheus_client's multiprocess mode.

Each worker writes its counters and histograms to memory-mapped files in one directory
(``PROMETHEUS_MULTIPROC_DIR``), and ``/metrics`` of any worker sums the files of all of them, so
whichever worker answers a scrape reports the whole server. The supervisor makes a fresh
directory before it starts the workers (they read the variable when they import prometheus_client)
and removes it at exit; a directory given by the caller in the variable is used as it is (it must be
empty at start, as prometheus_client requires).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

ENV = "PROMETHEUS_MULTIPROC_DIR"


def exposition_registry(own: CollectorRegistry) -> CollectorRegistry:
    """What ``/metrics`` exposes: ``own`` in one process, the sum over the workers' files in multiprocess mode."""
    path = os.environ.get(ENV)
    if not path:
        return own
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path)
    return registry


@contextlib.contextmanager
def multiprocess_directory() -> Iterator[str]:
    """For the supervisor of several workers: the metrics directory, made (and removed) here unless given."""
    given = os.environ.get(ENV)
    if given:
        yield given
        return
    path = tempfile.mkdtemp(prefix="stablesynth-metrics-")
    os.environ[ENV] = path
    try:
        yield path
    finally:
        os.environ.pop(ENV, None)
        shutil.rmtree(path, ignore_errors=True)
