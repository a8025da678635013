"""Shared fixtures. Fixture groups live in their own modules and are registered here."""

pytest_plugins = ["tests.fixtures_models", "tests.fixtures_storage"]
