"""The worker preload's filter: the shutdown race's heartbeat error is dropped only while closing."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from distributed.core import Status
from iis.analyze.dask_worker import HEARTBEAT_FAILURE, ClosingHeartbeatFilter, install


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, msg, None, None)


@pytest.mark.parametrize(("statuses", "kept"), [
    ([Status.closing], False),
    ([Status.closed], False),
    ([Status.closing_gracefully, Status.closed], False),
    ([Status.running], True),  # the scheduler lost while the worker runs: a real failure
    ([Status.closing, Status.running], True),
    ([], True),  # no worker known here: say it
])
def test_heartbeat_failure_is_dropped_only_while_every_worker_closes(statuses, kept):
    workers = [SimpleNamespace(status=s) for s in statuses]
    heartbeat_filter = ClosingHeartbeatFilter(lambda: workers)
    assert heartbeat_filter.filter(_record(HEARTBEAT_FAILURE)) is kept
    # Any other record passes, whatever the workers' state.
    assert heartbeat_filter.filter(_record("Unexpected exception during heartbeat. Closing worker."))


def test_install_adds_one_filter_to_the_worker_logger():
    logger = logging.getLogger("distributed.worker")
    before = list(logger.filters)
    try:
        first = install()
        assert install() is first
        assert [f for f in logger.filters if isinstance(f, ClosingHeartbeatFilter)] == [first]
    finally:
        logger.filters[:] = before
