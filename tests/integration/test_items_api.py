"""The item routes on PostgreSQL, each test isolated by the rollback fixture."""

# Collected here with this directory's `client` (the rollback fixture).
from tests.item_routes import *  # noqa: F403  (pytest collects the imported tests)
