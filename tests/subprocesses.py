"""Running Python in a fresh interpreter, for tests of what only a new process shows."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Result:
    """How a finished subprocess exited, and what it wrote."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """Both streams, stdout first: for failure messages and "never printed" checks."""
        return self.stdout + self.stderr


async def run_python(*args: str, cwd: Path, env: Mapping[str, str]) -> Result:
    """Run `python *args` with this interpreter to completion, capturing both streams."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None, "communicate() returned before the process exited"
    # A stray byte in a traceback must not hide the traceback behind a UnicodeDecodeError.
    return Result(
        process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")
    )
