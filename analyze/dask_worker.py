"""Set-up for the Dask worker processes that run analysis tasks (a Dask preload module).

LocalClusters started by ``iis`` load it in every worker; workers started by hand can too:
``dask worker tcp://host:8786 --preload iis.analyze.dask_worker``.

It silences one message that is noise, not a failure. When a cluster closes, each worker is
told to close; a heartbeat to the scheduler already in flight then meets a closed stream, and
``distributed`` logs "Failed to communicate with scheduler during heartbeat." at ERROR with a
traceback (dask/distributed#7105), at the end of an ``iis run`` that went well. The same message
from a worker that is still running (the scheduler lost) is left as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

HEARTBEAT_FAILURE = "Failed to communicate with scheduler during heartbeat."
# Statuses of a worker that was asked to close (distributed.core.Status names).
_CLOSING = frozenset({"closing", "closing_gracefully", "closed"})


class ClosingHeartbeatFilter(logging.Filter):
    """Drops the heartbeat-failure record while every worker of this process is closing.

    Args:
        workers: returns the process' workers (objects with a ``status`` whose ``name`` is a
            ``distributed`` status); by default ``distributed.Worker._instances``.
    """

    def __init__(self, workers: Callable[[], Iterable[object]] | None = None) -> None:
        super().__init__()
        self._workers = workers or _process_workers

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != HEARTBEAT_FAILURE:
            return True
        workers = list(self._workers())
        return not workers or not all(getattr(w.status, "name", None) in _CLOSING for w in workers)


def _process_workers() -> list[object]:
    from distributed import Worker

    return list(Worker._instances)


def install() -> ClosingHeartbeatFilter:
    """Add the filter to the ``distributed.worker`` logger of this process (once)."""
    logger = logging.getLogger("distributed.worker")
    for existing in logger.filters:
        if isinstance(existing, ClosingHeartbeatFilter):
            return existing
    heartbeat_filter = ClosingHeartbeatFilter()
    logger.addFilter(heartbeat_filter)
    return heartbeat_filter


def dask_setup(worker: object) -> None:
    """Dask's preload hook, called in the worker process before it starts."""
    install()
