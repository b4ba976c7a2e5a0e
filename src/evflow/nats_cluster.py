"""A three-node JetStream cluster on one machine's loopback: for tests that lose a node on
purpose, the cluster benchmark, and ``ops/cluster`` (several engines on a laptop).

Each node is a nats-server child (``nats_server.NatsServer``) with a configuration file
naming the cluster and its routes; its client and route ports are picked free when the
cluster is made (or given) and kept across a node's restart, so a restarted node rejoins
under the same name and finds its JetStream data where it left it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path

import nats
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from .nats_server import NatsServer

NODES = 3

_CONFIG = """\
server_name: {name}
cluster {{
  name: evflow
  listen: 127.0.0.1:{route_port}
  routes: [{routes}]
}}
"""


class NatsCluster:
    """Three nats-servers with JetStream, routed to each other on 127.0.0.1.

    Args:
        folder: where each node keeps its configuration and JetStream data.
        client_ports: the nodes' client ports (free ones if not given).
        route_ports: the nodes' route ports (free ones if not given).
    """

    def __init__(
        self,
        folder: Path,
        client_ports: list[int] | None = None,
        route_ports: list[int] | None = None,
    ):
        self.folder = folder
        self.client_ports = client_ports or [_unused_port() for _ in range(NODES)]
        self.route_ports = route_ports or [_unused_port() for _ in range(NODES)]
        self.nodes: list[NatsServer | None] = [None] * NODES

    @property
    def urls(self) -> list[str]:
        """Every node's client URL: a client given all of them fails over between them."""
        return [f"nats://127.0.0.1:{port}" for port in self.client_ports]

    def name(self, index: int) -> str:
        """The server name of node ``index``."""
        return f"n{index + 1}"

    async def start(self) -> None:
        """Start every node, then wait until JetStream has a meta leader."""
        await asyncio.gather(*(self.start_node(index) for index in range(NODES)))
        await self.until_ready()

    async def start_node(self, index: int) -> None:
        """Start (or restart) node ``index`` on its ports, with its data folder."""
        folder = self.folder / self.name(index)
        folder.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in self.route_ports)
        config = folder / "node.conf"
        config.write_text(
            _CONFIG.format(name=self.name(index), route_port=self.route_ports[index], routes=routes)
        )
        node = NatsServer(folder / "jetstream", port=self.client_ports[index], config=config)
        await node.start()
        self.nodes[index] = node

    async def until_ready(self, timeout: float = 30.0) -> None:
        """Wait until JetStream answers through every running node (a meta leader is
        elected, and the nodes see each other)."""
        running = [url for url, node in zip(self.urls, self.nodes, strict=True) if node]
        async with asyncio.timeout(timeout):
            for url in running:
                await _until_jetstream_answers(url)
            if len(running) == NODES:
                await _until_replicas_placeable(running[0])

    def kill(self, index: int) -> None:
        """SIGKILL node ``index``: no goodbye to its peers, nothing flushed."""
        node = self.nodes[index]
        assert node is not None and node.pid is not None, f"node {index} is not running"
        os.kill(node.pid, signal.SIGKILL)

    async def stop_node(self, index: int) -> None:
        """Reap node ``index`` (after a kill) or stop it."""
        node, self.nodes[index] = self.nodes[index], None
        if node is not None:
            await node.stop()

    async def stop(self) -> None:
        """Stop every node still running."""
        await asyncio.gather(*(self.stop_node(index) for index in range(NODES)))


def _unused_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _until_jetstream_answers(url: str) -> None:
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        while True:
            try:
                reply = await nc.request("$JS.API.INFO", b"", timeout=1)
            except (NoRespondersError, NatsTimeout):
                await asyncio.sleep(0.1)
                continue
            if b'"error"' not in reply.data:
                return
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def _until_replicas_placeable(url: str) -> None:
    """Wait until a stream with a replica on every node can be made: JetStream answering
    is not enough, as the meta leader may not yet count every peer as online."""
    probe = "EVFLOW_READY_PROBE"
    config = {"name": probe, "subjects": ["evflow.ready-probe"], "num_replicas": NODES}
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        while True:
            try:
                reply = await nc.request(
                    f"$JS.API.STREAM.CREATE.{probe}", json.dumps(config).encode(), timeout=2
                )
            except (NoRespondersError, NatsTimeout):
                reply = None
            if reply is not None and b'"error"' not in reply.data:
                await nc.request(f"$JS.API.STREAM.DELETE.{probe}", b"", timeout=2)
                return
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
