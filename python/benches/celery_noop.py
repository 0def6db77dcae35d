"""The Celery app api.py compares with: one no-op task, broker and results on the local Redis.

Loaded by the Celery worker api.py starts (``celery -A celery_noop worker``, this directory as its
working directory) and by api.py's client threads. ``CELERY_REDIS_URL`` picks the Redis database
(default 15, which api.py flushes before each run).
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = os.environ.get("CELERY_REDIS_URL", "redis://127.0.0.1:6379/15")
QUEUE = "tasker_bench"

app = Celery("tasker_bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    # JSON as in most deployments (and as tasker_core's contexts and results).
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # Results are read once, right away: no need to keep them a day.
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="tasker_bench.noop")
def noop():
    """Does nothing, like the tasker_core handler it is compared with."""
    return None
