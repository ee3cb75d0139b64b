"""System checks of the LISTENERS setting (ids listeners.E001...)."""

from __future__ import annotations

from importlib.util import find_spec

from django.conf import settings
from django.core.checks import Error, register

KNOWN_KEYS = {"HANDLER_MODULES"}


@register()
def check_listeners_settings(app_configs=None, **kwargs):  # noqa: ARG001
    raw = getattr(settings, "LISTENERS", {}) or {}
    errors = []
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        errors.append(Error(f"Unknown LISTENERS setting(s): {', '.join(unknown)}.", id="listeners.E001"))
    for module in raw.get("HANDLER_MODULES") or []:
        if find_spec(module) is None:
            errors.append(
                Error(f"LISTENERS['HANDLER_MODULES'] names {module!r}, which cannot be imported.", id="listeners.E002")
            )
    return errors
