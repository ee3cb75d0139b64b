from django.apps import AppConfig


class TicketingConfig(AppConfig):
    name = "ticketing"
    verbose_name = "Tickets"
    default_auto_field = "django.db.models.BigAutoField"
