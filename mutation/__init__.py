"""Mutation testing of app/database/ with cosmic-ray: `make mutation` (see run.py)."""
