"""Settings for the ticketing project.

Everything a deployment changes comes from the environment; see the README's
configuration table. Development defaults are safe only on a developer machine:
outside ``DEBUG`` a ``SECRET_KEY`` must be given.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from listeners.beat import beat_schedule as listeners_beat_schedule
from outbox.beat import beat_schedule

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)

# The "django-insecure-" prefix makes `manage.py check --deploy` flag it (security.W009) wherever
# it ends up outside DEBUG, e.g. DJANGO_DEV=1 on a production host.
_DEV_SECRET = "django-insecure-dev-only-secret-key-do-not-use-in-production"  # noqa: S105
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if DEBUG or env_bool("DJANGO_DEV", False):
        SECRET_KEY = _DEV_SECRET
    else:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set SECRET_KEY in the environment, "
            "or DEBUG=1 / DJANGO_DEV=1 on a development machine."
        )

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "outbox",
    "listeners",
    "ticketing",
    "ticketing.replica",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",  # static files from STATIC_ROOT, DEBUG on or off
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "ticketing.urls"
WSGI_APPLICATION = "ticketing.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "ticketing" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# A SQLite file when DATABASE_URL is unset: the embedded default of `make demo`.
_default_db = f"sqlite:///{VAR_DIR / 'db.sqlite3'}"
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or _default_db,
        conn_max_age=int(os.environ.get("CONN_MAX_AGE", "60")),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Django's backend, with each emitted outbox row sent in the COMMIT's round trip (README: Write path).
    DATABASES["default"]["ENGINE"] = "outbox.backends.postgresql"
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the listener read while the relay writes; the timeout absorbs short write locks.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    VAR_DIR.mkdir(parents=True, exist_ok=True)
if os.environ.get("TEST_DATABASE_NAME"):
    DATABASES["default"]["TEST"] = {"NAME": os.environ["TEST_DATABASE_NAME"]}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
# `manage.py collectstatic` fills it (the production image does at build); WhiteNoise serves it
# compressed, with far-future caching for hashed names. Without collectstatic (runserver, tests)
# the finders serve static files when DEBUG is on.
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT") or VAR_DIR / "static")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
warnings.filterwarnings("ignore", message="No directory at: ")  # WhiteNoise, before collectstatic

# Production hardening; `manage.py check --deploy` is clean when DEBUG is off and
# the site is served over TLS (SECURE_SSL_REDIRECT can be turned off behind a proxy).
if not DEBUG:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", True)
    CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", True)
    SECURE_HSTS_SECONDS = int(os.environ.get("SECURE_HSTS_SECONDS", "31536000"))
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# --- Celery ---------------------------------------------------------------------------
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_TRANSPORT_OPTIONS: dict = {}
if CELERY_BROKER_URL.startswith("filesystem://"):
    # The embedded broker of `make demo` / `make run` when Redis does not answer: a folder of files
    # under VAR_DIR, its exchange table (control_folder) included, never the working directory.
    _broker_dir = VAR_DIR / "broker"
    for sub in ("out", "processed", "control"):
        (_broker_dir / sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "out"),
        "data_folder_out": str(_broker_dir / "out"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_ACKS_LATE = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- NATS -----------------------------------------------------------------------------
# NATS_URL may list several servers, comma separated. Credentials and TLS are optional.
NATS = {
    "SERVERS": env_list("NATS_URL", "nats://127.0.0.1:4222"),
    "NAME": os.environ.get("NATS_CLIENT_NAME", ""),
    "USER": os.environ.get("NATS_USER", ""),
    "PASSWORD": os.environ.get("NATS_PASSWORD", ""),
    "TOKEN": os.environ.get("NATS_TOKEN", ""),
    "CREDENTIALS_FILE": os.environ.get("NATS_CREDS", ""),
    "TLS_CA_FILE": os.environ.get("NATS_TLS_CA", ""),
    "TLS_CERT_FILE": os.environ.get("NATS_TLS_CERT", ""),
    "TLS_KEY_FILE": os.environ.get("NATS_TLS_KEY", ""),
    "CONNECT_TIMEOUT": float(os.environ.get("NATS_CONNECT_TIMEOUT", "2")),
    "MONITOR_URL": os.environ.get("NATS_MONITOR_URL", ""),
}

# --- Outbox ---------------------------------------------------------------------------
# Every key and its default is documented in outbox/conf.py and the README.
OUTBOX: dict[str, Any] = {
    "SUBJECT_PREFIX": os.environ.get("OUTBOX_SUBJECT_PREFIX", ""),
    "STREAM_PREFIX": os.environ.get("OUTBOX_STREAM_PREFIX", ""),
    "STREAM_REPLICAS": int(os.environ.get("OUTBOX_STREAM_REPLICAS", "1")),
    "CELERY_QUEUE": os.environ.get("OUTBOX_CELERY_QUEUE", "outbox"),
    "SWEEP_INTERVAL": float(os.environ.get("OUTBOX_SWEEP_INTERVAL", "5")),
}
# Tuning knobs an operator (or the fault suite) may set from the environment.
for _key, _type in {
    "BATCH_SIZE": int,
    "LEASE_SECONDS": float,
    "PUBLISH_TIMEOUT": float,
    "MAX_ATTEMPTS": int,
    "BACKOFF_BASE": float,
    "BACKOFF_MAX": float,
    "DUPLICATE_WINDOW": float,
    "TASK_TIME_BUDGET": float,
    "FOLLOW_SECONDS": float,
    "RETENTION": float,
    "STREAM_MAX_AGE": float,
    "PIPELINE_DEPTH": int,
    "REBALANCE_SECONDS": float,
    "OWNERSHIP": str,
    "WAKE": str,
    "WIRE_PUBLISH": bool,
    "METRICS_PORT": int,
    "METRICS_ADDR": str,
    "METRICS_PUBLIC": bool,
    "METRICS_TOKEN": str,
    "TRACING": bool,
}.items():
    if os.environ.get(f"OUTBOX_{_key}"):
        if _type is bool:
            OUTBOX[_key] = env_bool(f"OUTBOX_{_key}", True)
            continue
        try:
            OUTBOX[_key] = _type(os.environ[f"OUTBOX_{_key}"])
        except ValueError:
            raise ImproperlyConfigured(f"OUTBOX_{_key}={os.environ[f'OUTBOX_{_key}']!r} is not a number") from None

if os.environ.get("OUTBOX_METRICS_ALLOW"):
    OUTBOX["METRICS_ALLOW"] = env_list("OUTBOX_METRICS_ALLOW", "")

# Contracts (each app's events.py) and listeners (each app's handlers.py) are autodiscovered;
# OUTBOX['CONTRACT_MODULES'] and LISTENERS['HANDLER_MODULES'] would name the modules instead.
LISTENERS: dict = {}
if os.environ.get("LISTENERS_TRACING"):
    LISTENERS["TRACING"] = env_bool("LISTENERS_TRACING", True)

# The relay's tasks route themselves to OUTBOX['CELERY_QUEUE']; beat gets its entries from one helper.
CELERY_BEAT_SCHEDULE = {**beat_schedule(OUTBOX), **listeners_beat_schedule(LISTENERS, queue=OUTBOX["CELERY_QUEUE"])}

# --- Logging --------------------------------------------------------------------------
LOG_LEVEL = os.environ.get("LOG_LEVEL", "INFO")
# LOG_FORMAT=json: one JSON object per line for a log pipeline (outbox.logs.JsonFormatter, the
# [json-logs] extra); the default stays the line a person reads. Only the chosen formatter is
# configured, so the line format needs no python-json-logger.
_LOG_FORMATTERS: dict[str, dict[str, Any]] = {
    "line": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    "json": {"()": "outbox.logs.JsonFormatter"},
}
LOG_FORMAT = os.environ.get("LOG_FORMAT", "").strip().lower() or "line"
if LOG_FORMAT not in _LOG_FORMATTERS:
    raise ImproperlyConfigured(
        f"LOG_FORMAT={os.environ['LOG_FORMAT']!r} is not a log format (use {' or '.join(_LOG_FORMATTERS)})"
    )
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {LOG_FORMAT: _LOG_FORMATTERS[LOG_FORMAT]},
    # A stop that was asked for (a listener's first SIGTERM/SIGINT) is logged as INFO, not WARNING.
    "filters": {
        "asked_stop": {"()": "ticketing.logs.AskedStopIsInfo"},
        "redact": {"()": "outbox.redact.RedactFilter"},  # no credentials of a URL in a log line
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "stream": "ext://sys.stdout",
            "filters": ["asked_stop", "redact"],
        }
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "outbox": {"level": LOG_LEVEL},
        "listeners": {"level": LOG_LEVEL},
        "ticketing": {"level": LOG_LEVEL},
        "celery": {"level": "WARNING"},
    },
}
