"""The JetStream transport's guard over nats-py internals: the installed release is one it was
verified on, pyproject.toml admits no other, and on it the wire path is really in use."""

from __future__ import annotations

import tomllib
from pathlib import Path
from types import SimpleNamespace

from packaging.requirements import Requirement

from outbox.broker import get_broker
from outbox.relay.transport import (
    VERIFIED_NATS_PY,
    JetStreamPublisher,
    nats_py_version,
    unverified_nats_py,
    wire_path_problem,
)

ROOT = Path(__file__).resolve().parents[3]


def test_the_installed_nats_py_is_one_the_relay_internals_were_verified_on():
    assert unverified_nats_py() == "", (
        f"{unverified_nats_py()}. The relay's wire path now falls back to nats-py's public API (about "
        "twice the CPU). Check every internal listed in outbox/relay/transport.py against nats-py "
        f"{nats_py_version()}, then add it to VERIFIED_NATS_PY and to the bound in pyproject.toml."
    )


def test_pyproject_admits_only_nats_py_releases_the_guard_knows():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (nats_py,) = [Requirement(d) for d in dependencies if Requirement(d).name == "nats-py"]
    assert any(spec.operator in {"<", "<=", "=="} for spec in nats_py.specifier), "nats-py needs an upper bound"
    assert all(nats_py.specifier.contains(v) for v in VERIFIED_NATS_PY)
    newest = max(VERIFIED_NATS_PY, key=lambda v: tuple(int(p) for p in v.split(".")))
    major, minor, _ = (int(p) for p in newest.split("."))
    assert not nats_py.specifier.contains(f"{major}.{minor + 1}.0"), "the bound admits an unverified minor release"


def test_the_wire_path_is_in_use_with_the_installed_nats_py():
    broker = get_broker()

    async def wire(nc) -> bool:
        return (await JetStreamPublisher.for_client(nc)).wire

    assert broker.result(broker.submit_client(wire), timeout=30) is True


def test_a_missing_internal_turns_the_wire_path_off_and_says_which():
    client = SimpleNamespace(_pending=[], _pending_data_size=0)  # no _flush_pending, no _process_msg
    assert "_flush_pending" in wire_path_problem(client, SimpleNamespace(_id=1))
