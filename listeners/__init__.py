"""A consumer framework for outbox events on NATS JetStream.

Subclass :class:`listeners.base.Listener`, register it with ``@listener``, and
run it with ``python manage.py listen SUBJECT``.
"""
