"""Exponential backoff for transient failures (HTTP 429, 5xx, timeouts, dropped connections)."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")
log = logging.getLogger("pie_lib.llm")


@dataclass
class RetryPolicy:
    """How often and how patiently to retry a transient failure.

    Attempt ``i`` (0-based) that fails transiently waits ``min(max_delay_s, base_delay_s * 2**i)``
    seconds, stretched by up to ``jitter`` (a fraction), or the server's ``Retry-After`` when it is
    shorter than ``max_delay_s``.
    """

    max_retries: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    jitter: float = 0.1

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None and 0 <= retry_after <= self.max_delay_s:
            return retry_after
        d = min(self.max_delay_s, self.base_delay_s * (2**attempt))
        return d * (1.0 + self.jitter * random.random())


class TransientError(Exception):
    """Raised by a request function for a failure worth retrying; ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def with_retries(fn: Callable[[], T], policy: RetryPolicy, what: str, sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn``; on :class:`TransientError` wait and retry up to ``policy.max_retries`` times.

    Returns:
        ``fn()``'s value.
    Raises:
        TransientError: the last transient failure, once the retries are used up. Any other
        exception propagates at once.
    """
    attempt = 0
    while True:
        try:
            return fn()
        except TransientError as exc:
            if attempt >= policy.max_retries:
                raise
            wait = policy.delay(attempt, exc.retry_after)
            log.warning("%s: %s; retry %d/%d in %.2fs", what, exc, attempt + 1, policy.max_retries, wait)
            sleep(wait)
            attempt += 1
