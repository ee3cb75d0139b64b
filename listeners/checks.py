"""System checks of the LISTENERS setting (ids listeners.E001...)."""

from __future__ import annotations

from importlib.util import find_spec

from django.core.checks import Error, register

from listeners.conf import listeners_settings, settings_problems, unknown_keys


@register()
def check_listeners_settings(app_configs=None, **kwargs):
    unknown = unknown_keys()
    if unknown:
        return [
            Error(
                f"Unknown LISTENERS setting(s): {', '.join(unknown)}.",
                hint="See listeners/conf.py.",
                id="listeners.E001",
            )
        ]
    problems = settings_problems()
    if problems:
        return [Error(problem, id="listeners.E003") for problem in problems]
    errors = []
    for module in listeners_settings().HANDLER_MODULES or ():
        if find_spec(module) is None:
            errors.append(
                Error(f"LISTENERS['HANDLER_MODULES'] names {module!r}, which cannot be imported.", id="listeners.E002")
            )
    return errors
