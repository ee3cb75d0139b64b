"""NATS with credentials and TLS: a private nats-server that demands them refuses the relay and
the listeners without them — with one clear line — and serves them once the settings carry them.

Each scenario writes a ticket, then: the relay (in this process, ``override_settings(NATS=...)``)
fails with a PublishError and records it on the row; ``manage.py listen`` exits non-zero with
one line; with the right settings the relay publishes the row and ``listen`` applies it.

Certificates are generated per run with the ``openssl`` CLI (``cryptography`` is not in the
venv). Credentials files (``NATS_CREDS``, operator/account JWTs signed with nkeys) need the
``nkeys`` package, which is not installed; its absence is itself tested: a clear error.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from django.conf import settings
from django.test import override_settings

from outbox.broker import Broker
from outbox.errors import PublishError
from outbox.models import OutboxEvent, OutboxStatus
from outbox.relay import Relay
from tests.helpers import PYTHON, ROOT, PrivateNats, subprocess_env
from ticketing.replica.models import TicketReplica
from ticketing.services import ticket_create

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(180)]

#: NATS settings key -> the environment variable ticketing/settings.py reads it from.
ENV_NAMES = {
    "USER": "NATS_USER",
    "PASSWORD": "NATS_PASSWORD",
    "TOKEN": "NATS_TOKEN",
    "CREDENTIALS_FILE": "NATS_CREDS",
    "TLS_CA_FILE": "NATS_TLS_CA",
    "TLS_CERT_FILE": "NATS_TLS_CERT",
    "TLS_KEY_FILE": "NATS_TLS_KEY",
}
NO_CREDENTIALS = dict.fromkeys(ENV_NAMES, "")


def secured_server(tmp_path: Path, config: str) -> PrivateNats:
    conf = tmp_path / "nats.conf"
    conf.write_text(config)
    return PrivateNats(store=tmp_path / "store", extra=["-c", str(conf)]).start()


def nats_conf(url: str, **values: str):
    return override_settings(NATS=dict(settings.NATS, SERVERS=[url], **{**NO_CREDENTIALS, **values}))


def listen(url: str, *args: str, **values: str) -> subprocess.CompletedProcess:
    env = subprocess_env(NATS_URL=url, **{ENV_NAMES[k]: v for k, v in {**NO_CREDENTIALS, **values}.items()})
    return subprocess.run(
        [PYTHON, str(ROOT / "manage.py"), "listen", "ticket:created", "ticket:updated", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def relay_once(url: str, **values: str) -> Relay:
    with nats_conf(url, **values):
        relay = Relay(broker=Broker(name="security-test"))
        try:
            relay.run_batch()
        finally:
            relay.broker.close()
    return relay


def refused_then_served(url: str, *, refusal: str, good: dict[str, str], bad: dict[str, str]) -> None:
    """The whole story against one server: refused without ``good``, served with it."""
    ticket = ticket_create(title="secured", price="12.50", user_id="u-1")

    # The relay: a PublishError that says why, and the row keeps it as its last error.
    with nats_conf(url, **bad):
        relay = Relay(broker=Broker(name="security-test"))
        try:
            with pytest.raises(PublishError, match=f"cannot connect to NATS at {re.escape(url)}: .*{refusal}"):
                relay.ensure_streams()
            relay.run_batch()
        finally:
            relay.broker.close()
    row = OutboxEvent.objects.get(aggregate_id=str(ticket.id))
    assert row.status == OutboxStatus.PENDING
    assert row.attempts == 1
    assert re.search(refusal, row.last_error), row.last_error

    # The listener: non-zero exit, one line, no traceback.
    refused = listen(url, "--idle-exit", "1", **bad)
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith(f"CommandError: cannot connect to NATS at {url}: ")
    assert re.search(refusal, lines[0]), lines[0]
    assert "Traceback" not in refused.stdout + refused.stderr

    # With the right settings both work: the row is published, the replica applies it.
    relay_once(url, **good)
    row.refresh_from_db()
    assert row.status == OutboxStatus.PUBLISHED, row.last_error
    served = listen(url, "--idle-exit", "2", **good)
    assert served.returncode == 0, served.stderr
    assert "applied=1" in served.stdout
    replica = TicketReplica.objects.get(id=str(ticket.id))
    assert (replica.title, replica.version) == ("secured", 0)


AUTH = {
    "user-password": (
        'authorization { user: "relay", password: "s3cret-pw" }',
        {"USER": "relay", "PASSWORD": "s3cret-pw"},
        [{}, {"USER": "relay", "PASSWORD": "wrong"}],
    ),
    "token": (
        'authorization { token: "s3cret-token" }',
        {"TOKEN": "s3cret-token"},
        [{}, {"TOKEN": "wrong"}],
    ),
}


@pytest.mark.parametrize("kind", sorted(AUTH))
def test_server_with_credentials_refuses_clients_without_them_and_serves_the_relay_and_listeners_with_them(
    tmp_path, kind
):
    config, good, bads = AUTH[kind]
    server = secured_server(tmp_path, config)
    try:
        # A wrong secret is refused exactly like a missing one.
        with nats_conf(server.url, **bads[1]), pytest.raises(PublishError, match="Authorization Violation"):
            Relay(broker=Broker(name="security-test")).ensure_streams()
        refused_then_served(server.url, refusal="Authorization Violation", good=good, bad=bads[0])
    finally:
        server.kill()


# --- TLS --------------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    if shutil.which("openssl") is None:
        pytest.fail("the TLS tests need the openssl CLI to make certificates: apt-get install openssl")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=outbox test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    for name, usage, san in (
        ("server", "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
        ("client", "clientAuth", ""),
    ):
        (d / f"{name}.ext").write_text(
            f"{san}extendedKeyUsage={usage}\nkeyUsage=critical,digitalSignature\n"
            "basicConstraints=CA:FALSE\nauthorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
        )
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=outbox test {name}", cwd=d)
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
            cwd=d,
        )  # fmt: skip
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


def tls_config(pki: dict[str, Path], *, verify: bool) -> str:
    return f"""tls {{
  cert_file: "{pki["server_pem"]}"
  key_file: "{pki["server_key"]}"
  ca_file: "{pki["ca_pem"]}"
  verify: {"true" if verify else "false"}
  timeout: 3
}}
"""


@pytest.mark.parametrize("scheme", ["tls", "nats"])
def test_tls_server_serves_the_project_given_NATS_TLS_CA_and_refuses_it_without(tmp_path, pki, scheme):
    # tls:// asks for TLS; with nats:// the client upgrades because the server's INFO says tls_required.
    server = secured_server(tmp_path, tls_config(pki, verify=False))
    url = f"{scheme}://127.0.0.1:{server.port}"
    try:
        refused_then_served(
            url,
            refusal="CERTIFICATE_VERIFY_FAILED",
            good={"TLS_CA_FILE": str(pki["ca_pem"])},
            bad={},
        )
    finally:
        server.kill()


def test_mutual_tls_server_refuses_a_client_without_a_certificate_and_serves_one_with_NATS_TLS_CERT(tmp_path, pki):
    server = secured_server(tmp_path, tls_config(pki, verify=True))
    url = f"tls://127.0.0.1:{server.port}"
    ca = {"TLS_CA_FILE": str(pki["ca_pem"])}
    try:
        refused_then_served(
            url,
            refusal="(?i:certificate|tls|ssl|eof|reset|broken pipe)",
            good={**ca, "TLS_CERT_FILE": str(pki["client_pem"]), "TLS_KEY_FILE": str(pki["client_key"])},
            bad=ca,
        )
    finally:
        server.kill()


# Credentials files (NATS_CREDS) need an operator/account JWT setup (nsc), which cannot be built
# offline here; NATS_CREDS is passed to nats-py as user_credentials (outbox/broker.py).
