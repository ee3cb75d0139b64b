"""Logging helpers of the example project (wired in ``LOGGING`` in ticketing/settings.py)."""

from __future__ import annotations

import logging


class AskedStopIsInfo(logging.Filter):
    """The listener logs its first SIGTERM/SIGINT (``listener.stopping``) as a WARNING. For this
    project a stop that was asked for (Ctrl-C, a deploy, the demo finishing) is routine: show it
    as INFO. A second signal (exit at once) is not logged through here and stays as loud as it is."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith("listener.stopping"):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True
