"""docker-compose.cluster.yml: three clustered JetStream servers, and every app service pointed at them.

There is no Docker engine here, so the file is parsed with PyYAML and merged over
docker-compose.yml the way Compose merges an override (maps by key, ``command`` replaced).
Then the three servers' own command lines are run by the real nats-server, with host names
and ports mapped to loopback: they must form a cluster with a JetStream meta leader.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import yaml

from tests.cluster import nats_server_binary
from tests.helpers import ROOT, free_port, wait_for

BASE = ROOT / "docker-compose.yml"
CLUSTER = ROOT / "docker-compose.cluster.yml"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def flags(command: list[str]) -> dict[str, str]:
    """``--name=value`` and bare ``--name`` flags of a nats-server command line."""
    result = {}
    for arg in command:
        name, _, value = arg.lstrip("-").partition("=")
        result[name] = value
    return result


def merged_services() -> dict[str, dict]:
    """docker-compose.yml with docker-compose.cluster.yml on top, as ``docker compose -f … -f …`` does."""
    base, over = load(BASE)["services"], load(CLUSTER)["services"]
    merged = {}
    for name in base.keys() | over.keys():
        service = dict(base.get(name, {}))
        for key, value in over.get(name, {}).items():
            if isinstance(value, dict) and isinstance(service.get(key), dict):
                service[key] = {**service[key], **value}
            else:
                service[key] = value
        merged[name] = service
    return merged


def nats_services(services: dict[str, dict]) -> dict[str, dict]:
    return {name: s for name, s in services.items() if str(s.get("image", "")).startswith("nats:")}


def test_cluster_file_has_three_jetstream_servers_routed_to_each_other_each_with_its_own_volume():
    services = merged_services()
    nodes = nats_services(services)
    assert sorted(nodes) == ["nats", "nats-2", "nats-3"]
    declared_volumes = set(load(CLUSTER)["volumes"])
    names, clusters, volumes = set(), set(), set()
    for service, node in nodes.items():
        major, minor = (int(x) for x in node["image"].split(":")[1].split("-")[0].split(".")[:2])
        assert (major, minor) >= (2, 10), f"{service}: JetStream clustering as the project uses it needs 2.10+"
        f = flags(node["command"])
        assert "jetstream" in f, f"{service} runs without JetStream"
        names.add(f["server_name"])
        clusters.add(f["cluster_name"])
        assert urlparse(f["cluster"]).port == 6222
        routes = {urlparse(r).hostname for r in f["routes"].split(",")}
        assert routes == set(nodes) - {service}, f"{service} must route to the two others"
        store = f["store_dir"]
        mounts = [v for v in node["volumes"] if v.endswith(f":{store}")]
        assert len(mounts) == 1, f"{service}: its JetStream store must be a volume"
        volume = mounts[0].split(":")[0]
        assert volume in declared_volumes
        volumes.add(volume)
        assert "healthz" in " ".join(node["healthcheck"]["test"])
    assert len(names) == 3 and len(clusters) == 1 and len(volumes) == 3


def test_every_app_service_lists_the_three_servers_and_keeps_three_replicas():
    services = merged_services()
    nodes = nats_services(services)
    apps = {name: s for name, s in services.items() if "build" in s}
    assert {"web", "relay", "listener", "tickets-listener"} <= set(apps)
    for name, app in apps.items():
        env = app["environment"]
        servers = [urlparse(u) for u in env["NATS_URL"].split(",")]
        assert {(u.scheme, u.hostname, u.port) for u in servers} == {("nats", n, 4222) for n in nodes}, name
        assert str(env["OUTBOX_STREAM_REPLICAS"]) == "3", name
        assert all(app["depends_on"][n]["condition"] == "service_healthy" for n in nodes), name
        # What the base file gave every app service is still there.
        assert env["DATABASE_URL"].startswith("postgres://") and env["CELERY_BROKER_URL"].startswith("redis://")
    # The streams are created (or raised to three replicas) by the one-shot migrate service.
    assert "outbox_streams" in services["migrate"]["command"]


def test_the_files_nats_commands_form_a_jetstream_cluster_when_run_on_loopback(tmp_path):
    nodes = nats_services(merged_services())
    ports = {name: (free_port(), free_port(), free_port()) for name in nodes}  # client, cluster, monitor
    procs = []
    try:
        for name, node in nodes.items():
            client, cluster, monitor = ports[name]
            command = []
            for arg in node["command"]:
                key, _, value = arg.partition("=")
                if key == "--config":
                    value = str(ROOT / "deploy" / "nats" / "nats.conf")  # the file compose mounts there
                elif key == "--store_dir":
                    value = str(tmp_path / name)
                elif key == "--http_port":
                    value = str(monitor)
                elif key == "--cluster":
                    value = f"nats://127.0.0.1:{cluster}"
                elif key == "--routes":
                    value = ",".join(f"nats://127.0.0.1:{ports[urlparse(r).hostname][1]}" for r in value.split(","))
                command.append(f"{key}={value}" if value else key)
            log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed below
            procs.append(
                subprocess.Popen(
                    [nats_server_binary(), "-a", "127.0.0.1", "-p", str(client), *command],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            log.close()

        def leaders() -> set[str] | None:
            seen = set()
            for _, _, monitor in ports.values():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/jsz", timeout=1) as resp:
                        seen.add((json.loads(resp.read()).get("meta_cluster") or {}).get("leader"))
                except OSError:
                    return None
            return seen if len(seen) == 1 and None not in seen and "" not in seen else None

        try:
            (leader,) = wait_for(leaders, timeout=90, interval=0.2, what="a JetStream meta leader")
        except AssertionError:
            for path in tmp_path.glob("*.log"):
                print(f"--- {path.name}\n{path.read_text()[-2000:]}")
            raise
        assert leader in {"nats-1", "nats-2", "nats-3"}
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)
