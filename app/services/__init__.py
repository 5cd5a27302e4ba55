"""Keyword-only service functions shared by routes, the CLI, workers and tests."""
