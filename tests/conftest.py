"""Fixtures every tier may use; their machinery lives in tests/support."""

from tests.support.cluster import (  # noqa: F401  (registered with pytest by being imported here)
    _agents_die_with_the_tests,
    _own_dev_trust,
    make_cluster,
    shared_cluster,
)
