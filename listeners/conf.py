"""The ``LISTENERS`` settings dict, read through one frozen object with documented defaults.

Read a value with ``listeners_settings().OPEN_PULL``. Unknown keys and values of the
wrong type are an error (system checks ``listeners.E001``/``E003``), so that a typo never
silently keeps a default.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from django.conf import settings

from listeners.errors import ListenerConfigurationError


@dataclass(frozen=True)
class ListenersSettings:
    #: Modules imported at start-up that register listeners (``@listener``). None (the default):
    #: the ``handlers`` module of every installed app that has one (``myapp/handlers.py``).
    HANDLER_MODULES: tuple[str, ...] | None = None
    #: Keep pull requests open on each durable so messages arrive while a batch is applied
    #: (needs nats-py internals, checked when a consumer is bound). False pulls with the
    #: public ``PullSubscription.fetch()``: one round trip per batch, nothing prefetched.
    OPEN_PULL: bool = True


KNOWN_KEYS = frozenset(f.name for f in fields(ListenersSettings))


def _raw() -> dict[str, Any]:
    return dict(getattr(settings, "LISTENERS", {}) or {})


def unknown_keys() -> list[str]:
    return sorted(set(_raw()) - KNOWN_KEYS)


def settings_problems() -> list[str]:
    """One sentence per malformed value (unknown keys apart)."""
    raw = _raw()
    problems = []
    modules = raw.get("HANDLER_MODULES")
    if modules is not None and (not isinstance(modules, list | tuple) or not all(isinstance(m, str) for m in modules)):
        problems.append("LISTENERS['HANDLER_MODULES'] must be a list of module names (or None: autodiscover).")
    if not isinstance(raw.get("OPEN_PULL", True), bool):
        problems.append("LISTENERS['OPEN_PULL'] must be True or False.")
    return problems


def listeners_settings() -> ListenersSettings:
    """The ``LISTENERS`` setting, checked; raises :class:`ListenerConfigurationError` with one sentence."""
    bad = unknown_keys()
    if bad:
        raise ListenerConfigurationError(
            f"Unknown LISTENERS setting(s): {', '.join(bad)}. Known: {', '.join(sorted(KNOWN_KEYS))}."
        )
    problems = settings_problems()
    if problems:
        raise ListenerConfigurationError(" ".join(problems))
    raw = _raw()
    if raw.get("HANDLER_MODULES") is not None:
        raw["HANDLER_MODULES"] = tuple(raw["HANDLER_MODULES"])
    return ListenersSettings(**raw)
