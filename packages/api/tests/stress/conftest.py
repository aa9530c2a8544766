"""The integration tests' fixtures, for the stress tests."""

from ..integration.conftest import client, settings  # noqa: F401
