"""The ticketing service: the Django project and the ticket domain."""

from ticketing.celery import app as celery_app

__all__ = ["celery_app"]
