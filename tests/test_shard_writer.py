"""The cache stage's background shard-set writer: several sets written at once, committed in order.

The stage-level checks (the same bytes with several writers, the output key) are in test_cache.py."""

from __future__ import annotations

import threading
import time

import pytest

from mmsae.caching import CacheWriteError, SetBuffer, SetWriter, WrittenSet

WAIT_S = 30


class _Recorder:
    """Stand-ins for the stage's write and commit: they log what happened, in order, and can be held back."""

    def __init__(self, hold: int | None = None, fail: int | None = None, fail_commit: int | None = None):
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.hold, self.fail, self.fail_commit = hold, fail, fail_commit

    def _log(self, what: str, index: int) -> None:
        with self.lock:
            self.events.append((what, index))

    def write(self, index: int, buf: SetBuffer, end_image: int) -> WrittenSet:
        if index == self.hold:
            assert self.release.wait(WAIT_S), "the held set was never released"
        if index == self.fail:
            raise OSError(f"disk full while writing set {index}")
        self._log("files", index)
        return WrittenSet({"index": index}, 100 + index)

    def commit(self, index: int, written: WrittenSet, progress: dict) -> None:
        assert written.record == {"index": index}
        if index == self.fail_commit:
            raise OSError(f"record of set {index} refused")
        self._log("commit", index)

    def of(self, what: str) -> list[int]:
        with self.lock:
            return [i for w, i in self.events if w == what]


def _submit_all(writer: SetWriter, count: int) -> None:
    for index in range(count):
        writer.submit(index, SetBuffer.empty(index, ["h"]), index + 1, {"next_shard": index + 1})


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert condition(), what


def test_later_sets_written_first_are_committed_only_after_the_earlier_ones():
    rec = _Recorder(hold=0)
    writer = SetWriter(rec.write, rec.commit, writers=3)
    try:
        _submit_all(writer, 4)
        _wait_for(lambda: sorted(rec.of("files")) == [1, 2, 3], "sets 1..3 written while set 0 is held")
        assert rec.of("commit") == []  # nothing is counted while set 0's files are missing
        rec.release.set()
        assert writer.reap(in_flight=0) == 100 + 101 + 102 + 103
    finally:
        writer.close()
    assert rec.of("commit") == [0, 1, 2, 3]
    assert rec.of("files")[-1] == 0


@pytest.mark.parametrize(("failure", "error"), [
    ({"fail": 1}, "disk full while writing set 1"),
    ({"fail_commit": 1}, "record of set 1 refused"),
    ({"fail": 1, "hold": 1}, "disk full while writing set 1"),  # fails after sets 2 and 3 are written
])
def test_a_failed_set_stops_the_commits_at_it_and_raises_its_own_error_first(failure, error):
    rec = _Recorder(**failure)
    writer = SetWriter(rec.write, rec.commit, writers=3)
    try:
        _submit_all(writer, 4)
        if rec.hold is not None:
            _wait_for(lambda: sorted(rec.of("files")) == [0, 2, 3], "sets 0, 2 and 3 written while 1 is held")
            rec.release.set()
        with pytest.raises(OSError, match=error):
            writer.reap(in_flight=0)
        with pytest.raises(CacheWriteError, match="shard set 2 not .*set 1 before it failed"):
            writer.reap(in_flight=0)
    finally:
        writer.close()
    assert rec.of("commit") == [0]


def test_closing_drops_the_sets_not_started():
    rec = _Recorder(hold=0)
    writer = SetWriter(rec.write, rec.commit, writers=1)
    _submit_all(writer, 4)
    closer = threading.Thread(target=writer.close)
    closer.start()
    time.sleep(0.2)  # close() is waiting for set 0, the one being written
    rec.release.set()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    assert rec.of("files") == [0]  # sets 1..3 were queued behind it: neither written nor recorded
    assert rec.of("commit") in ([], [0])


def test_writer_count_must_be_positive():
    with pytest.raises(ValueError, match="writers must be at least 1, got 0"):
        SetWriter(lambda *a: None, lambda *a: None, writers=0)  # type: ignore[arg-type, return-value]


def test_the_benchmark_measures_both_targets_at_tiny_shapes():
    from bench import cache as bench_cache

    figures = bench_cache.writer_throughput(2, sets=3, rows=64, width=16)
    for target in ("local", "s3"):
        rates = figures[target]["bytes_per_s"]
        assert set(rates) == {"1", "2"} and min(rates.values()) > 0
        assert len(figures[target]["runs"]["2"]) == bench_cache.WRITER_REPS

