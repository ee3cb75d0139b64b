"""Contract evolution: the snapshot check names every breaking change and lets additive ones through."""

from __future__ import annotations

import json

import pytest
from django.core.management import CommandError, call_command

from outbox.contracts import Contract, Event
from outbox.schema import additions, breaking_changes, contracts_snapshot


class Seat(Event, frozen=True):
    row: str
    number: int


class SeatWithTextNumber(Event, frozen=True):
    row: str
    number: str


class V1(Event, frozen=True):
    id: str
    version: int
    title: str
    price: float
    seat: Seat
    note: str | None = None


def snapshot(cls: type[Event], *, name: str = "show:updated", stream: str = "SHOWS") -> dict:
    return contracts_snapshot([Contract(name=name, type=cls, stream=stream, aggregate="show")])


def changes_to(cls: type[Event], **kwargs) -> list[str]:
    return breaking_changes(snapshot(V1), snapshot(cls, **kwargs))


def test_the_same_contract_has_no_breaking_change():
    assert changes_to(V1) == []


def test_a_removed_field_is_breaking():
    class Removed(Event, frozen=True):
        id: str
        version: int
        price: float
        seat: Seat
        note: str | None = None

    assert changes_to(Removed) == ["show:updated: field 'title' removed (or renamed)"]


def test_a_renamed_field_is_breaking():
    class Renamed(Event, frozen=True):
        id: str
        version: int
        name: str
        price: float
        seat: Seat
        note: str | None = None

    assert changes_to(Renamed) == [
        "show:updated: field 'title' removed (or renamed)",
        "show:updated: new required field 'name' without a default (events already in the stream lack it)",
    ]


def test_a_changed_type_is_breaking_also_inside_a_nested_object():
    class Retyped(Event, frozen=True):
        id: str
        version: int
        title: str
        price: str
        seat: SeatWithTextNumber
        note: str | None = None

    found = changes_to(Retyped)
    assert len(found) == 2, found
    assert found[0].startswith("show:updated: field 'price' changed type: ")
    assert '"type": "number"' in found[0] and '"type": "string"' in found[0]
    assert found[1].startswith("show:updated: field 'seat.number' changed type: ")


def test_a_new_required_field_without_a_default_is_breaking():
    class Required(Event, frozen=True):
        id: str
        version: int
        title: str
        price: float
        seat: Seat
        venue: str
        note: str | None = None

    assert changes_to(Required) == [
        "show:updated: new required field 'venue' without a default (events already in the stream lack it)"
    ]


def test_a_field_that_became_required_or_optional_is_breaking():
    class Stricter(Event, frozen=True):
        id: str
        version: int
        title: str
        price: float
        seat: Seat
        note: str | None

    class Looser(Event, frozen=True):
        id: str
        version: int
        price: float
        seat: Seat
        title: str = ""
        note: str | None = None

    assert changes_to(Stricter) == ["show:updated: field 'note' became required (events in the stream may lack it)"]
    assert changes_to(Looser) == ["show:updated: field 'title' is no longer required (old listeners expect it)"]


def test_a_subject_moved_to_another_stream_or_removed_is_breaking():
    assert changes_to(V1, stream="OTHER") == ["show:updated: moved from stream SHOWS to OTHER"]
    assert breaking_changes(snapshot(V1), {"version": 1, "subjects": {}}) == [
        "show:updated: subject removed (listeners of it would receive nothing)"
    ]


def test_additive_changes_pass_a_new_optional_field_and_a_new_subject():
    class Added(Event, frozen=True):
        id: str
        version: int
        title: str
        price: float
        seat: Seat
        note: str | None = None
        venue: str = "main hall"

    new = snapshot(Added)
    new["subjects"].update(snapshot(V1, name="show:created")["subjects"])
    assert breaking_changes(snapshot(V1), new) == []
    assert additions(snapshot(V1), new) == ["show:created: new subject", "show:updated: new optional field 'venue'"]


def test_the_example_snapshot_matches_the_registered_contracts(capsys):
    call_command("outbox_schema", "--check", "ticketing/contracts.json")
    assert "contracts match ticketing/contracts.json" in capsys.readouterr().out


def test_the_check_command_fails_naming_each_breaking_change(tmp_path, capsys):
    path = tmp_path / "contracts.json"
    call_command("outbox_schema", "--write", str(path))
    snap = json.loads(path.read_text())
    # The snapshot has a field the code no longer has, and lacks one the code requires.
    created = snap["subjects"]["ticket:created"]["schema"]
    created["properties"]["venue"] = {"type": "string"}
    created["required"].remove("title")
    del created["properties"]["title"]
    path.write_text(json.dumps(snap))
    with pytest.raises(CommandError, match=r"2 breaking change\(s\)"):
        call_command("outbox_schema", "--check", str(path))
    err = capsys.readouterr().err
    assert "BREAKING: ticket:created: field 'venue' removed (or renamed)" in err
    assert "BREAKING: ticket:created: new required field 'title' without a default" in err


def test_the_check_command_explains_a_missing_snapshot(tmp_path):
    with pytest.raises(CommandError, match=r"no snapshot at .*: create it with --write"):
        call_command("outbox_schema", "--check", str(tmp_path / "missing.json"))
