"""The real-process tests on PostgreSQL: the SIGKILL chain and kills with workers in flight
(test_faults), several `process` runs at once (test_concurrency), and the killed and the
frozen, fenced-off processors of test_leases — the same tests, imported, on a PostgreSQL
database (`engine_name` is "postgres" in this module). Their SQLite runs stay where they are.
The live load through two `serve` instances is in test_pg_live.py."""

import pytest

from test_concurrency import test_concurrent_processors_answer_each_batch_once
from test_faults import (test_kill_again_and_again_including_during_recovery,
                         test_kill_with_concurrent_workers_in_flight)
from test_leases import (test_killed_processor_batch_is_taken_over_by_a_running_one_within_5_s,
                         test_processor_frozen_right_before_its_send_is_fenced_off)

pytestmark = pytest.mark.postgres
__all__ = ["test_concurrent_processors_answer_each_batch_once", "test_kill_again_and_again_including_during_recovery",
           "test_kill_with_concurrent_workers_in_flight",
           "test_killed_processor_batch_is_taken_over_by_a_running_one_within_5_s",
           "test_processor_frozen_right_before_its_send_is_fenced_off"]  # collected here, on PostgreSQL


@pytest.fixture
def engine_name():
    """Every db_path in this module is a PostgreSQL database."""
    return "postgres"
