"""OrphanWatch: a member that holds nothing notices partitions that no member takes."""

from hypothesis import given
from hypothesis import strategies as st

from streams.service.orphans import OrphanWatch, Verdict

P0, P1 = ("uploads", 0), ("uploads", 1)


def test_a_still_partition_with_events_waiting_asks_for_a_rebalance_then_fails_livez():
    watch = OrphanWatch(stall_s=20)
    committed, ends = {P0: 100, P1: None}, {P0: 150, P1: 0}
    assert watch.observe(0, False, committed, ends) is Verdict.FINE
    assert watch.observe(15, False, committed, ends) is Verdict.FINE  # within the window
    assert watch.observe(21, False, committed, ends) is Verdict.REJOIN
    assert [(o.partition, o.waiting) for o in watch.orphans] == [(P0, 50)]  # P1: nothing to take
    assert watch.observe(35, False, committed, ends) is Verdict.FINE  # the rebalance gets its window
    assert watch.observe(42, False, committed, ends) is Verdict.WEDGED
    assert "taken by no member for 42 s" in watch.orphans[0].describe()


def test_a_group_that_moves_or_a_member_that_holds_partitions_is_fine():
    watch = OrphanWatch(stall_s=20)
    for second in range(0, 200, 10):  # another member commits as it goes: lag, but moving
        assert watch.observe(second, False, {P0: second}, {P0: second + 500}) is Verdict.FINE
    assert watch.observe(300, False, {P0: 500}, {P0: 501}) is Verdict.FINE  # one offset: maybe a transaction marker
    assert watch.observe(400, False, {P0: 500}, {P0: None}) is Verdict.FINE  # unknown end: never an orphan
    stuck = OrphanWatch(stall_s=20)
    stuck.observe(0, False, {P0: 0}, {P0: 9})
    assert stuck.observe(30, True, {}, {}) is Verdict.FINE and stuck.orphans == []  # it took partitions: its own watch
    assert stuck.observe(40, False, {P0: 0}, {P0: 9}) is Verdict.FINE  # the window starts again


@given(st.lists(st.tuples(st.floats(0, 30), st.booleans(), st.integers(0, 5), st.integers(0, 10)), max_size=40))
def test_livez_fails_only_after_a_rebalance_was_asked_for_and_a_window_passed(steps):
    watch, now, asked = OrphanWatch(stall_s=10), 0.0, None
    for step, holding, committed, waiting in steps:
        now += step
        verdict = watch.observe(now, holding, {P0: committed}, {P0: committed + waiting})
        if verdict is Verdict.REJOIN:
            asked = now
        if verdict is Verdict.WEDGED:
            assert asked is not None and now - asked > 10 and watch.orphans
        if holding or not watch.orphans:
            asked = None
