"""The replica in the admin: read-only, as the ticket events built it."""

from __future__ import annotations

from django.contrib import admin

from outbox.admin import ReadOnlyAdminMixin
from ticketing.replica.models import TicketReplica


@admin.register(TicketReplica)
class TicketReplicaAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """This service's copy of tickets, as the ticket events built it."""

    list_display = ("id", "title", "price", "user_id", "order_id", "version", "updated_at")
    search_fields = ("=id", "title")
    search_help_text = "A ticket id (exact) or a title (contains)."
    ordering = ("-updated_at",)
    list_per_page = 100
    show_full_result_count = False
    empty_value_display = "—"
