"""`python -m benchmarks.request_path.server VARIANT PORT`: one variant under uvicorn.

Started by the `--http` pass, one process per variant; the database URL comes in
`BENCH_SERVER_URL` rather than on the command line, where `ps` would show it.
"""

from __future__ import annotations

import os
import sys

import uvicorn
from sqlalchemy.engine import make_url

from .variants import VARIANTS

URL_VARIABLE = "BENCH_SERVER_URL"


def main() -> None:
    name, port = sys.argv[1], int(sys.argv[2])
    variant = next(v for v in VARIANTS if v.name == name)
    app = variant.make_app(make_url(os.environ[URL_VARIABLE]))
    # Access logs off: writing a line per request would be most of what is measured.
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
