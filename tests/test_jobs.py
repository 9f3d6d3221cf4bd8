"""The shared job queue: one job at a time, in arrival order, with a bound."""

from __future__ import annotations

import threading
import time

import pytest

from pipelines.core.jobs import JobCancelled, JobQueue, NoWorkers, QueueFull


def test_jobs_run_one_at_a_time_in_arrival_order():
    queue = JobQueue()
    order, running = [], []
    gate = threading.Event()

    def worker(i):
        job = queue.new_job("txt2img", owner=f"user{i}")
        with queue.run(job):
            running.append(i)
            assert len(running) == 1, "two jobs ran at once"
            order.append(i)
            if i == 0:
                gate.wait(5)
            time.sleep(0.01)
            running.remove(i)

    threads = [threading.Thread(target=worker, args=(0,))]
    threads[0].start()
    while queue.running() is None:
        time.sleep(0.001)
    for i in range(1, 6):
        t = threading.Thread(target=worker, args=(i,))
        t.start()
        threads.append(t)
        while queue.waiting() < i:  # make the arrival order deterministic
            time.sleep(0.001)
    gate.set()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4, 5]
    assert queue.running() is None


def hold_slot(queue: JobQueue, kind: str, entered: threading.Event, release: threading.Event) -> None:
    with queue.run(queue.new_job(kind)):
        entered.set()
        release.wait(5)


def test_full_queue_refuses_with_a_clear_message():
    queue = JobQueue(max_waiting=1)
    release = threading.Event()
    first_in, second_in = threading.Event(), threading.Event()
    threads = [threading.Thread(target=hold_slot, args=(queue, "a", first_in, release))]
    threads[0].start()
    first_in.wait(5)
    threads.append(threading.Thread(target=hold_slot, args=(queue, "b", second_in, release)))
    threads[1].start()
    while queue.waiting() < 1:
        time.sleep(0.001)
    with pytest.raises(QueueFull, match=r"^Queue full \(1 waiting\), try again in a moment$"):
        with queue.run(queue.new_job("c")):
            pass
    release.set()
    for t in threads:
        t.join(5)
    assert second_in.is_set(), "the waiting job still ran after the refusal"
    assert queue.running() is None and queue.waiting() == 0


def test_a_waiting_job_hears_how_many_are_ahead_as_it_moves_up():
    queue = JobQueue()
    release = [threading.Event() for _ in range(2)]
    entered = [threading.Event() for _ in range(2)]
    heard: list[int] = []
    first = threading.Thread(target=hold_slot, args=(queue, "a", entered[0], release[0]))
    first.start()
    entered[0].wait(5)
    second = threading.Thread(target=hold_slot, args=(queue, "b", entered[1], release[1]))
    second.start()
    while queue.waiting() < 1:
        time.sleep(0.001)
    mine = queue.new_job("c", owner="me")

    def wait_my_turn():
        with queue.run(mine, on_wait=heard.append):
            heard.append("ran")

    third = threading.Thread(target=wait_my_turn)
    third.start()
    while queue.waiting() < 2:
        time.sleep(0.001)
    assert queue.ahead(mine) == 2 and queue.first_waiting("me") is mine
    release[0].set()  # the first job ends: one ahead now
    entered[1].wait(5)
    while heard[-1] != 1:
        time.sleep(0.001)
    release[1].set()
    for t in (first, second, third):
        t.join(5)
    assert heard == [2, 1, 0, "ran"]
    assert queue.ahead(mine) == -1 and queue.first_waiting("me") is None


def test_a_job_that_starts_at_once_hears_nothing_and_check_room_refuses_early():
    queue = JobQueue(max_waiting=1)
    heard: list[int] = []
    with queue.run(queue.new_job("a"), on_wait=heard.append):
        queue.check_room()  # one may still wait
    assert heard == []
    assert queue.capacity() == 2 and JobQueue().capacity() is None
    with pytest.raises(QueueFull):
        JobQueue(max_waiting=0).check_room()


def test_a_job_interrupted_while_it_waits_leaves_the_queue_without_running():
    queue = JobQueue()
    release, entered = threading.Event(), threading.Event()
    first = threading.Thread(target=hold_slot, args=(queue, "a", entered, release))
    first.start()
    entered.wait(5)
    mine = queue.new_job("b", owner="me")
    outcome = []

    def wait_my_turn():
        try:
            with queue.run(mine):
                outcome.append("ran")
        except JobCancelled:
            outcome.append("cancelled")

    waiter = threading.Thread(target=wait_my_turn)
    waiter.start()
    while queue.waiting() < 1:
        time.sleep(0.001)
    mine.control.interrupt()
    waiter.join(5)
    assert outcome == ["cancelled"] and queue.waiting() == 0
    assert queue.running() is not None  # the running job was not touched
    release.set()
    first.join(5)
    with queue.run(queue.new_job("c")):  # and the queue goes on
        outcome.append("next ran")
    assert outcome[-1] == "next ran"


def test_with_two_slots_two_jobs_run_at_once_and_the_third_waits_its_turn():
    queue = JobQueue(slots=2)
    releases = [threading.Event() for _ in range(3)]
    entered = [threading.Event() for _ in range(3)]
    told: list[int] = []
    jobs = [queue.new_job("txt2img", owner=f"user{i}") for i in range(3)]

    def worker(i):
        with queue.run(jobs[i], on_wait=told.append if i == 2 else None):
            entered[i].set()
            releases[i].wait(5)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for i, thread in enumerate(threads[:2]):
        thread.start()
        assert entered[i].wait(5)
    threads[2].start()
    while queue.waiting() < 1:
        time.sleep(0.001)
    assert queue.running_jobs() == jobs[:2] and queue.running() is jobs[0]
    assert queue.ahead(jobs[2]) == 2 and not entered[2].is_set()  # the running jobs of every slot count
    assert queue.capacity() is None and JobQueue(max_waiting=3, slots=2).capacity() == 5
    releases[1].set()  # a slot frees: the waiting job starts while the first still runs
    assert entered[2].wait(5)
    assert queue.running_jobs() == [jobs[0], jobs[2]] and told == [2, 0]
    for release in releases:
        release.set()
    for thread in threads:
        thread.join(5)
    assert queue.running_jobs() == [] and queue.running() is None


def test_no_slots_refuses_a_job_at_once_until_slots_return():
    live = [0]
    queue = JobQueue(max_waiting=4, slots=lambda: live[0])  # e.g. the live workers of a cluster
    with pytest.raises(NoWorkers, match="No workers available"):
        with queue.run(queue.new_job("txt2img")):
            pass
    assert isinstance(NoWorkers(), QueueFull)  # callers that say "try again later" say it for this too
    live[0] = 1
    with queue.run(queue.new_job("txt2img")) as job:
        assert queue.running() is job
