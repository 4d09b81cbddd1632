"""`python -m benchmarks.request_path.server VARIANT DRIVER DEPLOYMENT PORT SERVER`: one server.

SERVER names the uvicorn stack, a key of SERVER_STACKS: `asyncio+h11` or
`uvloop+httptools`, passed to uvicorn as `loop` and `http`, never left to `auto`.

Started by the `--http` pass, one process per configuration; the database URL
(PostgreSQL's or PgBouncer's) comes in `BENCH_SERVER_URL`, and the replicas' (one a
line) in `BENCH_SERVER_REPLICA_URLS`, rather than on the command line, where `ps`
would show them.
"""

from __future__ import annotations

import os
import sys

import uvicorn
from sqlalchemy.engine import make_url

from .variants import SERVER_STACKS, Configuration, Servers, by_name

URL_VARIABLE = "BENCH_SERVER_URL"
REPLICA_URLS_VARIABLE = "BENCH_SERVER_REPLICA_URLS"


def main() -> None:
    name, driver, deployment, port, server = sys.argv[1:6]
    conf = Configuration(by_name(name), driver, deployment, server)
    loop, http = SERVER_STACKS[server]
    replica_urls = os.environ.get(REPLICA_URLS_VARIABLE, "").split()
    servers = Servers(
        make_url(os.environ[URL_VARIABLE]), tuple(make_url(url) for url in replica_urls)
    )
    app = conf.make_app(servers)
    # Access logs off: writing a line per request would be most of what is measured.
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(port),
        loop=loop,
        http=http,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
