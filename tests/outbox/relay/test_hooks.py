"""The relay's hook points: nothing runs by default; a registered hook sees the step's details."""

from __future__ import annotations

import pytest

from outbox.relay import Relay, hooks
from tests.helpers import insert_ticket_events

pytestmark = pytest.mark.django_db(transaction=True)


def test_hooks_see_each_claimed_batch_and_each_outcome_before_it_is_marked():
    insert_ticket_events(aggregates=3, per_aggregate=2)
    seen: list[tuple[str, int]] = []
    remove = [
        hooks.register(hooks.AFTER_CLAIM, lambda rows: seen.append(("claimed", len(rows)))),
        hooks.register(hooks.BEFORE_MARK, lambda result: seen.append(("published", len(result.published)))),
    ]
    try:
        assert Relay().run_batch().published == 6
    finally:
        for unregister in remove:
            unregister()
    assert seen == [("claimed", 6), ("published", 6)]
    insert_ticket_events(aggregates=1, per_aggregate=1)
    assert Relay().run_batch().published == 1
    assert len(seen) == 2, "an unregistered hook must not run again"


def test_an_unknown_hook_point_is_refused():
    with pytest.raises(ValueError, match="unknown relay hook point"):
        hooks.register("after-lunch", lambda **_: None)
