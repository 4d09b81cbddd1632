"""Serialization failures (40001) on demand, for tests of retries and on-commit hooks.

PostgreSQL raises them under real contention only by chance; these raise one at
the chosen statement, or at COMMIT, the one a client cannot see coming.
"""

from __future__ import annotations

import asyncpg

# A statement that fails as a lost serialization conflict would.
RAISE_SERIALIZATION_FAILURE = (
    "DO $$BEGIN RAISE EXCEPTION 'forced conflict' USING ERRCODE = 'serialization_failure'; END$$"
)


async def fail_commit_when(
    observer: asyncpg.Connection,
    table: str,
    column: str,
    condition: str = "serialization_failure",
) -> None:
    """Make COMMIT fail with 40001 after an INSERT into `table` whose `column` is true.

    A deferred constraint trigger, checked at COMMIT as SERIALIZABLE's own checks
    are; `condition` names another error to raise. Undo it with `drop_fail_commit`.
    """
    await observer.execute(
        f"""
        CREATE FUNCTION {table}_fail_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.{column} THEN
                RAISE EXCEPTION 'forced conflict at COMMIT' USING ERRCODE = '{condition}';
            END IF;
            RETURN NULL;
        END$$;
        CREATE CONSTRAINT TRIGGER {table}_fail_commit AFTER INSERT ON {table}
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {table}_fail_commit();
        """
    )


async def drop_fail_commit(observer: asyncpg.Connection, table: str) -> None:
    """Remove what `fail_commit_when` made (its trigger goes with the function)."""
    await observer.execute(f"DROP FUNCTION IF EXISTS {table}_fail_commit() CASCADE")
