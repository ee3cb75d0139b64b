"""Admin of the outbox table.

Rows are read-only here: the relay owns their state, and an operator acts on them
only through the actions, each of which calls a service (``outbox.services``).
The changelist stays cheap on a table of millions of rows: ordered by the
indexed ``seq``, no full-table count, no facet counts, filter choices taken from
the contract registry instead of ``SELECT DISTINCT``, exact-match search only,
and the JSON columns deferred until a single row is opened. The status summary
at the top comes from :func:`outbox.selectors.outbox_backlog`, which reads the
partial indexes of unfinished rows, and :func:`outbox.selectors.outbox_relays`
(the relays draining, from ``pg_locks``; in lease mode the leased rows).

:func:`badge` and :class:`ReadOnlyAdminMixin` are shared with the listeners' admin.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString
from django.utils.translation import ngettext

from outbox.contracts import registry
from outbox.errors import OutboxError
from outbox.models import OutboxEvent, OutboxStatus
from outbox.selectors import outbox_backlog, outbox_relays
from outbox.services import outbox_relay_batch, outbox_requeue, outbox_retry_now

#: Badge backgrounds: the admin's own message colours, so the dark theme follows.
TONES = {
    "success": "var(--message-success-bg)",
    "warning": "var(--message-warning-bg)",
    "error": "var(--message-error-bg)",
    "info": "var(--darkened-bg)",
}
STATUS_TONES: dict[str, str] = {
    OutboxStatus.PENDING: "warning",
    OutboxStatus.PUBLISHED: "success",
    OutboxStatus.DEAD: "error",
}


def badge(label: str, tone: str) -> SafeString:
    """A small coloured label for a status column."""
    return format_html(
        '<span class="status-badge status-{}" style="display:inline-block;padding:1px 8px;border-radius:8px;'
        'font-size:0.85em;font-weight:600;white-space:nowrap;color:var(--body-fg);background:{}">{}</span>',
        tone,
        TONES.get(tone, TONES["info"]),
        label,
    )


def status_badge(event: OutboxEvent) -> SafeString:
    """The event's status; a pending row a relay holds right now shows as in flight."""
    label = event.get_status_display()
    if event.status == OutboxStatus.PENDING and event.lease_until and event.lease_until > timezone.now():
        label = "In flight"
    return badge(label, STATUS_TONES.get(event.status, "info"))


def pretty_json(value: Any) -> SafeString:
    return format_html(
        '<pre style="margin:0;white-space:pre-wrap;overflow-wrap:anywhere;max-height:40em;overflow:auto">{}</pre>',
        json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str),
    )


class ReadOnlyAdminMixin:
    """View-only pages: rows are written by the system, never through a form."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class SubjectFilter(admin.SimpleListFilter):
    """Subjects from the contract registry: no ``SELECT DISTINCT`` over the whole table."""

    title = "subject"
    parameter_name = "subject"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(name, name) for name in registry.names()]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.filter(subject=self.value()) if self.value() else queryset


class AggregateTypeFilter(admin.SimpleListFilter):
    title = "aggregate type"
    parameter_name = "aggregate_type"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(name, name) for name in sorted({item.aggregate for item in registry.all()})]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        return queryset.filter(aggregate_type=self.value()) if self.value() else queryset


class OutboxChangeList(ChangeList):
    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet:
        # The list shows none of the JSON or error text; a row's page loads them.
        return super().get_queryset(request, exclude_parameters).defer("payload", "headers", "last_error")


@admin.register(OutboxEvent)
class OutboxEventAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Outbox rows: view, filter, search, and the three operator actions."""

    list_display = (
        "seq",
        "subject",
        "aggregate_short",
        "status_badge",
        "attempts",
        "created_at",
        "published_at",
    )
    list_display_links = ("seq", "subject")
    list_filter = ("status", SubjectFilter, AggregateTypeFilter)
    search_fields = ("=id", "=aggregate_id")
    search_help_text = "An event id (exact UUID) or an aggregate id (exact)."
    ordering = ("-seq",)
    list_per_page = 100
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    actions = ("requeue_dead", "retry_now", "publish_now")
    fieldsets = (
        (None, {"fields": ("id", "seq", "subject", "status_badge", "aggregate", "aggregate_version", "created_at")}),
        (
            "Delivery",
            {
                "fields": (
                    "attempts",
                    "next_attempt_at",
                    "lease",
                    "last_error",
                    "published_at",
                    "stream",
                    "stream_sequence",
                )
            },
        ),
        ("Message", {"fields": ("payload_pretty", "headers_pretty")}),
    )

    # -- columns -------------------------------------------------------------------

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: OutboxEvent) -> SafeString:
        return status_badge(obj)

    @admin.display(description="aggregate")
    def aggregate(self, obj: OutboxEvent) -> str:
        return f"{obj.aggregate_type}:{obj.aggregate_id}"

    @admin.display(description="aggregate", ordering="aggregate_id")
    def aggregate_short(self, obj: OutboxEvent) -> SafeString:
        """A long id (a UUID) shortened to stay on one line; the whole of it in the tooltip."""
        ident = obj.aggregate_id
        short = ident if len(ident) <= 13 else f"{ident[:8]}…"
        return format_html(
            '<span title="{}:{}" style="white-space:nowrap">{}:{}</span>',
            obj.aggregate_type,
            ident,
            obj.aggregate_type,
            short,
        )

    @admin.display(description="lease")
    def lease(self, obj: OutboxEvent) -> str:
        if not obj.lease_until:
            return "—"
        state = "held" if obj.lease_until > timezone.now() else "expired"
        return f"{state} by {obj.lease_owner or '?'} until {obj.lease_until:%Y-%m-%d %H:%M:%S %Z}"

    @admin.display(description="payload")
    def payload_pretty(self, obj: OutboxEvent) -> SafeString:
        return pretty_json(obj.payload)

    @admin.display(description="headers")
    def headers_pretty(self, obj: OutboxEvent) -> SafeString:
        return pretty_json(obj.headers)

    # -- queries -------------------------------------------------------------------

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return OutboxChangeList

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        """Exact matches only, each served by an index: the primary key or the aggregate id."""
        term = search_term.strip()
        if not term:
            return queryset, False
        condition = Q(aggregate_id=term)
        try:
            condition |= Q(id=uuid.UUID(term))
        except ValueError:
            pass
        return queryset.filter(condition), False

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None):
        backlog = outbox_backlog()
        # With partitions nothing on a row says "in flight": the relays' locks say who is at work.
        relays = outbox_relays(pending=False)
        if relays.mode == "partitions":
            in_flight = relays.headline
        else:
            in_flight = f"{backlog.in_flight} in flight" if backlog.in_flight else ""
        oldest = backlog.oldest_pending_age
        summary: list[dict[str, Any]] = [
            {
                "label": "Pending",
                "count": backlog.pending,
                "tone": "warning" if backlog.pending else "info",
                "query": f"?status__exact={OutboxStatus.PENDING}",
                "note": in_flight,
            },
            {
                "label": "Dead",
                "count": backlog.dead,
                "tone": "error" if backlog.dead else "info",
                "query": f"?status__exact={OutboxStatus.DEAD}",
                "note": "need an operator" if backlog.dead else "",
            },
            {
                "label": "Published",
                "count": backlog.published_last_hour,
                "tone": "success",
                "query": f"?status__exact={OutboxStatus.PUBLISHED}",
                "note": f"in the last hour, {backlog.published_last_minute} in the last minute",
            },
        ]
        for item in summary:
            item["background"] = TONES[item["tone"]]
        context = {
            "outbox_summary": summary,
            "outbox_oldest_pending": f"{oldest:.0f} s" if oldest is not None else "",
            **(extra_context or {}),
        }
        return super().changelist_view(request, extra_context=context)

    # -- actions -------------------------------------------------------------------

    def has_operate_permission(self, request: HttpRequest) -> bool:
        """Actions change rows' delivery state: they need the model's change permission,
        even though no row is editable through a form."""
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")

    @admin.action(description="Requeue selected dead events", permissions=["operate"])
    def requeue_dead(self, request: HttpRequest, queryset: QuerySet) -> None:
        ids = list(queryset.values_list("id", flat=True))
        requeued = outbox_requeue(event_ids=ids)
        if requeued:
            self.message_user(
                request,
                ngettext(
                    "%(count)d dead event was requeued; the relay publishes it next.",
                    "%(count)d dead events were requeued; the relay publishes them next.",
                    requeued,
                )
                % {"count": requeued},
                messages.SUCCESS,
            )
        untouched = len(ids) - requeued
        if untouched:
            self.message_user(
                request,
                ngettext(
                    "%(count)d selected event was not dead and was left as it is.",
                    "%(count)d selected events were not dead and were left as they are.",
                    untouched,
                )
                % {"count": untouched},
                messages.WARNING,
            )

    @admin.action(description="Retry selected pending events now", permissions=["operate"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        ids = list(queryset.values_list("id", flat=True))
        due = outbox_retry_now(event_ids=ids)
        if due:
            self.message_user(
                request,
                ngettext(
                    "%(count)d pending event is due now; the relay was asked to publish it.",
                    "%(count)d pending events are due now; the relay was asked to publish them.",
                    due,
                )
                % {"count": due},
                messages.SUCCESS,
            )
        untouched = len(ids) - due
        if untouched:
            self.message_user(
                request,
                ngettext(
                    "%(count)d selected event was not pending and was left as it is.",
                    "%(count)d selected events were not pending and were left as they are.",
                    untouched,
                )
                % {"count": untouched},
                messages.WARNING,
            )

    @admin.action(description="Publish pending events now (one relay batch)", permissions=["operate"])
    def publish_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        """Runs one relay batch in this request over every due pending event (the selection
        only starts the action): the same claim -> publish -> mark as the relay process."""
        try:
            published = outbox_relay_batch()
        except OutboxError as exc:
            self.message_user(
                request,
                f"The relay batch failed: {exc}. No event was lost: they stay pending and are retried.",
                messages.ERROR,
            )
            return
        if published:
            self.message_user(
                request,
                ngettext(
                    "%(count)d event was published to JetStream.",
                    "%(count)d events were published to JetStream.",
                    published,
                )
                % {"count": published},
                messages.SUCCESS,
            )
            return
        pending = OutboxEvent.objects.filter(status=OutboxStatus.PENDING)
        if not pending.exists():
            self.message_user(request, "Nothing to publish: no event is pending.", messages.INFO)
            return
        # The service reports only what it published; a failed attempt left its reason on the row.
        failure = pending.exclude(last_error="").order_by("-next_attempt_at").values_list("last_error", flat=True)
        error = failure.first()
        if error:
            self.message_user(
                request,
                f"No event was published. The most recent failure: “{error}”. No event was lost: the events "
                "stay pending and are retried with backoff.",
                messages.ERROR,
            )
        else:
            self.message_user(
                request,
                "No event was published: the pending events are not due yet (backing off) or another relay "
                "holds them. “Retry selected pending events now” makes selected events due.",
                messages.WARNING,
            )
