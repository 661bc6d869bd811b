"""The session count the processes of one relay share (relay.ingest.tally)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from relay.ingest import tally
from relay.ingest.tally import TOO_MANY, TOO_MANY_FROM_YOU, SessionTally


def handles(path: Path, processes: int = 3) -> list[SessionTally]:
    tally.create(path, processes)
    return [SessionTally(path, processes, index) for index in range(processes)]


def test_limits_hold_across_processes(tmp_path: Path) -> None:
    first, second, third = handles(tmp_path / "sessions")
    # A client's sessions land on different processes; the limit is on all of them.
    assert first.admit("192.0.2.7", 100, 3) == (None, True)
    assert second.admit("192.0.2.7", 100, 3) == (None, True)
    assert third.admit("192.0.2.7", 100, 3) == (None, True)
    assert second.admit("192.0.2.7", 100, 3) == (TOO_MANY_FROM_YOU, False)
    assert first.admit("198.51.100.1", 100, 3) == (None, True), "others are not held back"
    assert third.admit("198.51.100.2", 4, 3) == (TOO_MANY, False)
    assert first.sessions() == 4 and first.sessions("192.0.2.7") == 3

    second.release("192.0.2.7")
    assert third.admit("192.0.2.7", 100, 3) == (None, True)
    assert second.sessions("192.0.2.7") == 3


def test_a_release_never_takes_another_process_below_zero(tmp_path: Path) -> None:
    first, second, _ = handles(tmp_path / "sessions")
    first.admit("192.0.2.7", 100, 3)
    second.release("192.0.2.7")  # second holds none of them
    assert first.sessions("192.0.2.7") == 1 and first.sessions() == 1


def test_the_sessions_of_a_dead_process_are_forgotten(tmp_path: Path) -> None:
    first, second, _ = handles(tmp_path / "sessions")
    for _ in range(2):
        second.admit("192.0.2.7", 100, 2)
    assert first.admit("192.0.2.7", 100, 2) == (TOO_MANY_FROM_YOU, False)
    first.forget(second.index)
    assert first.sessions() == 0
    assert first.admit("192.0.2.7", 100, 2) == (None, True)


def test_rows_of_past_clients_make_room_and_live_ones_are_kept(tmp_path: Path) -> None:
    first, second, _ = handles(tmp_path / "sessions")
    second.admit("192.0.2.7", 10**6, 5)
    second.admit("192.0.2.7", 10**6, 5)
    # Every other row is taken by a client that came and went.
    for n in range(tally.ROWS - 1):
        address = f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"
        assert first.admit(address, 10**6, 5) == (None, True)
        first.release(address)
    # A new address finds no free row: the empty rows go, the live one stays.
    assert first.admit("203.0.113.9", 10**6, 5) == (None, True)
    assert first.sessions("192.0.2.7") == 2 and first.sessions() == 3


def test_with_every_row_live_a_new_client_is_let_in_uncounted(tmp_path: Path) -> None:
    (first,) = handles(tmp_path / "sessions", processes=1)
    for n in range(tally.ROWS):
        assert first.admit(f"10.0.{n // 256}.{n % 256}", 10**6, 5) == (None, True)
    assert first.admit("203.0.113.9", 10**6, 5) == (None, False)
    first.release("203.0.113.9")
    assert first.sessions() == tally.ROWS


def _take(path: str, index: int, tries: int, admitted: multiprocessing.Queue[int]) -> None:
    handle = SessionTally(Path(path), 2, index)
    admitted.put(sum(handle.admit("192.0.2.7", 10**6, 700)[1] for _ in range(tries)))


def test_two_processes_racing_for_the_last_places_never_pass_the_limit(tmp_path: Path) -> None:
    tally.create(tmp_path / "sessions", 2)
    context = multiprocessing.get_context("spawn")
    admitted: multiprocessing.Queue[int] = context.Queue()
    racers = [
        context.Process(target=_take, args=(str(tmp_path / "sessions"), i, 500, admitted))
        for i in range(2)
    ]
    for racer in racers:
        racer.start()
    counts = [admitted.get(timeout=60) for _ in racers]
    for racer in racers:
        racer.join(timeout=60)
    assert sum(counts) == 700
    assert SessionTally(tmp_path / "sessions", 2, 0).sessions("192.0.2.7") == 700
