"""Celery application: ``celery -A ticketing worker --beat`` runs the outbox relay."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ticketing.settings")

app = Celery("ticketing")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["outbox"])
