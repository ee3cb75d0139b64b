"""The ticket admin's form: validation only. Writes happen in ticketing.services.

The form checks what a person typed (the model's own limits: a title of at most
200 characters, a price of at most 2 decimal places that is not negative) and,
on an edit, whether the ticket is still the one the page showed: the version the
page was rendered with travels in the hidden ``expected_version`` field. A stale
or reserved ticket is refused here, with the person's input kept on the page.
The service checks the same things again under its row lock, so a change that
slips in after this validation is still refused (see TicketAdmin.save_model).
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.exceptions import NON_FIELD_ERRORS
from django.db import connection

from ticketing.models import Ticket


def conflict_message(*, expected: int, actual: int) -> str:
    return (
        f"This ticket was changed by someone else after you opened this page: you edited version {expected}, "
        f"it is now at version {actual}. Nothing was saved. Reload the page to see the current values, "
        "then apply your change again."
    )


def reserved_message(*, order_id: str) -> str:
    return (
        f"This ticket is reserved by order {order_id} and cannot be edited while the order holds it. Nothing was saved."
    )


MISSING_VERSION_MESSAGE = (
    "The version this page was opened at is missing or malformed, so the edit cannot be checked against "
    "concurrent changes. Nothing was saved. Reload the page and apply your change again."
)


class TicketAdminForm(forms.ModelForm):
    #: The ticket's version when the page was rendered; an edit of any other version is refused.
    expected_version = forms.IntegerField(widget=forms.HiddenInput, min_value=0, required=False)

    #: Errors the service raised on an earlier attempt to save this same submission
    #: (TicketAdmin re-validates the submission with them; see TicketAdmin.changeform_view).
    service_errors: dict[str | None, list[str]] | None = None

    class Meta:
        model = Ticket
        fields = ["title", "price", "user_id"]
        help_texts = {"price": "Not negative, at most 2 decimal places."}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.editing = not self.instance._state.adding
        field = self.fields["expected_version"]
        field.required = self.editing
        if self.editing:
            field.initial = self.instance.version

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if self.editing:
            self._check_still_editable(cleaned)
        for name, messages in (self.service_errors or {}).items():
            target = name if name in self.fields else None
            for message in messages:
                text = message if target or name is None else f"{name}: {message}"
                if text not in self.errors.get(target or NON_FIELD_ERRORS, []):
                    self.add_error(target, text)
        return cleaned

    def _check_still_editable(self, cleaned: dict[str, Any]) -> None:
        if self.has_error("expected_version") or cleaned.get("expected_version") is None:
            self.add_error(None, MISSING_VERSION_MESSAGE)
            return
        current = self._current()
        if current is None:
            self.add_error(None, "This ticket no longer exists. Nothing was saved.")
            return
        expected = cleaned["expected_version"]
        if current.order_id:
            # Reserved wins over stale: no edit of this ticket can succeed until the order lets go.
            self.add_error(None, reserved_message(order_id=current.order_id))
        elif current.version != expected:
            self.add_error(
                None,
                conflict_message(expected=expected, actual=current.version)
                + f" It now reads: title “{current.title}”, price {current.price}, user id {current.user_id}.",
            )

    def _current(self) -> Ticket | None:
        """The ticket as stored now. Inside the admin's transaction the row stays locked until the
        save has run, so the version checked here is the version the service will see."""
        queryset = Ticket.objects.filter(pk=self.instance.pk)
        if connection.in_atomic_block:
            queryset = queryset.select_for_update()
        return queryset.only("version", "order_id", "title", "price", "user_id").first()
