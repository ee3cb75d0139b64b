from django.apps import AppConfig


class ReplicaConfig(AppConfig):
    name = "ticketing.replica"
    label = "replica"
    verbose_name = "Ticket replica"
    default_auto_field = "django.db.models.BigAutoField"
