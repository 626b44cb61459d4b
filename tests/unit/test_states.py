"""The work model's one table of transitions, and the store holding to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from infergate.errors import StoreError
from infergate.store import Store
from infergate.store.db import set_state
from infergate.work.states import (
    TRANSITIONS,
    DeliveryState,
    JobState,
    ResultState,
    SeriesState,
    allowed,
)


def test_every_state_has_its_row_in_the_table() -> None:
    for states in (SeriesState, JobState, ResultState, DeliveryState):
        for state in states:
            assert state in TRANSITIONS, state
    # Targets are states of the same kind: a job never becomes a delivery state.
    for source, targets in TRANSITIONS.items():
        assert all(type(target) is type(source) for target in targets)


def test_states_of_different_units_are_different_keys() -> None:
    # Plain enums: a result's pending and a delivery's are two states, not one string.
    same_values: list[object] = [ResultState.PENDING, DeliveryState.PENDING, JobState.DEAD]
    same_values.append(DeliveryState.DEAD)
    assert len(set(same_values)) == 4


def test_final_and_forbidden_transitions() -> None:
    assert not allowed(DeliveryState.DELIVERED, DeliveryState.SENDING)
    assert not allowed(JobState.QUEUED, JobState.DONE)  # a job runs before it is done
    assert allowed(JobState.RUNNING, JobState.DEAD)


def test_the_store_refuses_a_transition_the_table_does_not_list(
    database: Path | str, tmp_path: Path
) -> None:
    store = Store(database)
    with (
        pytest.raises(StoreError, match=r"jobs: queued -> done is not a transition"),
        store._transaction() as db,
    ):
        set_state(db, "jobs", ("job_id", "x"), (JobState.QUEUED,), JobState.DONE)
