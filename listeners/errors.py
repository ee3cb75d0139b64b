"""Errors of the listeners app."""


class ListenerError(Exception):
    """Base class of listener errors."""


class UnknownListenerSubject(ListenerError):
    pass


class NotYet(ListenerError):
    """Raised by a handler when the event cannot be applied yet (e.g. a version gap); it is redelivered later."""


class PermanentFailure(ListenerError):
    """Raised by a handler for an event that can never be applied; it is dead-lettered at once."""
