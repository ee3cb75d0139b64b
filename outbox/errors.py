"""Errors of the outbox app. Every one derives from :class:`OutboxError`."""


class OutboxError(Exception):
    """Base class of every outbox error."""


class NotInTransactionError(OutboxError):
    """``emit()`` was called outside ``transaction.atomic``."""


class UnknownSubjectError(OutboxError):
    """No contract is registered for a subject."""


class InvalidPayloadError(OutboxError):
    """An event's payload does not satisfy its contract."""


class PublishError(OutboxError):
    """NATS JetStream could not be reached or refused a message."""


class ConfigurationError(OutboxError):
    """The OUTBOX or NATS settings are wrong."""


class UnrelayedDatabaseError(OutboxError):
    """``emit(using=...)`` named a database whose outbox no relay reads."""
