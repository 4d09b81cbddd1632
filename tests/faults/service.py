"""The reference service (or another app) as production runs it: a uvicorn process of its own."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import httpx
from sqlalchemy.engine import URL

from tests.faults.server import free_port
from tests.paths import REPO_ROOT

START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 30.0
# Characters of stderr quoted when the service exits before it is ready.
STDERR_TAIL = 3000


@dataclass
class Service:
    """A running service: where to reach it, and (once stopped) what it wrote."""

    base_url: str
    process: asyncio.subprocess.Process
    stdout: str = ""
    stderr: str = ""


@asynccontextmanager
async def running_service(
    database_url: URL,
    *,
    app: str = "app.main:app",
    ready: Literal["healthy", "answering"] = "healthy",
    log_level: str = "warning",
    uvicorn_args: Sequence[str] = (),
    python_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[Service]:
    """Start uvicorn serving `app` on `database_url`; at exit SIGTERM it unless it has exited.

    `ready` is what to wait for: "healthy", a 200 from /health; "answering", any
    HTTP answer to it (the app's startup is done: uvicorn listens only after it),
    for a database that is down or an app without /health. A test may send its own
    signals to `service.process`; `stdout` and `stderr` are filled in after the exit.
    """
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *python_args,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        log_level,
        *uvicorn_args,
        cwd=REPO_ROOT,
        env={
            **os.environ,
            "DATABASE_URL": database_url.render_as_string(hide_password=False),
            "PYTHONPATH": str(REPO_ROOT),
            **(env or {}),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    service = Service(f"http://127.0.0.1:{port}", process)
    # Read all along: a full pipe would block the process's logging, and so its exit.
    stdout_task = asyncio.create_task(_read_all(process.stdout))
    stderr_task = asyncio.create_task(_read_all(process.stderr))
    try:
        await _wait_until_ready(service, ready, stderr_task)
        yield service
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            process.kill()
            await process.wait()
        service.stdout = await stdout_task
        service.stderr = await stderr_task


async def _read_all(stream: asyncio.StreamReader) -> str:
    return (await stream.read()).decode(errors="replace")


async def _wait_until_ready(
    service: Service, ready: Literal["healthy", "answering"], stderr: asyncio.Task[str]
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    async with httpx.AsyncClient(base_url=service.base_url, timeout=5) as client:
        while time.monotonic() < deadline:
            if service.process.returncode is not None:
                await service.process.wait()
                raise RuntimeError(
                    f"the service exited with {service.process.returncode} before it was "
                    f"ready; its stderr ends:\n{(await stderr)[-STDERR_TAIL:]}"
                )
            try:
                response = await client.get("/health")
            except httpx.TransportError:
                await asyncio.sleep(0.05)
                continue
            if ready == "answering" or response.status_code == 200:
                return
            await asyncio.sleep(0.05)
    raise TimeoutError(f"the service was not {ready} within {START_TIMEOUT_SECONDS} s")
