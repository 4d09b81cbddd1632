"""The service's infrastructure; the database package is copied in here."""
