"""Loaded first (``-p tests.env``): isolates this test run on the shared services.

Every run gets its own test database, stream and subject prefixes and Celery queue,
so runs never see each other's data and never depend on what an earlier run left.
"""

import os
import uuid

RUN_ID = os.environ.setdefault("TEST_RUN_ID", uuid.uuid4().hex[:8])
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ticketing.settings")
os.environ.setdefault("DJANGO_DEV", "1")
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
os.environ.setdefault("TEST_DATABASE_NAME", f"test_outbox_{RUN_ID}")
os.environ.setdefault("NATS_URL", "nats://127.0.0.1:4222")
os.environ.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
os.environ["OUTBOX_SUBJECT_PREFIX"] = f"t{RUN_ID}."
os.environ["OUTBOX_STREAM_PREFIX"] = f"T{RUN_ID}_"
os.environ["OUTBOX_CELERY_QUEUE"] = f"outbox-{RUN_ID}"
os.environ.setdefault("LOG_LEVEL", "WARNING")
# The suite talks plain HTTP to the test server; production keeps redirecting to HTTPS.
os.environ.setdefault("SECURE_SSL_REDIRECT", "0")
