"""Coalesced snapshot reloads, for the catalog and the caller policy.

``run()`` returns once a load that began after the call was installed;
callers that ask while one is running share the next one, so a burst of
requests costs at most two loads. ``soon()`` starts one in the background
(a feed callback must not block) and logs a failure instead of raising: the
feed's periodic resync retries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class CoalescedReload:
    def __init__(self, load: Callable[[], Awaitable[None]], *, name: str, what: str) -> None:
        self._load = load
        self._name = name  # of the background tasks: "<name>-reload"
        self._what = what  # what is loaded, for the log
        self._lock = asyncio.Lock()
        self._requested = 0  # reload requests made
        self._served = 0  # requests up to this number are reflected in the snapshot
        self._tasks: set[asyncio.Task[None]] = set()
        self.loads = 0  # how many loads ran (observability and tests)

    async def run(self) -> None:
        self._requested += 1
        wanted = self._requested
        async with self._lock:
            if self._served >= wanted:
                return  # a load that started after our request covered it
            covers = self._requested
            await self._load()
            self._served = covers
            self.loads += 1

    def soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self._logged(),
                                                      name=f"{self._name}-reload")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _logged(self) -> None:
        try:
            await self.run()
        except Exception as exc:  # noqa: BLE001 - the periodic resync retries
            log.warning("reloading %s after a change failed (%s); the periodic resync will "
                        "retry", self._what, type(exc).__name__)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
