"""The optional `--http` pass: each configuration under uvicorn in a process of its own,
once per stack of SERVER_STACKS (`conf.server`), interleaved in the same rounds.

The load generator (httpx) runs in this process, so on two cores client and server
each get about one; the server's CPU time per request comes from /proc. As in the
in-process pass, a configuration's server runs only for its turn in a round.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx

from .asgi import Call, Send
from .server import REPLICA_URLS_VARIABLE, URL_VARIABLE
from .timing import CONCURRENCIES, Endpoint, Opener
from .variants import Configuration, Servers

START_TIMEOUT = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class UvicornServer:
    """One variant's app served by uvicorn in a child process."""

    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port

    @classmethod
    async def start(cls, conf: Configuration, servers: Servers) -> UvicornServer:
        port = _free_port()
        env = {
            **os.environ,
            URL_VARIABLE: servers.url.render_as_string(hide_password=False),
            REPLICA_URLS_VARIABLE: "\n".join(
                url.render_as_string(hide_password=False) for url in servers.replica_urls
            ),
        }
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "benchmarks.request_path.server"),
            *(conf.variant.name, conf.driver, conf.deployment, str(port), conf.server),
            env=env,
        )
        server = cls(process, port)
        try:
            await server._wait_until_serving(conf.label)
        except BaseException:
            await server.stop()
            raise
        return server

    async def _wait_until_serving(self, name: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}") as client:
            while time.monotonic() < deadline:
                if self.process.returncode is not None:
                    raise RuntimeError(f"the {name} server exited with {self.process.returncode}")
                try:
                    if (await client.get("/rows/1")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass  # not listening yet
                await asyncio.sleep(0.1)
        raise RuntimeError(f"the {name} server did not answer within {START_TIMEOUT:g} s")

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server process has used so far."""
        with open(f"/proc/{self.process.pid}/stat") as stat:
            # Fields 14 and 15 (utime, stime), counted after the parenthesised name.
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()  # uvicorn shuts down, and its lifespan closes the pool
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()


def over_http(servers_for: Callable[[Configuration], Servers]) -> Opener:
    """Start a configuration's server, with an HTTP client for it; stop both on the way out."""

    @asynccontextmanager
    async def open_endpoint(conf: Configuration) -> AsyncIterator[Endpoint]:
        server = await UvicornServer.start(conf, servers_for(conf))
        try:
            limits = httpx.Limits(max_connections=max(CONCURRENCIES))
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{server.port}", limits=limits
            ) as client:
                yield Endpoint(_sender(client), server.cpu_seconds)
        finally:
            await server.stop()

    return open_endpoint


def _sender(client: httpx.AsyncClient) -> Send:
    async def send(call: Call) -> tuple[int, bytes]:
        headers = {"content-type": "application/json"} if call.body else None
        response = await client.request(call.method, call.path, content=call.body, headers=headers)
        return response.status_code, response.content

    return send


def _free_port() -> int:
    # Another process could take it before the server binds it; on a bench machine
    # that race is not worth a handshake with the child.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
