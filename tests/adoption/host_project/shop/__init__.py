"""A small shop service: users and their API tokens."""
