"""The LISTENERS setting is read through one checked object: typos and wrong types are errors, not defaults."""

from __future__ import annotations

import pytest
from django.test import override_settings

from listeners.checks import check_listeners_settings
from listeners.conf import ListenersSettings, listeners_settings
from listeners.errors import ListenerConfigurationError


def ids(errors) -> list[str]:
    return [e.id for e in errors]


def test_the_project_settings_pass_the_checks_and_autodiscover_the_handler_modules():
    assert check_listeners_settings() == []
    assert listeners_settings().HANDLER_MODULES is None
    assert listeners_settings().OPEN_PULL is True


def test_defaults_when_the_setting_is_absent():
    with override_settings(LISTENERS={}):
        assert listeners_settings() == ListenersSettings()


def test_an_unknown_key_is_a_system_check_error_and_refused_at_run_time():
    with override_settings(LISTENERS={"HANDLER_MODULES": [], "OPEN_PUL": False}):
        assert ids(check_listeners_settings()) == ["listeners.E001"]
        with pytest.raises(ListenerConfigurationError, match="Unknown LISTENERS setting.*OPEN_PUL"):
            listeners_settings()


@pytest.mark.parametrize("bad", [{"OPEN_PULL": "no"}, {"HANDLER_MODULES": "ticketing.handlers"}])
def test_a_value_of_the_wrong_type_is_a_system_check_error(bad):
    with override_settings(LISTENERS=bad):
        assert ids(check_listeners_settings()) == ["listeners.E003"]
        with pytest.raises(ListenerConfigurationError):
            listeners_settings()


def test_a_handler_module_that_cannot_be_imported_is_a_system_check_error():
    with override_settings(LISTENERS={"HANDLER_MODULES": ["listeners.no_such_module"]}):
        assert ids(check_listeners_settings()) == ["listeners.E002"]
