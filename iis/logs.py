"""Logging for the ``iis`` command: one format, three verbosities, Dask kept to its warnings.

========  ==============  =======================================
flag      iis and others  Dask, Bokeh, Tornado (``distributed.*``)
========  ==============  =======================================
``-q``    WARNING         WARNING
(none)    INFO            WARNING
``-v``    DEBUG           INFO
========  ==============  =======================================

Dask's own INFO lines (scheduler and nanny start/stop, comms, and the ``CommClosedError``
traceback that its batched stream logs at INFO while a cluster shuts down) drown the pipeline's.
Setting the ``distributed`` logger's level is not enough: importing ``distributed`` sets it
back to INFO from Dask's config, so the handler filters them too, whenever they are imported.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%H:%M:%S"
THIRD_PARTY = ("distributed", "bokeh", "tornado")


class _ThirdPartyFilter(logging.Filter):
    """Drops records of the :data:`THIRD_PARTY` loggers below ``level``."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.level:
            return True
        return not any(record.name == p or record.name.startswith(p + ".") for p in THIRD_PARTY)


def levels(verbosity: int) -> tuple[int, int]:
    """``(own level, third-party level)`` for verbosity -1 (``-q``), 0 or 1 (``-v``)."""
    if verbosity < 0:
        return logging.WARNING, logging.WARNING
    if verbosity == 0:
        return logging.INFO, logging.WARNING
    return logging.DEBUG, logging.INFO


def configure_logging(verbosity: int = 0) -> None:
    """Set up the root logger for a command; calling it again replaces the earlier setup.

    A root logger that already has handlers of someone else's (an application embedding iis,
    pytest) keeps them: only the levels are set then.
    """
    own, third = levels(verbosity)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_iis", False)]:
        root.removeHandler(handler)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler._iis = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter(FORMAT, datefmt=DATEFMT))
        handler.addFilter(_ThirdPartyFilter(third))
        root.addHandler(handler)
    root.setLevel(own)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(third)
