"""Named points in a relay batch where extra code may run; nothing runs there by default.

The relay calls :func:`run` at each point below. Register a callable for a point with
:func:`register` (it returns a function that removes it again). The crash tests use this to kill a
relay process at an exact step (tests/crashing_relay.py); production code registers nothing.

* :data:`AFTER_CLAIM` -- a batch was claimed and its publish is about to start: ``hook(rows=[ClaimedRow])``.
* :data:`BEFORE_MARK` -- a batch's publish outcome is in and it is about to be marked:
  ``hook(result=PublishResult)``.

A hook runs on the thread that claims or marks (possibly a worker session's); an exception it
raises propagates as the step's own would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

AFTER_CLAIM = "after-claim"
BEFORE_MARK = "before-mark"
POINTS = (AFTER_CLAIM, BEFORE_MARK)

_hooks: dict[str, tuple[Callable[..., Any], ...]] = {point: () for point in POINTS}


def register(point: str, hook: Callable[..., Any]) -> Callable[[], None]:
    """Run ``hook(**details)`` at ``point`` from now on; returns the function that unregisters it."""
    if point not in _hooks:
        raise ValueError(f"unknown relay hook point {point!r}; known: {', '.join(POINTS)}")
    _hooks[point] = (*_hooks[point], hook)

    def unregister() -> None:
        _hooks[point] = tuple(h for h in _hooks[point] if h is not hook)

    return unregister


def run(point: str, **details: Any) -> None:
    """Call every hook registered at ``point`` (in the order registered)."""
    for hook in _hooks[point]:
        hook(**details)
