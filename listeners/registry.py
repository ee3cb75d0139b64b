"""Finds listeners by subject."""

from __future__ import annotations

from importlib import import_module

from django.utils.module_loading import autodiscover_modules

from listeners.base import Listener
from listeners.conf import listeners_settings
from listeners.errors import ListenerConfigurationError, UnknownListenerSubject
from outbox.contracts import load_contract_modules
from outbox.contracts import registry as contracts

_listeners: list[type[Listener]] = []


def listener(cls: type[Listener]) -> type[Listener]:
    """Class decorator: make a Listener runnable with ``manage.py listen``."""
    if not cls.subjects:
        raise ValueError(f"{cls.__name__} declares no subjects")
    if not cls.group:
        raise ValueError(f"{cls.__name__} declares no group")
    for name in cls.subjects:
        contracts.get(name)  # an unknown event name is a programming error: fail at import
    if cls not in _listeners:
        _listeners.append(cls)
    return cls


def unregister(cls: type[Listener]) -> None:
    """Forget a listener (tests that register one of their own, plugins being unloaded)."""
    if cls in _listeners:
        _listeners.remove(cls)


#: The module of an installed app that autodiscovery imports for its listeners.
HANDLERS_MODULE_NAME = "handlers"


def autodiscover() -> None:
    """Import the modules that register listeners: ``LISTENERS['HANDLER_MODULES']`` when it is set,
    otherwise the ``handlers`` module of every installed app that has one. Contracts first: a
    listener names its subjects, which must be registered when it is."""
    load_contract_modules()
    try:
        modules = listeners_settings().HANDLER_MODULES
    except ListenerConfigurationError:
        return  # the system checks (listeners.E001/E003) say what is wrong, in one sentence
    if modules is None:
        autodiscover_modules(HANDLERS_MODULE_NAME)
        return
    for module in modules:
        import_module(module)


def all_listeners() -> list[type[Listener]]:
    return list(_listeners)


def known_subjects() -> list[str]:
    return sorted({s for cls in _listeners for s in cls.subjects})


def listeners_for(subjects: list[str], *, group: str | None = None) -> list[type[Listener]]:
    """The listeners that handle the given subjects (optionally of one group)."""
    unknown = [s for s in subjects if s not in known_subjects()]
    if unknown:
        raise UnknownListenerSubject(
            f"no listener for {', '.join(unknown)}; known subjects: {', '.join(known_subjects()) or 'none'}"
        )
    chosen = [cls for cls in _listeners if set(cls.subjects) & set(subjects) and (group is None or cls.group == group)]
    if not chosen:
        groups = sorted({cls.group for cls in _listeners if set(cls.subjects) & set(subjects)})
        raise UnknownListenerSubject(f"no listener of group {group!r} for these subjects; groups: {', '.join(groups)}")
    return chosen
