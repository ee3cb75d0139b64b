"""Named points of the run loop where other code may step in; nothing is registered, and nothing happens, by default.

The fault tests use it to kill a listener at the worst moment (after a commit, before
its acks; or holding a batch it has not applied) without production code carrying a
switch for it::

    from listeners.hooks import AFTER_COMMIT, add_hook

    add_hook(AFTER_COMMIT, lambda *, batches, **_: ...)

A hook is called synchronously on the event loop with keyword arguments only; it
must accept (and may ignore) keywords it does not know.
"""

from __future__ import annotations

from collections.abc import Callable

#: A batch was received and nothing of it is applied yet; keywords: ``durable``, ``messages``.
BEFORE_APPLY = "before_apply"
#: A batch has committed and none of its messages is acked yet; keywords: ``batches``
#: (batches this process committed so far), ``durable``, ``messages``.
AFTER_COMMIT = "after_commit"
#: One turn of a consumer's loop ended (a batch handled, or a wait for messages timed out);
#: keywords: ``durable``. The health file is written from here.
LOOP_TURN = "loop_turn"

POINTS = frozenset({BEFORE_APPLY, AFTER_COMMIT, LOOP_TURN})

Hook = Callable[..., None]

_hooks: dict[str, list[Hook]] = {}


def add_hook(point: str, hook: Hook) -> None:
    """Call ``hook`` at ``point`` from now on (in this process)."""
    if point not in POINTS:
        raise ValueError(f"unknown hook point {point!r}; known: {', '.join(sorted(POINTS))}")
    _hooks.setdefault(point, []).append(hook)


def remove_hook(point: str, hook: Hook) -> None:
    """Stop calling ``hook`` at ``point``; a hook that was not added is ignored."""
    hooks = _hooks.get(point, [])
    if hook in hooks:
        hooks.remove(hook)


def call_hooks(point: str, **info: object) -> None:
    """Call the hooks added at ``point``, in the order they were added."""
    for hook in _hooks.get(point, ()):
        hook(**info)
