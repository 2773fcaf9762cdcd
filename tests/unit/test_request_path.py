"""The request path's parts that spare the event loop the GIL's hand-offs: the access log's lines kept and written
together (all of them, in order, once, by the time it closes), and request ids drawn from a pool."""

from __future__ import annotations

import io
import logging

from serving.access_log import ACCESS_LOGGER, BatchedLines, batched_access_log


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_lines_are_written_together_in_order_and_the_handlers_come_back() -> None:
    logger = logging.getLogger(ACCESS_LOGGER)
    stream = CountingStream()
    own = logging.StreamHandler(stream)
    own.setFormatter(logging.Formatter("%(message)s"))
    saved, logger.handlers[:] = logger.handlers[:], [own]
    saved_level, saved_propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        installed = batched_access_log(every_s=60)  # no timed write during the test
        assert [type(h) for h in logger.handlers] == [BatchedLines]
        assert batched_access_log().handler is None  # a second app in the process leaves it as it is
        for i in range(100):
            logger.info('127.0.0.1 - "POST /v1/predict HTTP/1.1" %d', i)
        assert stream.getvalue() == ""  # kept: nothing written on the request's way
        installed.close()
        assert logger.handlers == [own]
        lines = stream.getvalue().splitlines()
        assert lines == [f'127.0.0.1 - "POST /v1/predict HTTP/1.1" {i}' for i in range(100)]
        assert stream.writes == 1
        logger.info("after")  # the logger's own handler again
        assert stream.getvalue().endswith("after\n") and stream.writes == 2
    finally:
        logger.handlers[:] = saved
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate


def test_a_logger_without_handlers_is_left_alone() -> None:
    logger = logging.getLogger(ACCESS_LOGGER)
    saved, logger.handlers[:] = logger.handlers[:], []
    try:
        installed = batched_access_log()
        assert logger.handlers == []
        installed.close()
    finally:
        logger.handlers[:] = saved


def test_request_ids_are_unique_random_hex() -> None:
    from serving.app import RequestIds

    ids = RequestIds()
    drawn = [ids() for _ in range(3 * RequestIds.BATCH + 7)]  # across refills of the pool
    assert len(set(drawn)) == len(drawn)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in drawn)
    assert len({i[:8] for i in drawn}) > len(drawn) - 5  # not a counter: the leading digits differ too
