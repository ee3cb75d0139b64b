"""Why a row was not published, and whether retrying can help: transient, permanent or unknown.

- **transient**: the broker is away or busy — not connected, no PubAck in time, no responders
  (503), no JetStream quorum, "duplicate message id is in process", storage full or a stream
  offline. Retried with capped backoff for as long as it lasts; such a row never goes dead.
- **permanent**: this message can never be stored as it is — larger than the server or the
  stream accepts, a header too large, a sealed stream. Dead at once (it holds back only the later
  rows of its own aggregate), to be fixed and requeued by an operator.
- **unknown**: any other refusal. Retried, and dead after ``OUTBOX['MAX_ATTEMPTS']`` of them.
"""

from __future__ import annotations

from dataclasses import dataclass

TRANSIENT = "transient"
PERMANENT = "permanent"
UNKNOWN = "unknown"

#: JetStream API error codes (nats-server's errors.json) that no retry can get past.
PERMANENT_ERR_CODES = {
    10054: "message size exceeds maximum allowed",
    10097: "header size exceeds maximum allowed",
    10060: "expected stream does not match",
    10056: "stream name in subject does not match request",
    10109: "invalid operation on sealed stream",
}
#: Codes of a broker that is away, busy or full: retried for as long as it lasts.
TRANSIENT_ERR_CODES = {
    10004: "incomplete results",
    10008: "JetStream system temporarily unavailable",
    10023: "insufficient resources",
    10047: "insufficient storage resources available",
    10053: "stream limits exceeded",
    10077: "storing the message failed",
    10118: "stream is offline",
    10158: "duplicate message id is in process",
    10167: "too many requests",
    10194: "stream is offline",
}


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one row was not published."""

    reason: str
    kind: str = TRANSIENT


def refusal(code: int | None, err_code: int | None, description: str) -> Failure:
    """A JetStream error in a PubAck, classified."""
    reason = f"JetStream refused the message ({err_code or code}): {description}"
    if err_code in PERMANENT_ERR_CODES:
        return Failure(reason, PERMANENT)
    if err_code in TRANSIENT_ERR_CODES or code == 503:
        return Failure(reason, TRANSIENT)
    return Failure(reason, UNKNOWN)


def transient(reason: str) -> Failure:
    return Failure(reason, TRANSIENT)


def permanent(reason: str) -> Failure:
    return Failure(reason, PERMANENT)
