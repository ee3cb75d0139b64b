"""Errors of the listeners app."""


class ListenerError(Exception):
    """Base class of listener errors."""


class UnknownListenerSubject(ListenerError):
    pass


class NotYet(ListenerError):
    """Raised by a handler when the event cannot be applied yet (e.g. a version gap); it is redelivered later."""


class PermanentFailure(ListenerError):
    """Raised by a handler for an event that can never be applied; it is dead-lettered at once."""


class ListenerStartupError(ListenerError):
    """NATS could not be reached, or the streams/consumers could not be set up; the message is one line."""


class TransactionBroken(ListenerError):
    """The batch transaction can no longer commit (e.g. the connection was lost); none of it is kept.

    Raised instead of letting Django's ``atomic`` roll back silently at exit, so the
    caller never acks a message whose work was not committed.
    """


class ListenerConfigurationError(ListenerError):
    """The LISTENERS setting is malformed (unknown key, wrong type); the message is one sentence."""
