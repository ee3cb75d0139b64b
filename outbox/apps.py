from django.apps import AppConfig


class OutboxConfig(AppConfig):
    name = "outbox"
    verbose_name = "Outbox"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported for what they register: the system checks, and the Celery tasks (a kick finds
        # the relay task by name).
        from outbox import checks, tasks  # noqa: F401
        from outbox.contracts import load_contract_modules

        load_contract_modules()
