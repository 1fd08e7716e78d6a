from __future__ import annotations

import threading

import pytest

from kvtier.errors import JobTimeoutError
from kvtier.job import Job


@pytest.mark.parametrize("poll", [None, lambda: 0])
def test_wait_has_a_deadline_and_returns_when_the_last_part_is_done(poll: object) -> None:
    job = Job("get", 3, poll)  # type: ignore[arg-type]
    job.add_parts()
    job.fail([2])
    job.seal()
    with pytest.raises(JobTimeoutError):
        job.wait(0.05)
    assert not job.done()
    threading.Timer(0.05, job.part_done, args=([0],)).start()
    result = job.wait(30)
    assert job.done() and result.failed == (0, 2) and result.num_succeeded == 1
