"""The driver refuses rollouts from outside the adapter window before they reach the learner."""

import pytest

from rl.run import keep_in_window

PUBLISHED = {3: "d3", 4: "d4", 5: "d5"}


def rollouts(versions, digests):
    return {"groups": [[{"v": v}] for v in versions], "versions": versions, "digests": digests}


def test_stale_and_unknown_adapters_are_dropped_and_counted():
    rows = [{"i": i} for i in range(5)]
    r = rollouts([5, 4, 3, 5, 5], ["d5", "d4", "d3", "forged", "d5"])
    kept_rows, kept, refused = keep_in_window(rows, r, PUBLISHED, newest=5, max_staleness=1)
    assert [row["i"] for row in kept_rows] == [0, 1, 4]
    assert kept["versions"] == [5, 4, 5] and [g[0]["v"] for g in kept["groups"]] == [5, 4, 5]
    assert refused == 2  # version 3 is two behind; "forged" is not the digest published for 5


def test_sync_window_keeps_only_the_newest():
    rows = [{"i": 0}, {"i": 1}]
    _, kept, refused = keep_in_window(rows, rollouts([5, 4], ["d5", "d4"]), PUBLISHED, newest=5, max_staleness=0)
    assert kept["versions"] == [5] and refused == 1


def test_nothing_in_window_is_an_error():
    with pytest.raises(RuntimeError, match="outside the adapter window"):
        keep_in_window([{"i": 0}], rollouts([3], ["d3"]), PUBLISHED, newest=5, max_staleness=0)
