"""Fixtures of the cluster tier; their machinery lives in tests/support."""

from tests.support.agent import procs  # noqa: F401  (registered with pytest by being imported here)
