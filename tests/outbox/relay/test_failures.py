"""The relay's verdict on each kind of failure: transient ones never kill a row, permanent ones at once.

The end-to-end behaviour of each kind runs on real NATS in test_relay.py (an outage many times
MAX_ATTEMPTS long, an unknown refusal) and test_ordering.py (a message over the stream's size
limit); this pins the classification of every JetStream error code the relay knows.
"""

from __future__ import annotations

import pytest

from outbox.relay.failures import PERMANENT, PERMANENT_ERR_CODES, TRANSIENT, TRANSIENT_ERR_CODES, UNKNOWN, refusal


@pytest.mark.parametrize(
    ("code", "err_code", "kind"),
    [
        (400, 10054, PERMANENT),  # message size exceeds maximum allowed
        (400, 10097, PERMANENT),  # header size exceeds maximum allowed
        (400, 10109, PERMANENT),  # sealed stream
        (503, 10008, TRANSIENT),  # no JetStream quorum / meta leader
        (503, 10158, TRANSIENT),  # duplicate message id is in process
        (500, 10077, TRANSIENT),  # storing failed (disk)
        (400, 10047, TRANSIENT),  # storage resources exceeded
        (503, None, TRANSIENT),  # any 503
        (400, 10071, UNKNOWN),  # wrong last sequence: not a relay header, counted to MAX_ATTEMPTS
        (400, None, UNKNOWN),
    ],
)
def test_each_jetstream_refusal_has_its_kind(code, err_code, kind):
    failure = refusal(code, err_code, "whatever the server said")
    assert failure.kind == kind
    assert f"({err_code or code})" in failure.reason and "whatever the server said" in failure.reason


def test_no_code_is_both_transient_and_permanent():
    assert not set(PERMANENT_ERR_CODES) & set(TRANSIENT_ERR_CODES)
