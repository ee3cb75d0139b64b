"""Snapshots of the registered contracts, and the breaking changes between two of them.

A snapshot is JSON: per subject, its stream and the JSON Schema of its data. It is
committed beside the code (``manage.py outbox_schema --write FILE``) and compared in CI
(``--check FILE``). A change is *breaking* when a listener built against the old snapshot
could fail on new events, or a listener built against the new one on events already in the
stream: a subject removed or moved to another stream, a field removed (a rename is a
removal), a field whose type or constraints changed, a new required field, or a field that
became required or optional. Adding an optional field (one with a default) is additive.
"""

from __future__ import annotations

import json
from typing import Any

from outbox.contracts import Contract, registry

SNAPSHOT_VERSION = 1
#: Keys of a field's schema that do not change what a reader accepts.
_COSMETIC = {"description", "title", "default", "examples", "$schema"}


def contracts_snapshot(items: list[Contract] | None = None) -> dict[str, Any]:
    """The contracts (by default every registered one) as a snapshot document."""
    return {
        "version": SNAPSHOT_VERSION,
        "subjects": {
            item.name: {"stream": item.stream, "aggregate": item.aggregate, "schema": item.json_schema()}
            for item in (registry.all() if items is None else items)
        },
    }


def snapshot_text(snapshot: dict[str, Any]) -> str:
    return json.dumps(snapshot, indent=2, sort_keys=True) + "\n"


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One sentence per breaking change from snapshot ``old`` to snapshot ``new``."""
    changes: list[str] = []
    old_subjects, new_subjects = old.get("subjects", {}), new.get("subjects", {})
    for name in sorted(old_subjects):
        if name not in new_subjects:
            changes.append(f"{name}: subject removed (listeners of it would receive nothing)")
            continue
        before, after = old_subjects[name], new_subjects[name]
        if before.get("stream") != after.get("stream"):
            changes.append(f"{name}: moved from stream {before.get('stream')} to {after.get('stream')}")
        changes.extend(_object_changes(name, "", before.get("schema", {}), after.get("schema", {})))
    return changes


def additions(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The additive changes (new subjects, new optional fields), for the report."""
    found = [f"{name}: new subject" for name in sorted(set(new.get("subjects", {})) - set(old.get("subjects", {})))]
    for name in sorted(set(new.get("subjects", {})) & set(old.get("subjects", {}))):
        before = old["subjects"][name].get("schema", {})
        after = new["subjects"][name].get("schema", {})
        added = set(after.get("properties", {})) - set(before.get("properties", {}))
        found.extend(
            f"{name}: new optional field {field!r}" for field in sorted(added) if field not in after.get("required", [])
        )
    return found


def _object_changes(subject: str, path: str, before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    changes: list[str] = []
    old_props, new_props = before.get("properties", {}), after.get("properties", {})
    old_req, new_req = set(before.get("required", [])), set(after.get("required", []))
    for field in sorted(old_props):
        where = f"{path}{field}"
        if field not in new_props:
            changes.append(f"{subject}: field {where!r} removed (or renamed)")
            continue
        a, b = old_props[field], new_props[field]
        if _is_object(a) and _is_object(b):
            changes.extend(_object_changes(subject, f"{where}.", a, b))
        elif _shape(a) != _shape(b):
            changes.append(f"{subject}: field {where!r} changed type: {_describe(a)} -> {_describe(b)}")
        if field in old_req and field not in new_req:
            changes.append(f"{subject}: field {where!r} is no longer required (old listeners expect it)")
        if field not in old_req and field in new_req:
            changes.append(f"{subject}: field {where!r} became required (events in the stream may lack it)")
    for field in sorted(set(new_props) - set(old_props)):
        if field in new_req:
            changes.append(
                f"{subject}: new required field {path}{field!r} without a default "
                "(events already in the stream lack it)"
            )
    return changes


def _is_object(node: dict[str, Any]) -> bool:
    return node.get("type") == "object" and "properties" in node


def _shape(node: Any) -> Any:
    """The schema without the keys that do not change what it accepts."""
    if isinstance(node, dict):
        return {k: _shape(v) for k, v in node.items() if k not in _COSMETIC}
    if isinstance(node, list):
        return [_shape(v) for v in node]
    return node


def _describe(node: dict[str, Any]) -> str:
    return json.dumps(_shape(node), sort_keys=True)
