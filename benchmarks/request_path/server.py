"""`python -m benchmarks.request_path.server VARIANT DRIVER DEPLOYMENT PORT`: one under uvicorn.

Started by the `--http` pass, one process per configuration; the database URL
(PostgreSQL's or PgBouncer's) comes in `BENCH_SERVER_URL` rather than on the
command line, where `ps` would show it.
"""

from __future__ import annotations

import os
import sys

import uvicorn
from sqlalchemy.engine import make_url

from .variants import Configuration, by_name

URL_VARIABLE = "BENCH_SERVER_URL"


def main() -> None:
    name, driver, deployment, port = sys.argv[1:5]
    conf = Configuration(by_name(name), driver, deployment)
    app = conf.make_app(make_url(os.environ[URL_VARIABLE]))
    # Access logs off: writing a line per request would be most of what is measured.
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
