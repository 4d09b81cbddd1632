"""The two peer libraries' variants; they are benchmark-only dependencies.

`requirements-bench.txt` pins them and `make bench` installs them in `.venv-bench`.
Where they are absent (the main venv) `missing()` says so and the run skips them;
mypy, which runs in the main venv, then sees their names as `Any`.
"""

# No `from __future__ import annotations`: FastAPI resolves a route's annotations
# in the module's globals, where the closures' local dependencies are not found.

import importlib

from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import create_async_engine

from .apps import add_session_routes, disposing, pooler_connect_args, pooler_engine_options
from .shape import (
    INSERT_ROW_TEXT,
    MAX_OVERFLOW,
    POOL_SIZE,
    SELECT_ROW_TEXT,
    Created,
    RowIn,
    RowOut,
    row_out,
)

BENCH_HINT = "`make bench` installs requirements-bench.txt"


def missing(module: str, distribution: str, hint: str = BENCH_HINT) -> str | None:
    """Why the peer `module` cannot run here, or None if it imports."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        return f"{distribution} is not installed ({hint})"
    except ImportError as error:  # installed, but broken against these versions
        return f"{distribution} does not import: {error}"
    return None


def advanced_alchemy_app(url: URL, pooled: bool) -> FastAPI:
    """(d) advanced-alchemy's FastAPI extension, committing after a 2xx response."""
    # unused-ignore: the ignore is needed only where the peer is not installed.
    from advanced_alchemy.extensions.fastapi import (  # type: ignore[import-not-found, unused-ignore]
        AdvancedAlchemy,
        AsyncSessionConfig,
        EngineConfig,
        SQLAlchemyAsyncConfig,
    )

    config = SQLAlchemyAsyncConfig(
        connection_string=url.render_as_string(hide_password=False),
        engine_config=EngineConfig(
            pool_size=POOL_SIZE,
            max_overflow=MAX_OVERFLOW,
            # Behind a pooler, the driver's settings its users need (apps.py).
            **({"connect_args": pooler_connect_args(url)} if pooled else {}),
        ),
        session_config=AsyncSessionConfig(expire_on_commit=False),
        commit_mode="autocommit",
    )
    app = FastAPI()
    # Adds its session middleware, and wraps the lifespan to dispose of the engine.
    alchemy = AdvancedAlchemy(config=config, app=app)
    return add_session_routes(app, Depends(alchemy.provide_session()))


def fastapi_async_sqlalchemy_app(url: URL, pooled: bool) -> FastAPI:
    """(e) fastapi-async-sqlalchemy's middleware and its `db.session`, commit_on_exit."""
    from fastapi_async_sqlalchemy import (  # type: ignore[import-not-found, unused-ignore]
        create_middleware_and_session_proxy,
    )

    # A middleware and proxy of its own: the module's `SQLAlchemyMiddleware, db`
    # pair holds one sessionmaker for the whole process.
    middleware, db = create_middleware_and_session_proxy()
    # custom_engine instead of db_url + engine_args: the same engine, but one the
    # lifespan can dispose of.
    engine = create_async_engine(
        url,
        pool_size=POOL_SIZE,
        max_overflow=MAX_OVERFLOW,
        **pooler_engine_options(url, pooled),
    )

    app = FastAPI(lifespan=disposing(engine))
    app.add_middleware(middleware, custom_engine=engine, commit_on_exit=True)

    @app.get("/rows/{row_id}")
    async def get_row(row_id: int) -> RowOut:
        result = await db.session.execute(SELECT_ROW_TEXT, {"id": row_id})
        row = result.mappings().one_or_none()
        if row is None:
            raise HTTPException(404, "no such row")
        return row_out(row)

    @app.post("/rows", status_code=201)
    async def add_row(body: RowIn) -> Created:
        values = {"name": body.name, "amount": body.amount}
        row_id = await db.session.scalar(INSERT_ROW_TEXT, values)
        return Created(id=row_id)

    return app
