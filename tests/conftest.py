"""Root fixtures: the package's own pytest plugin gives the rollback-isolated database."""

# pytester runs inner pytest sessions for the plugin's own tests.
pytest_plugins = ["app.database.pytest_plugin", "pytester"]
