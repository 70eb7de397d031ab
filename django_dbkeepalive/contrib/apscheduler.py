"""APScheduler 3.x integration: an executor that runs every job as a ``keepalive_job``.

Example::

    from apscheduler.schedulers.background import BackgroundScheduler
    from django_dbkeepalive.contrib.apscheduler import KeepaliveThreadPoolExecutor

    scheduler = BackgroundScheduler(
        executors={"default": KeepaliveThreadPoolExecutor(max_workers=10)}
    )
    scheduler.add_job(sync_prices, "interval", minutes=30)  # no decorator needed
    scheduler.start()

or in a configuration dict:
``{"apscheduler.executors.default": {"class":
"django_dbkeepalive.contrib.apscheduler:KeepaliveThreadPoolExecutor", "max_workers": "10"}}``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from apscheduler.executors.pool import ThreadPoolExecutor  # type: ignore[import-untyped]

from ..fresh import Using, _aliases, keepalive_job

__all__ = ["KeepaliveThreadPoolExecutor"]


class _KeepaliveJobView:
    """What APScheduler's ``run_job()`` reads of a job, with ``func`` wrapped.

    The executor hands this to the pool instead of the job itself: the ``Job`` object
    (shared with the scheduler and its job store, which may pickle it by its function's
    reference) is never changed.
    """

    __slots__ = ("_job", "func")

    def __init__(self, job: Any, func: Callable[..., Any]) -> None:
        self._job = job
        self.func = func

    def __getattr__(self, name: str) -> Any:
        return getattr(self._job, name)

    def __str__(self) -> str:  # run_job() logs the job by its str()
        return str(self._job)

    def __repr__(self) -> str:
        return repr(self._job)


class KeepaliveThreadPoolExecutor(ThreadPoolExecutor):  # type: ignore[misc]
    """APScheduler's ``ThreadPoolExecutor`` that applies ``keepalive_job`` to every job.

    Each run starts with healthy connections (one that idled past its limit or was
    closed by the server is replaced) and ends with obsolete ones closed, so pool
    threads neither fail after quiet periods nor hoard connections. ``using`` limits
    this to some aliases (default: all); the other arguments are APScheduler's.

    Example::

        scheduler = BackgroundScheduler(
            executors={"default": KeepaliveThreadPoolExecutor(max_workers=5)}
        )
    """

    def __init__(
        self,
        max_workers: int = 10,
        pool_kwargs: dict[str, Any] | None = None,
        *,
        using: Using = None,
    ) -> None:
        if using is not None:
            _aliases(using)  # an unknown alias fails here, not in every run of every job
        super().__init__(max_workers, pool_kwargs)
        self.using = using

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        # BasePoolExecutor submits run_job(job, ...), which calls job.func(*args,
        # **kwargs) in the pool thread: give it a view whose func is the wrapped one.
        wrapped = keepalive_job(using=self.using)(job.func)
        super()._do_submit_job(_KeepaliveJobView(job, wrapped), run_times)
