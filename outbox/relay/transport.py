"""The JetStream transport: pipelined publishes on one connection, each answered through a handler,
and every nats-py internal the relay touches, behind one start-up check with a public-API fallback.

A JetStream publish is a core NATS request: the message goes to the stream's subject with a reply
subject, and the server answers there with a PubAck. Most of nats-py's ``publish_async`` time per
message is bookkeeping (a semaphore wrapped in ``asyncio.wait_for``, random tokens, header regexes,
a flush request per message). :class:`JetStreamPublisher` keeps one wildcard reply
subscription per connection, numbers its replies, frames the ``HPUB`` command itself and flushes
once per burst.

The *wire path* uses these nats-py internals, and nothing else in the relay does:

* ``Client._pending`` / ``Client._pending_data_size`` -- the outgoing command buffer a framed
  ``HPUB`` is appended to;
* ``Client._flush_pending()`` -- asks nats-py's flusher task to write that buffer;
* ``Client._process_msg(sid, subject, reply, data, headers)`` -- the parser's hand-off of every
  incoming message, wrapped so that PubAcks are answered there without building ``Msg`` objects;
* ``Subscription._id`` -- the sid of the reply subscription, to recognise its messages.

:func:`wire_path_problem` is the one check, run when a connection's publisher is created: the
installed nats-py must be one of :data:`VERIFIED_NATS_PY` and each internal must have the expected
shape. Otherwise (or with ``OUTBOX['WIRE_PUBLISH'] = False``) the publisher uses nats-py's public
``Client.publish`` and an ordinary subscription callback: the same stream, at a higher CPU cost
(the figures are in docs/relay.md, "Publishing").
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import weakref
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from outbox.relay.failures import UNKNOWN, Failure, refusal, transient
from outbox.relay.messages import PublishRejected

logger = logging.getLogger("outbox.relay")

#: nats-py releases whose internals (listed in the module docstring) the wire path was verified on.
#: pyproject.toml bounds nats-py to these; tests/outbox/relay/test_transport.py fails on any other.
VERIFIED_NATS_PY = ("2.16.0",)

_PROCESS_MSG_PARAMS = ["sid", "subject", "reply", "data", "headers"]


def nats_py_version() -> str:
    """The installed nats-py release ("" when it is not installed as a distribution)."""
    try:
        return version("nats-py")
    except PackageNotFoundError:
        return ""


def unverified_nats_py(verified: tuple[str, ...] = VERIFIED_NATS_PY) -> str:
    """ "" when the installed nats-py is one of ``verified``; otherwise a sentence saying which is
    installed and which were verified. Code elsewhere that relies on nats-py internals may reuse it
    with its own list."""
    installed = nats_py_version()
    if installed in verified:
        return ""
    known = ", ".join(verified)
    return f"nats-py {installed or '(unknown version)'} is not one its internals were verified on ({known})"


def wire_path_problem(nc: NATS, sub: Any) -> str:
    """Why the wire path cannot be used on connection ``nc`` with reply subscription ``sub`` ("" when it can)."""
    problem = unverified_nats_py()
    if problem:
        return problem
    if not isinstance(getattr(nc, "_pending", None), list):
        return "nats-py has no Client._pending list"
    if not isinstance(getattr(nc, "_pending_data_size", None), int):
        return "nats-py has no Client._pending_data_size counter"
    if not callable(getattr(nc, "_flush_pending", None)):
        return "nats-py has no Client._flush_pending()"
    process_msg = getattr(nc, "_process_msg", None)
    try:
        params = list(inspect.signature(process_msg).parameters) if process_msg else []
    except (TypeError, ValueError):
        params = []
    if params != _PROCESS_MSG_PARAMS:
        return f"nats-py's Client._process_msg takes {params or 'nothing known'}, not {_PROCESS_MSG_PARAMS}"
    if not isinstance(getattr(sub, "_id", None), int):
        return "nats-py's Subscription has no _id"
    return ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_decode_ack = msgspec.json.Decoder(_PubAck).decode

#: Called as handler(tag, stream, stream sequence, None) for a PubAck, or (tag, "", 0, failure) for a refusal.
AckHandler = Callable[[Any, str, int, "Failure | None"], None]

_warned: set[str] = set()


class JetStreamPublisher:
    """Pipelined JetStream publishes on one connection, each answered through a handler.

    Per message: :meth:`reserve` a reply subject (with the handler its answer goes to), then
    :meth:`queue` it (``wire``) or ``await`` :meth:`send` (public path); then :meth:`flush`. The
    PubAck, or the server's refusal (e.g. 503: no stream for this subject), arrives later through
    the handler. An answer that never comes (connection lost) is the caller's to time out, with
    :meth:`forget`.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._next = 0
        self._waiting: dict[str, tuple[AckHandler, Any]] = {}
        #: True: frame commands into nats-py's buffer and answer PubAcks from its parser.
        self.wire = False

    @classmethod
    async def for_client(cls, nc: NATS, *, wire: bool = True) -> JetStreamPublisher:
        """The publisher of this connection (one reply subscription per connection).

        Callers get it in the order they asked (they wait on the same future), so batches
        submitted in order register their chains in order. ``wire=False`` turns the wire path off
        for this connection's publisher.
        """
        pending = _publishers.get(nc)
        if pending is None:
            pending = _publishers[nc] = asyncio.get_running_loop().create_future()
            publisher = cls(nc)
            try:
                sub = await nc.subscribe(publisher._prefix + "*", cb=publisher._on_reply)
                if wire:
                    problem = wire_path_problem(nc, sub)
                    if problem:
                        if problem not in _warned:
                            _warned.add(problem)
                            logger.warning("outbox.wire_publish_off reason=%s; using Client.publish", problem)
                    else:
                        publisher._answer_from_the_parser(sub._id)  # checked just above
                        publisher.wire = True
            except BaseException as exc:
                del _publishers[nc]
                pending.set_exception(exc)
                raise
            pending.set_result(publisher)
        publisher = await pending
        if not wire:
            publisher.wire = False
        return publisher

    async def _on_reply(self, msg: Msg) -> None:
        self._answer(msg.subject, msg.data, (msg.headers or {}).get("Status", ""))

    def _answer(self, subject: str, data: bytes, status: str) -> None:
        waiting = self._waiting.pop(subject, None)
        if waiting is None:
            return  # answered after it was given up on: the caller already counted it as failed
        handler, tag = waiting
        if not data:
            # 503 no responders: JetStream is down, has no leader for the stream yet, or the stream is
            # missing (the relay creates its streams before it publishes): all pass with time.
            reason = "no JetStream responder for this subject" if status == "503" else "empty PubAck"
            handler(tag, "", 0, transient(f"{reason} (status {status or '?'})"))
            return
        try:
            ack = _decode_ack(data)
        except msgspec.DecodeError:
            handler(tag, "", 0, Failure(f"unreadable PubAck: {data[:200]!r}", UNKNOWN))
            return
        if ack.error is not None:
            error = ack.error
            handler(tag, "", 0, refusal(error.get("code"), error.get("err_code"), error.get("description", "")))
            return
        handler(tag, ack.stream, ack.seq, None)

    def _answer_from_the_parser(self, sid: int) -> None:
        """Answer PubAcks straight from nats-py's protocol parser.

        nats-py turns every incoming message into a ``Msg``, queues it to the subscription's task
        and awaits the callback, which costs more than the rest of a publish. The parser hands
        each message to ``Client._process_msg``; messages for our reply subscription are answered
        there and everything else goes on as before.
        """
        nc = self._nc
        original = nc._process_msg  # checked by wire_path_problem
        answer = self._answer

        async def _process_msg(msg_sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
            if msg_sid != sid:
                return await original(msg_sid, subject, reply, data, headers)
            status = headers[9:12].decode() if headers and not data else ""  # "NATS/1.0 503\r\n..."
            answer(subject.decode(), data, status)
            return None

        nc._process_msg = _process_msg  # type: ignore[method-assign,assignment]

    @property
    def connected(self) -> bool:
        return self._nc.is_connected

    def check_size(self, header: bytes, payload: bytes) -> None:
        """PublishRejected if the server would refuse the message for its size (and drop the connection).
        nats-py checks the payload only."""
        size = len(header) + len(payload)
        if size > self._nc.max_payload:
            raise PublishRejected(
                f"payload too large for the server: {size} bytes with headers, max_payload is {self._nc.max_payload}"
            )

    def reserve(self, handler: AckHandler, tag: Any) -> str:
        """A fresh reply subject; its answer goes to ``handler(tag, ...)``."""
        self._next += 1
        reply = f"{self._prefix}{self._next}"
        self._waiting[reply] = (handler, tag)
        return reply

    def queue(self, subject: str, reply: str, payload: bytes, header: bytes) -> None:
        """Append one framed ``HPUB`` to nats-py's outgoing buffer (wire path; see :meth:`flush`)."""
        command = b"HPUB %b %b %d %d\r\n%b%b\r\n" % (
            subject.encode(),
            reply.encode(),
            len(header),
            len(header) + len(payload),
            header,
            payload,
        )
        nc = self._nc
        nc._pending.append(command)  # checked by wire_path_problem
        nc._pending_data_size += len(command)

    async def send(self, subject: str, reply: str, payload: bytes, headers: dict[str, str]) -> None:
        """Publish one message through nats-py's public API (it flushes by itself)."""
        await self._nc.publish(subject, payload, reply=reply, headers=headers)

    async def flush(self) -> None:
        """Have nats-py write what :meth:`queue` appended."""
        if self.wire and self._nc.is_connected:
            await self._nc._flush_pending()  # checked by wire_path_problem

    def forget(self, reply: str) -> None:
        """Stop waiting for an answer (the caller gave up on it)."""
        self._waiting.pop(reply, None)


_publishers: weakref.WeakKeyDictionary[NATS, asyncio.Future[JetStreamPublisher]] = weakref.WeakKeyDictionary()
