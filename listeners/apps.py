from django.apps import AppConfig


class ListenersConfig(AppConfig):
    name = "listeners"
    verbose_name = "Listeners"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from listeners import checks  # noqa: F401 - registers the system checks
        from listeners.registry import autodiscover

        autodiscover()
