"""GroupLag: the figures `visionstream lag` prints and the replicas a lag scaler would run."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference.settings import BatchSettings
from streams.service.lag import GroupLag, PartitionLag, default_threshold

partitions = st.lists(
    st.tuples(st.one_of(st.none(), st.integers(0, 500)), st.integers(0, 50), st.integers(0, 1000)), min_size=0, max_size=16,
)


def group(found) -> GroupLag:
    return GroupLag("g", tuple(PartitionLag("uploads", index, committed, start, end) for index, (committed, start, end) in enumerate(found)))


@given(partitions, st.integers(1, 500))
def test_replicas_follow_the_lag_scalers_rule(found, threshold):
    lag = group(found)
    replicas = lag.replicas(threshold)
    lagging = sum(1 for p in lag.partitions if p.lag > 0)
    assert replicas == min(math.ceil(lag.total / threshold), lagging)
    assert (replicas == 0) == (lag.total == 0)  # one replica at least while anything waits
    assert replicas <= len(lag.partitions) and lag.replicas(threshold, max_replicas=1) <= 1


def test_a_partition_never_committed_counts_from_its_first_offset_and_the_default_threshold_is_a_workers_work_in_hand():
    lag = group([(None, 10, 70), (70, 0, 70), (80, 0, 70)])  # never committed; caught up; committed past a stale end
    assert [p.lag for p in lag.partitions] == [60, 0, 0] and lag.total == 60
    assert default_threshold(BatchSettings()) == 120 and default_threshold(BatchSettings(size=10, max_in_flight=5)) == 50
    assert lag.as_dict(120)["replicas"] == 1
    with pytest.raises(ValueError, match="threshold"):
        lag.replicas(0)
