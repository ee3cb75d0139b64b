"""Database backends for projects that want the outbox write to cost less (see postgresql/base.py)."""
