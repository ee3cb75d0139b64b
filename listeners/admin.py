"""Admin of the listeners' bookkeeping: dead letters and the inbox.

A dead letter is the one row an operator works on: its payload is editable text
(the bytes received stay as they were, for the record), and "Replay" applies the
payload through its listener with :func:`listeners.replay.dead_letter_replay`,
exactly once, recording the inbox row as a live delivery would. The inbox is
written only by listeners and is read-only here.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.utils.html import format_html
from django.utils.text import Truncator
from django.utils.translation import ngettext

from listeners.delivery import ACK
from listeners.errors import ListenerError
from listeners.models import DeadLetter, DeadLetterStatus, InboxEntry
from listeners.plan import plan_consumers
from listeners.registry import all_listeners
from listeners.replay import dead_letter_replay
from listeners.services import dead_letter_edit_payload
from outbox.admin import ReadOnlyAdminMixin, badge, pretty_json
from outbox.contracts import registry
from outbox.errors import InvalidPayloadError, UnknownSubjectError

DEAD_LETTER_TONES: dict[str, str] = {DeadLetterStatus.DEAD: "error", DeadLetterStatus.REPLAYED: "success"}
#: Failures listed one by one in the replay report; the rest are counted.
REPORTED_FAILURES = 10


class DeadLetterForm(forms.ModelForm):
    class Meta:
        model = DeadLetter
        fields = ["payload"]
        widgets = {
            "payload": forms.Textarea(
                attrs={"rows": 14, "spellcheck": "false", "style": "font-family: monospace; width: 100%"}
            )
        }
        help_texts = {
            "payload": "The message body as JSON. Correct it, then “Save and replay”; a changed payload is "
            "checked against the subject's contract before it is saved."
        }

    def clean_payload(self) -> str:
        payload = self.cleaned_data["payload"]
        if "payload" not in self.changed_data:
            return payload
        try:
            contract = registry.get(self.instance.subject)
        except UnknownSubjectError:
            return payload  # nothing to check it against; the replay reports what it finds
        try:
            contract.decode(payload)
        except InvalidPayloadError as exc:
            raise forms.ValidationError(f"Still not a valid {contract.name} payload: {exc}") from exc
        return payload


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
    """Dead letters: inspect, correct the payload, replay."""

    form = DeadLetterForm
    list_display = (
        "created_at",
        "consumer",
        "subject",
        "stream_sequence",
        "deliveries",
        "status_badge",
        "short_error",
    )
    list_display_links = ("created_at", "subject")
    show_facets = admin.ShowFacets.NEVER
    list_filter = ("status", "consumer", "subject")
    search_fields = ("=event_id",)
    search_help_text = "An event id (exact)."
    ordering = ("-created_at",)
    list_per_page = 100
    show_full_result_count = False
    actions = ("replay",)
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "status_badge",
                    "consumer",
                    "subject",
                    "event_id",
                    "stream",
                    "stream_sequence",
                    "deliveries",
                    "created_at",
                    "replayed_at",
                )
            },
        ),
        ("Why", {"fields": ("error_text",)}),
        ("Message", {"fields": ("payload", "raw_received", "headers_pretty")}),
    )
    _DISPLAY_FIELDS = (
        "status_badge",
        "consumer",
        "subject",
        "event_id",
        "stream",
        "stream_sequence",
        "deliveries",
        "created_at",
        "replayed_at",
        "error_text",
        "raw_received",
        "headers_pretty",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # listeners write dead letters

    def get_readonly_fields(self, request: HttpRequest, obj: DeadLetter | None = None) -> tuple[str, ...]:
        if obj is not None and obj.status != DeadLetterStatus.DEAD:
            return (*self._DISPLAY_FIELDS, "payload")  # replayed: the record of what was applied
        return self._DISPLAY_FIELDS

    # -- columns -------------------------------------------------------------------

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: DeadLetter) -> str:
        return badge(obj.get_status_display(), DEAD_LETTER_TONES.get(obj.status, "info"))

    @admin.display(description="error")
    def short_error(self, obj: DeadLetter) -> str:
        return format_html(
            '<span title="{}" style="display:inline-block;min-width:16em">{}</span>',
            Truncator(obj.error).chars(500),
            Truncator(obj.error).chars(80),
        )

    @admin.display(description="error")
    def error_text(self, obj: DeadLetter) -> str:
        return _pre(obj.error)

    @admin.display(description="bytes received")
    def raw_received(self, obj: DeadLetter) -> str:
        raw = bytes(obj.raw or b"")
        text = raw.decode("utf-8", errors="replace")
        note = "" if text == obj.payload else " — the payload above was edited since"
        return _pre(text, caption=f"{len(raw)} bytes, not editable{note}")

    @admin.display(description="headers")
    def headers_pretty(self, obj: DeadLetter) -> str:
        return pretty_json(obj.headers)

    # -- saving the corrected payload ----------------------------------------------

    def save_model(self, request: HttpRequest, obj: DeadLetter, form: DeadLetterForm, change: bool) -> None:
        # Only the payload is the operator's to change; status and the record stay the listener's.
        if "payload" in form.changed_data:
            try:
                dead_letter_edit_payload(dead_letter_id=obj.pk, payload=obj.payload)
            except ListenerError as exc:
                self.message_user(request, str(exc), messages.ERROR)

    def response_change(self, request: HttpRequest, obj: DeadLetter) -> HttpResponse:
        if "_replay" in request.POST:
            self._replay(request, [obj.pk])
            return HttpResponseRedirect(request.path)
        return super().response_change(request, obj)

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: DeadLetter | None = None,
    ) -> HttpResponse:
        context["can_replay"] = (
            obj is not None and obj.status == DeadLetterStatus.DEAD and self.has_replay_permission(request)
        )
        return super().render_change_form(request, context, add=add, change=change, form_url=form_url, obj=obj)

    # -- replay ----------------------------------------------------------------------

    def has_replay_permission(self, request: HttpRequest) -> bool:
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")

    @admin.action(description="Replay selected dead letters", permissions=["replay"])
    def replay(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._replay(request, list(queryset.order_by("created_at", "pk").values_list("pk", flat=True)))

    def _replay(self, request: HttpRequest, ids: list[int]) -> None:
        applied: dict[str, int] = {}
        failures: list[str] = []
        skipped = 0
        for pk in ids:
            try:
                decision = dead_letter_replay(dead_letter_id=pk)
            except DeadLetter.DoesNotExist:
                failures.append(f"#{pk}: no longer exists")
                continue
            if decision.outcome == "already-replayed":
                skipped += 1
            elif decision.action == ACK:
                applied[decision.outcome] = applied.get(decision.outcome, 0) + 1
            else:
                detail = f": {decision.error}" if decision.error else ""
                failures.append(f"#{pk} {decision.outcome}{detail}")
        done = sum(applied.values())
        if done:
            outcomes = ", ".join(f"{name} {count}" for name, count in sorted(applied.items()))
            self.message_user(
                request,
                ngettext(
                    "%(count)d dead letter was replayed (%(outcomes)s).",
                    "%(count)d dead letters were replayed (%(outcomes)s).",
                    done,
                )
                % {"count": done, "outcomes": outcomes},
                messages.SUCCESS,
            )
        if skipped:
            self.message_user(
                request,
                ngettext(
                    "%(count)d selected letter had already been replayed and was left as it is.",
                    "%(count)d selected letters had already been replayed and were left as they are.",
                    skipped,
                )
                % {"count": skipped},
                messages.WARNING,
            )
        if failures:
            listed = "; ".join(failures[:REPORTED_FAILURES])
            more = len(failures) - REPORTED_FAILURES
            self.message_user(
                request,
                ngettext(
                    "%(count)d dead letter could not be applied and stays dead: %(list)s",
                    "%(count)d dead letters could not be applied and stay dead: %(list)s",
                    len(failures),
                )
                % {"count": len(failures), "list": listed + (f"; and {more} more" if more > 0 else "")},
                messages.ERROR,
            )


def _pre(text: str, *, caption: str = "") -> str:
    body = format_html(
        '<pre style="margin:0;white-space:pre-wrap;overflow-wrap:anywhere;max-height:30em;overflow:auto">{}</pre>',
        text,
    )
    if caption:
        return format_html('{}<div class="help">{}</div>', body, caption)
    return body


# --- inbox filters -----------------------------------------------------------------------
# The inbox grows by one row per event and consumer. Django's field filters list their choices
# with SELECT DISTINCT over the whole table on every changelist page; these take them from what
# the code knows instead, and filter with an equality an index of the table serves.


def planned_durables() -> list[str]:
    """The durable names the registered listeners use by default: all their subjects, or each one alone.

    Pure (no NATS): the streams are assumed to take what the contract registry gives them,
    with and without multi-subject filters. A consumer named with ``listen --durable`` is not
    listed; the changelist's search and the URL (``?consumer=NAME``) still find its rows.
    """
    classes = all_listeners()
    names: set[str] = set()
    wanted = [sorted({s for c in classes for s in c.subjects})] + [[s] for c in classes for s in c.subjects]
    for requested in wanted:
        for multi in (True, False):
            names |= {p.durable for p in plan_consumers(classes, requested=requested, multi_filter=multi)}
    return sorted(names)


class _ExactFilter(admin.SimpleListFilter):
    """A filter on one column by equality, its choices from :meth:`values` (never from the table)."""

    field: str

    def values(self) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        chosen = self.value()
        values = self.values()
        if chosen and chosen not in values:
            values = [*values, chosen]  # a value given in the URL stays visible and removable
        return [(value, value) for value in values]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        return queryset.filter(**{self.field: value}) if value else queryset


class InboxConsumerFilter(_ExactFilter):
    title = "consumer"
    parameter_name = field = "consumer"

    def values(self) -> list[str]:
        return planned_durables()


class InboxSubjectFilter(_ExactFilter):
    title = "subject"
    parameter_name = field = "subject"

    def values(self) -> list[str]:
        return sorted(registry.names())


#: Outcome words the framework and the replica listeners record; a handler's own words are
#: found through the URL (``?outcome=WORD``).
INBOX_OUTCOMES = ("applied", "stale", "ignored")


class InboxOutcomeFilter(_ExactFilter):
    title = "outcome"
    parameter_name = field = "outcome"

    def values(self) -> list[str]:
        return list(INBOX_OUTCOMES)


class CappedCountPaginator(Paginator):
    """Counts at most :attr:`cap` rows: ``COUNT(*)`` over a ``LIMIT`` subquery, whatever the table's size.

    The changelist counts the filtered rows for its pages; on an inbox of millions an exact
    count reads them all. Past the cap the list shows the cap as its count (and as many pages).
    """

    cap = 10_000

    @property
    def count(self) -> int:
        return self.object_list[: self.cap].count()  # type: ignore[attr-defined]  # a QuerySet here


@admin.register(InboxEntry)
class InboxEntryAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """What each consumer applied, once per event; filters and ordering served by the table's indexes."""

    list_display = ("processed_at", "consumer", "subject", "event_id", "stream_sequence", "outcome")
    list_filter = (InboxConsumerFilter, InboxSubjectFilter, InboxOutcomeFilter)
    paginator = CappedCountPaginator
    search_fields = ("=event_id",)
    search_help_text = "An event id (exact)."
    ordering = ("-processed_at",)
    list_per_page = 100
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
