"""Shared fixtures: a real nats-server per test on a free loopback port, real SQLite files."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from evflow import Client
from evflow.nats_cluster import NatsCluster
from evflow.nats_server import NatsServer, find_binary
from evflow.server import Server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the example flows live in examples/

from examples.flows import app as example_app  # noqa: E402

from processes import spawn  # noqa: E402, F401  (a fixture: evflow commands as children)


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    """A nats-server with JetStream on a free loopback port, data in a temp folder."""
    try:
        find_binary()
    except Exception as error:  # the suite cannot run without the real server
        pytest.fail(f"nats-server is required: {error}")
    server = NatsServer(tmp_path / "nats", port=0)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    """A fresh SQLite log in a temp folder."""
    return f"sqlite:///{tmp_path / 'evflow.db'}"


@pytest.fixture
async def engine_server(nats_server: NatsServer, store_url: str) -> AsyncIterator[Server]:
    """The engine serving the example flows on the test's nats-server and SQLite file."""
    server = Server(example_app, store_url, nats_server.url)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def client(nats_server: NatsServer, engine_server: Server) -> AsyncIterator[Client]:
    """A client connected to the test's nats-server, with the engine serving."""
    client = await Client.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """A three-node JetStream cluster on free loopback ports, data in a temp folder."""
    cluster = NatsCluster(tmp_path / "cluster")
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.stop()
