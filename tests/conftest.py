"""Root fixtures: the package's own pytest plugin gives the rollback-isolated database."""

pytest_plugins = ["app.database.pytest_plugin"]
