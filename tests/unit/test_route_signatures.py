"""The two route-signature traps the package README's "Route code" warns about, and their fixes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.exceptions import DependencyScopeError

from app.database import AsyncSessionDep


def test_a_session_after_a_defaulted_parameter_is_a_syntax_error() -> None:
    source = "async def create(name: str = 'x', db: AsyncSessionDep): ..."
    with pytest.raises(SyntaxError):
        compile(source, "<route>", "exec")
    # The fixes: the session first, or keyword-only parameters.
    compile("async def create(db: AsyncSessionDep, name: str = 'x'): ...", "<route>", "exec")
    compile("async def create(*, name: str = 'x', db: AsyncSessionDep): ...", "<route>", "exec")


async def current_user(db: AsyncSessionDep) -> AsyncIterator[str]:
    yield "ada"


def test_a_yield_dependency_on_the_session_needs_the_function_scope() -> None:
    app = FastAPI()
    with pytest.raises(
        DependencyScopeError, match='cannot depend on dependencies with scope "function"'
    ):

        @app.get("/me")
        async def me(user: Annotated[str, Depends(current_user)]) -> str:
            return user

    @app.get("/me")
    async def me_fixed(user: Annotated[str, Depends(current_user, scope="function")]) -> str:
        return user
