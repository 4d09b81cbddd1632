"""The reference service as production runs it: a uvicorn process of its own."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
from sqlalchemy.engine import URL

from tests.faults.server import free_port
from tests.paths import REPO_ROOT

START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 30.0


@dataclass
class Service:
    """A running service: where to reach it, and (once stopped) what it wrote to stderr."""

    base_url: str
    process: asyncio.subprocess.Process
    stderr: str = ""


@asynccontextmanager
async def running_service(
    database_url: URL, *, app: str = "app.main:app"
) -> AsyncIterator[Service]:
    """Start uvicorn on `database_url` and wait until it answers; SIGTERM it at exit."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url.render_as_string(hide_password=False),
        "PYTHONPATH": str(REPO_ROOT),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    service = Service(f"http://127.0.0.1:{port}", process)
    stderr_task = asyncio.create_task(_read_all(process))
    try:
        await _wait_until_serving(service)
        yield service
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()
        service.stderr = await stderr_task


async def _read_all(process: asyncio.subprocess.Process) -> str:
    assert process.stderr is not None
    return (await process.stderr.read()).decode(errors="replace")


async def _wait_until_serving(service: Service) -> None:
    async with httpx.AsyncClient(base_url=service.base_url, timeout=5) as client:
        for _ in range(int(START_TIMEOUT_SECONDS / 0.05)):
            if service.process.returncode is not None:
                raise RuntimeError(f"the service exited with {service.process.returncode}")
            try:
                response = await client.get("/health")
            except httpx.TransportError:
                await asyncio.sleep(0.05)
                continue
            if response.status_code == 200:
                return
            await asyncio.sleep(0.05)
    raise TimeoutError(f"the service did not become healthy in {START_TIMEOUT_SECONDS} s")
