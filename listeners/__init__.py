"""A consumer framework for outbox events on NATS JetStream.

Subclass :class:`listeners.base.Listener`, register it with ``@listener`` in an app's
``handlers.py``, and run it with ``python manage.py listen SUBJECT``. The names a
project uses are importable from here too::

    from listeners import Context, Listener, VersionedReplicaListener, listener
"""

from typing import Any

__all__ = ["Context", "Listener", "NotYet", "PermanentFailure", "VersionedReplicaListener", "listener"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the package does not import models before the app registry is ready.
    if name in {"Context", "Listener", "VersionedReplicaListener"}:
        from listeners import base

        return getattr(base, name)
    if name == "listener":
        from listeners.registry import listener

        return listener
    if name in {"NotYet", "PermanentFailure"}:
        from listeners import errors

        return getattr(errors, name)
    raise AttributeError(name)
