"""A steady stream of ticket writes for the fault suite: ``python -m tests.faults.load``.

Creates TICKETS tickets, then makes UPDATES updates at about RATE per second, each with
the version it read (optimistic concurrency). Database errors (the suite terminates
connections) are retried: a write either committed with its event or not at all.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ticketing.settings")
os.environ.setdefault("DJANGO_DEV", "1")

import django

django.setup()

from django.db import OperationalError, close_old_connections, connection  # noqa: E402
from django.db.utils import InterfaceError  # noqa: E402

from ticketing.errors import TicketConflict  # noqa: E402
from ticketing.models import Ticket  # noqa: E402
from ticketing.services import ticket_create, ticket_update  # noqa: E402


def retrying(fn, *args, **kwargs):
    for attempt in range(200):
        try:
            return fn(*args, **kwargs)
        except (OperationalError, InterfaceError):
            close_old_connections()
            time.sleep(min(0.05 * (attempt + 1), 1.0))
    raise RuntimeError("the database stayed unreachable")


def write(ids: list, updates: int, rate: float, seed: int, until: float) -> int:
    """``updates`` ticket updates at about ``rate`` per second, on this thread's connection, or as
    many as it manages before the monotonic time ``until``."""
    rng = random.Random(seed)
    started = time.monotonic()
    done = 0
    try:
        while done < updates and time.monotonic() < until:
            ticket_id = rng.choice(ids)
            try:
                current = retrying(lambda tid=ticket_id: Ticket.objects.get(pk=tid))
                retrying(
                    ticket_update,
                    ticket_id=ticket_id,
                    expected_version=current.version,
                    price=f"{rng.randint(1, 500)}.{rng.randint(0, 99):02d}",
                    title=f"ticket {ticket_id.hex[:6]} rev {current.version + 1}",
                )
                done += 1
            except TicketConflict:  # another writer updated it first
                continue
            lag = started + done / rate - time.monotonic()
            if lag > 0:
                time.sleep(lag)
    finally:
        connection.close()
    return done


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tickets", type=int, default=20)
    parser.add_argument("--updates", type=int, default=400)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=1)
    # Each commit waits for its WAL flush, so one connection writes ~50/s on a busy machine;
    # several writers, each at rate/writers, reach the rates the soak asks for.
    parser.add_argument("--writers", type=int, default=1)
    # Stop after this many seconds even if not every update was made (a soak lasts what it says).
    parser.add_argument("--seconds", type=float, default=0.0)
    args = parser.parse_args()
    ids = [
        retrying(ticket_create, title=f"ticket {n}", price="10.00", user_id=f"user-{n}").id for n in range(args.tickets)
    ]
    started = time.monotonic()
    until = started + args.seconds if args.seconds else float("inf")
    shares = [args.updates // args.writers + (1 if i < args.updates % args.writers else 0) for i in range(args.writers)]
    with ThreadPoolExecutor(max_workers=args.writers) as pool:
        futures = [
            pool.submit(write, ids, share, args.rate / args.writers, args.seed * 1000 + i, until)
            for i, share in enumerate(shares)
        ]
        done = sum(f.result() for f in futures)
    elapsed = time.monotonic() - started
    print(f"load done: {args.tickets} tickets, {done} updates in {elapsed:.1f}s ({done / elapsed:.1f}/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
