"""Admin of tickets.

Every write goes through ``ticketing.services``: adding a ticket calls
``ticket_create`` and an edit calls ``ticket_update`` with the version the page
was rendered with, so the admin emits exactly the events any other caller would,
in the same transaction as the change. Nothing here saves a ``Ticket`` directly.

An edit of a ticket that changed since its page was opened (another tab, another
operator, an order reserving it) is refused with the person's input kept on the
page; see :mod:`ticketing.forms`. The service checks again under its row lock,
and a refusal it raises at save time is shown the same way.
"""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin.utils import quote
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse

from outbox.admin import status_badge
from outbox.selectors import outbox_events_for_aggregate
from ticketing.errors import TicketConflict, TicketInvalid, TicketNotFound, TicketReserved
from ticketing.forms import TicketAdminForm, conflict_message, reserved_message
from ticketing.models import Ticket
from ticketing.services import EDITABLE_FIELDS, ticket_create, ticket_update

#: The aggregate type of ticket events in the outbox (the contracts' ``aggregate="ticket"``).
TICKET_AGGREGATE = "ticket"
#: Where a refusal from the service waits while the submission is validated again.
_REFUSAL_ATTR = "_ticket_admin_service_errors"
_STATE_FIELDS = ("id", "version", "order_id", "created_at", "updated_at")


class ServiceRefused(Exception):
    """The service refused a save that the form had accepted; carries form errors (field -> messages)."""

    def __init__(self, errors: dict[str | None, list[str]]) -> None:
        self.errors = errors or {None: ["The change was refused. Nothing was saved."]}
        super().__init__(errors)


class ReservedFilter(admin.SimpleListFilter):
    title = "reserved"
    parameter_name = "reserved"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("yes", "Yes"), ("no", "No")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        unreserved = Q(order_id__isnull=True) | Q(order_id="")
        if self.value() == "yes":
            return queryset.exclude(unreserved)
        if self.value() == "no":
            return queryset.filter(unreserved)
        return queryset


@admin.register(Ticket)
class TicketAdmin(admin.ModelAdmin):
    """Tickets: list, search, add and edit through the services.

    Deletion is not offered (``has_delete_permission`` is False): there is no
    ``ticket:deleted`` event, so a ticket deleted here would silently stay alive in
    every service that keeps a copy of it.
    """

    form = TicketAdminForm
    list_display = ("title", "price", "user_id", "version", "is_reserved", "order_id", "updated_at")
    list_filter = (ReservedFilter, ("created_at", admin.DateFieldListFilter))
    search_fields = ("title", "=user_id")
    search_help_text = "A title (contains), a user id (exact) or a ticket id (exact UUID)."
    ordering = ("-created_at",)
    list_per_page = 100
    show_full_result_count = False
    empty_value_display = "—"

    @admin.display(boolean=True, description="reserved", ordering="order_id")
    def is_reserved(self, obj: Ticket) -> bool:
        return obj.is_reserved

    # -- permissions and layout ----------------------------------------------------

    def has_delete_permission(self, request: HttpRequest, obj: Ticket | None = None) -> bool:
        return False

    def get_fieldsets(self, request: HttpRequest, obj: Ticket | None = None) -> Any:
        if obj is None:
            return ((None, {"fields": ("title", "price", "user_id")}),)
        editable = ("title", "price", "user_id")
        if self.has_change_permission(request, obj):
            editable = (*editable, "expected_version")
        return ((None, {"fields": editable}), ("State", {"fields": _STATE_FIELDS}))

    def get_readonly_fields(self, request: HttpRequest, obj: Ticket | None = None) -> tuple[str, ...]:
        if obj is None:
            return ()
        if obj.is_reserved:
            return ("title", "price", "user_id", *_STATE_FIELDS)
        return _STATE_FIELDS

    def get_form(self, request: HttpRequest, obj: Ticket | None = None, change: bool = False, **kwargs: Any):
        form = super().get_form(request, obj, change=change, **kwargs)
        refusal = getattr(request, _REFUSAL_ATTR, None)
        if refusal:
            form = type(form.__name__, (form,), {"service_errors": refusal})
        return form

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        results, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        try:
            ticket_id = uuid.UUID(search_term.strip())
        except ValueError:
            return results, may_have_duplicates
        return results | queryset.filter(pk=ticket_id), may_have_duplicates

    # -- the change page -----------------------------------------------------------

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Ticket | None = None,
    ) -> HttpResponse:
        if obj is not None and not add:
            if context["adminform"].form.errors:
                # Validating the refused submission copied the person's input onto `obj` (a ModelForm
                # builds its instance in place); the heading, breadcrumbs and title name the ticket as
                # stored, while the fields keep what was typed.
                stored = Ticket.objects.filter(pk=obj.pk).first()
                if stored is not None:
                    context.update(subtitle=str(stored), original=stored)
            context.update(self._events_context(request, obj))
            if obj.is_reserved:
                context["reserved_notice"] = (
                    f"Reserved by order {obj.order_id}: this ticket cannot be edited while the order holds it. "
                    "It becomes editable again when the order is cancelled."
                )
                context.update(show_save=False, show_save_and_continue=False, show_save_and_add_another=False)
        return super().render_change_form(request, context, add=add, change=change, form_url=form_url, obj=obj)

    def _events_context(self, request: HttpRequest, ticket: Ticket) -> dict[str, Any]:
        limit = 50
        events = list(
            outbox_events_for_aggregate(aggregate_type=TICKET_AGGREGATE, aggregate_id=str(ticket.pk), limit=limit)
        )
        linked = request.user.has_perm("outbox.view_outboxevent") or request.user.has_perm("outbox.change_outboxevent")
        rows = [
            {
                "event": event,
                "badge": status_badge(event),
                "url": reverse("admin:outbox_outboxevent_change", args=[quote(event.pk)]) if linked else "",
            }
            for event in events
        ]
        query = urlencode({"aggregate_type": TICKET_AGGREGATE, "q": str(ticket.pk)})
        return {
            "outbox_event_rows": rows,
            "outbox_events_truncated": len(events) >= limit,
            "outbox_events_url": f"{reverse('admin:outbox_outboxevent_changelist')}?{query}" if linked else "",
        }

    # -- saving through the services -----------------------------------------------

    def changeform_view(
        self,
        request: HttpRequest,
        object_id: str | None = None,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except ServiceRefused as refused:
            # The admin's transaction has been rolled back: nothing was written. Validate the same
            # submission once more with the service's reasons attached, so they are shown as form
            # errors next to the person's input (the form is invalid whenever it carries them).
            setattr(request, _REFUSAL_ATTR, refused.errors)
            return super().changeform_view(request, object_id, form_url, extra_context)

    def save_model(self, request: HttpRequest, obj: Ticket, form: TicketAdminForm, change: bool) -> None:
        fields = {name: form.cleaned_data[name] for name in EDITABLE_FIELDS if name in form.cleaned_data}
        try:
            if change:
                before = obj.version
                ticket = ticket_update(
                    ticket_id=obj.pk, expected_version=form.cleaned_data["expected_version"], **fields
                )
            else:
                before = None
                ticket = ticket_create(**fields)
        except TicketConflict as exc:
            raise ServiceRefused({None: [conflict_message(expected=exc.expected, actual=exc.actual)]}) from exc
        except TicketReserved as exc:
            raise ServiceRefused({None: [reserved_message(order_id=exc.order_id)]}) from exc
        except TicketInvalid as exc:
            raise ServiceRefused(dict(exc.errors)) from exc
        except TicketNotFound as exc:
            raise ServiceRefused({None: ["This ticket no longer exists. Nothing was saved."]}) from exc
        # The admin goes on with `obj` (log entry, redirect): make it the ticket as stored.
        for field in Ticket._meta.concrete_fields:
            setattr(obj, field.attname, getattr(ticket, field.attname))
        obj._state.adding = False
        obj._state.db = ticket._state.db
        self._report_event(request, ticket, before)

    def save_related(self, request: HttpRequest, form: TicketAdminForm, formsets: Any, change: bool) -> None:
        # A ticket has no relations to save; form.save_m2m() would be a save outside the services.
        return None

    def _report_event(self, request: HttpRequest, ticket: Ticket, before: int | None) -> None:
        if before is None:
            text = f"Created at version {ticket.version}; its ticket:created event is in the outbox."
        elif ticket.version == before:
            text = f"No field changed, so no event was written (still version {ticket.version})."
        else:
            text = f"Saved as version {ticket.version}; its ticket:updated event is in the outbox."
        self.message_user(request, text, messages.INFO)
