"""The background loops' pacing over many SKUs (allocator/pacing.py), without servers."""

from __future__ import annotations

from allocator.pacing import Schedule, period
from flashsale.keys import SkuKeys


def test_the_period_grows_with_the_scope_past_the_budget() -> None:
    assert period(10, 0.25, 10_000) == 0.25
    assert period(10_000, 0.25, 10_000) == 1.0
    assert period(0, 0.5, 1000) == 0.5


def test_a_schedule_takes_only_what_is_due_and_follows_its_scope() -> None:
    a, b, c = (SkuKeys("s", name) for name in "abc")
    schedule = Schedule(rescan_s=100.0)
    scope = [a, b]
    assert schedule.due(scope, 0.0) == [a, b]  # new to the scope: due at once
    schedule.busy(a, 0.0)  # had work: due again at once
    schedule.idle(b, 0.0, ceiling_s=1.0)  # none: 10 ms, then doubling up to the ceiling
    assert schedule.due(scope, 0.0) == [a]
    schedule.idle(a, 0.0, ceiling_s=1.0)
    assert schedule.due(scope, 0.005) == []
    assert sorted(k.sku for k in schedule.due(scope, 0.01)) == ["a", "b"]
    for key in (a, b):
        schedule.idle(key, 0.01, ceiling_s=1.0)  # 20 ms
    assert schedule.due(scope, 0.02) == []
    assert len(schedule.due(scope, 0.03)) == 2
    for _ in range(10):
        schedule.idle(a, 0.0, ceiling_s=1.0)
        schedule.due(scope, 5.0)
    schedule.idle(a, 10.0, ceiling_s=1.0)
    assert schedule.due(scope, 10.99) == [] and schedule.due(scope, 11.0) == [a]  # the ceiling
    schedule.idle(a, 11.0, ceiling_s=1.0)
    # Another length (edited in place): c and d are due at once, b is gone.
    scope.remove(b)
    scope += [c, SkuKeys("s", "d")]
    assert [k.sku for k in schedule.due(scope, 11.0)] == ["c", "d"]
    # A round that failed half-way: what was taken and not put back is due at the next look.
    schedule.forget()
    assert [k.sku for k in schedule.due(scope, 11.5)] == ["c", "d"]
    assert schedule.due(scope, 12.0) == [a]
