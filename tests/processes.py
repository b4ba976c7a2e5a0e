"""Running ``evflow`` commands as real processes: one-shot ones, and long-running children.

Output is read as a program reads it, not from a terminal; ``COLUMNS`` is set wide so rich
does not wrap lines at its 80-column default unless a test asks for that default.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = "examples.flows:app"
READY = "try it: evflow invoke approval --input amount=... --input requester=..."
"""The last line ``evflow serve`` logs once it takes commands."""

BOUND = 20.0
"""Seconds to wait for a process to print or exit when it must."""

SETTLED = re.compile(
    r"^execution (?P<id>\S+) of flow '(?P<flow>\w+)' is (?P<status>\w+) "
    r"\(version (?P<version>\d+)\)$"
)


def evflow_command() -> list[str]:
    """The ``evflow`` console script of the Python running the tests.

    ``python -m evflow.cli`` does nothing (the module has no ``__main__`` guard), so the
    fallback calls ``main`` explicitly.
    """
    script = shutil.which("evflow", path=str(Path(sys.executable).parent))
    if script:
        return [script]
    return [sys.executable, "-c", "from evflow.cli import main; main()"]


EVFLOW = evflow_command()


def cli_env(**overrides: str | None) -> dict[str, str]:
    """This environment without ``EVFLOW_*`` or forced colours, output 200 columns wide."""
    dropped = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("EVFLOW_") and key not in dropped
    }
    env.update(COLUMNS="200", PYTHONIOENCODING="utf-8")
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def sqlite_url(path: Path) -> str:
    """The ``--store`` URL of an SQLite file."""
    return f"sqlite:///{path}"


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:``port`` (as nats-server binds it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def unused_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Result:
    """A finished ``evflow`` command."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        """The lines of stdout."""
        return self.stdout.splitlines()

    def settled(self) -> re.Match[str]:
        """The first line of an invoke or resume reply, parsed; fails the test otherwise."""
        assert self.returncode == 0, self
        match = SETTLED.match(self.lines[0]) if self.lines else None
        assert match, f"not a settle point: {self.stdout!r}"
        return match


async def evflow(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run ``evflow ARGS`` to its end (at most ``BOUND`` seconds) and capture its output."""
    process = await asyncio.create_subprocess_exec(
        *EVFLOW,
        *args,
        cwd=ROOT,
        env=env or cli_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), BOUND)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        pytest.fail(f"evflow {' '.join(args)} still ran after {BOUND:g} s:\n{err.decode()}")
    assert process.returncode is not None
    return Result(args, process.returncode, out.decode(), err.decode())


class Child:
    """A long-running ``evflow`` process (serve, watch) with its output in two files."""

    def __init__(self, process: asyncio.subprocess.Process, out: Path, err: Path):
        self.process = process
        self.out = out
        self.err = err

    @property
    def stdout(self) -> str:
        """What it printed on stdout so far."""
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        """What it printed (or logged) on stderr so far."""
        return self.err.read_text(errors="replace")

    async def wait_for(self, text: str, *, stream: str = "stderr") -> None:
        """Wait until ``text`` shows up in ``stream``; fail if it exits or time runs out."""
        deadline = asyncio.get_running_loop().time() + BOUND
        while text not in getattr(self, stream):
            if self.process.returncode is not None:
                pytest.fail(f"exited with {self.process.returncode} before {text!r}:\n{self}")
            if asyncio.get_running_loop().time() > deadline:
                pytest.fail(f"no {text!r} on {stream} within {BOUND:g} s:\n{self}")
            await asyncio.sleep(0.05)

    async def stop(self, sig: signal.Signals = signal.SIGTERM, *, group: bool = False) -> int:
        """Send ``sig`` (to its whole process group if ``group``, as a terminal's Ctrl-C
        does) and return the exit code; fail if it does not exit in time."""
        if group:
            os.killpg(self.process.pid, sig)
        else:
            self.process.send_signal(sig)
        try:
            return await asyncio.wait_for(self.process.wait(), BOUND)
        except TimeoutError:
            pytest.fail(f"still running {BOUND:g} s after {sig.name}:\n{self}")

    async def kill(self) -> int:
        """SIGKILL its process group, as a crash would."""
        os.killpg(self.process.pid, signal.SIGKILL)
        return await self.process.wait()

    async def close(self) -> None:
        """Teardown: stop it if it still runs, and kill any child it left behind."""
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                pass
        if self.process.returncode != 0:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        await self.process.wait()

    def __str__(self) -> str:
        return f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}"


Spawn = Callable[..., Awaitable[Child]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Starts ``evflow ARGS`` in the background; every process is stopped at teardown."""
    children: list[Child] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> Child:
        out, err = (tmp_path / f"{args[0]}-{len(children)}.{name}" for name in ("out", "err"))
        with out.open("wb") as out_file, err.open("wb") as err_file:
            process = await asyncio.create_subprocess_exec(
                *EVFLOW,
                *args,
                cwd=ROOT,
                env=env or cli_env(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_file,
                stderr=err_file,
                start_new_session=True,
            )
        children.append(Child(process, out, err))
        return children[-1]

    yield start
    for child in reversed(children):
        await child.close()
