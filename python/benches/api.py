"""The Python task API and round trip on the memory backend, beside Celery's no-op jobs/s in the same run.

The Python counterpart of benches/api.rb and benches/roundtrip.rb:

- create_task, task_status (finished task), wait_for_task (finished task): p50/p99 per call;
- single-step no-op tasks/s at concurrency 4, created one by one with create_task from CLIENTS client
  threads and awaited with wait_for_task (then one task at a time per client; then in bulk with
  create_tasks + wait_for_tasks), with the CPU each kind of thread spent per task;
- the round trip: 64-step no-op tasks, steps/s at concurrency 1 and 4;
- Celery (when installed): a no-op job enqueued one by one with delay() from CLIENTS client threads and
  awaited with AsyncResult.get(), broker and results on the local Redis, a worker of concurrency 4 per
  pool in CELERY_POOLS; the ratio of the tasks/s above to its jobs/s.

Medians of RUNS runs (default 3) with every run shown. BENCH_SMOKE=1: tiny sizes, one run.
    python python/benches/api.py    (CLIENTS=4, RUNS=3, CELERY=0 skips Celery,
                                     CELERY_POOLS=prefork,threads, CELERY_REDIS_URL=redis://127.0.0.1:6379/15)
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_handlers and celery_noop

import tasker_core  # noqa: E402
from tasker_core import ffi  # noqa: E402

SMOKE = os.environ.get("BENCH_SMOKE") == "1"
RUNS = int(os.environ.get("RUNS", "1" if SMOKE else "3"))
CLIENTS = int(os.environ.get("CLIENTS", "4"))
CONCURRENCY = 4
TEMPLATES = str(HERE / "templates")
SINGLE = ("bench", "single")
WIDE = ("bench", "wide")
WIDE_STEPS = 64


def size(full: int, smoke: int) -> int:
    return smoke if SMOKE else full


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[int], pct: float) -> int:
    ordered = sorted(values)
    return ordered[round((len(ordered) - 1) * pct / 100)]


def runs_text(values: list[float]) -> str:
    return ", ".join(f"{value:,.0f}" for value in values)


def report(label: str, rates: list[float], unit: str = "tasks/s") -> float:
    print(f"   {label:<60} median {median(rates):>9,.0f} {unit}  runs: {runs_text(rates)}", flush=True)
    return median(rates)


def start_worker(concurrency: int) -> tasker_core.Worker:
    return tasker_core.Worker.start(
        {
            "templates": [TEMPLATES],
            "concurrency": concurrency,
            "log_level": "error",
            "backend": "memory",
            "task_retention": 200_000,
        }
    )


# -- CPU per thread ----------------------------------------------------------------------------------


def thread_cpu_ns() -> dict[int, tuple[str, int]]:
    """CPU time of every thread of this process so far: {tid: (kind, ns)}; Python threads by their
    Python name, the engine's Rust threads (which Python does not know) as "Rust: <kernel name>"."""
    python_names = {thread.native_id: thread.name for thread in threading.enumerate()}
    # A thread Rust starts without a name keeps the process's name ("python").
    process_name = pathlib.Path("/proc/self/comm").read_text().strip()
    found = {}
    for entry in pathlib.Path("/proc/self/task").iterdir():
        tid = int(entry.name)
        try:
            # schedstat: on-CPU ns first (clock ticks from stat would be 10 ms coarse)
            nanos = int((entry / "schedstat").read_text().split()[0])
            name = python_names.get(tid) or "Rust: " + (entry / "comm").read_text().strip()
            if name == f"Rust: {process_name}":
                name = "Rust: unnamed threads"
        except (FileNotFoundError, ProcessLookupError):
            continue
        found[tid] = ("handler threads" if name.startswith("tasker-handler-") else name, nanos)
    return found


def cpu_groups(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]]) -> dict[str, int]:
    """CPU ns spent between the two readings, by kind of thread."""
    groups: dict[str, int] = {}
    for tid, (kind, nanos) in after.items():
        groups[kind] = groups.get(kind, 0) + nanos - before.get(tid, (kind, 0))[1]
    return groups


def print_cpu(groups: dict[str, int], count: int, per: str) -> None:
    shares = ", ".join(
        f"{kind} {nanos / count / 1000:.1f}"
        for kind, nanos in sorted(groups.items(), key=lambda item: -item[1])
        if nanos / count >= 50
    )
    print(f"     CPU per {per} in the last run, µs: {shares}")


# -- the task API --------------------------------------------------------------------------------------


def latencies(calls: int, call: Callable[[], object]) -> list[int]:
    clock = time.perf_counter_ns
    spent = [0] * calls
    for index in range(calls):
        started = clock()
        call()
        spent[index] = clock() - started
    return spent


def per_call(calls: int) -> dict[str, list[int]]:
    finished = tasker_core.create_task(*SINGLE)
    tasker_core.wait_for_task(finished, timeout=60)
    created: list[str] = []
    figures = {
        # While the worker runs the tasks created: the caller's cost, not the task's.
        "create_task": latencies(calls, lambda: created.append(tasker_core.create_task(*SINGLE))),
        "task_status (finished task)": latencies(calls, lambda: tasker_core.task_status(finished)),
        "wait_for_task (finished task)": latencies(
            calls, lambda: tasker_core.wait_for_task(finished, timeout=60)
        ),
    }
    tasker_core.wait_for_tasks(created, timeout=600)
    return figures


class ClientRun:
    """CLIENTS threads running ``body(share)``; tasks/s over the whole, and the clients' CPU."""

    def __init__(self, tasks: int, body: Callable[[int], None]) -> None:
        self.share = tasks // CLIENTS
        self.body = body
        self.client_cpu_ns = 0
        self.lock = threading.Lock()

    def _client(self) -> None:
        self.body(self.share)
        spent = time.thread_time_ns()
        with self.lock:
            self.client_cpu_ns += spent

    def rate(self) -> float:
        threads = [threading.Thread(target=self._client) for _ in range(CLIENTS)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return self.share * CLIENTS / (time.perf_counter() - started)


def completed(status: dict) -> None:
    """A task that failed would make a fast figure of nothing: stop the benchmark instead."""
    if status["status"] != "complete":
        raise RuntimeError(f"task {status['task_uuid']} ended {status['status']}: {status['steps']}")


def create_then_wait_each(share: int) -> None:
    """Tasks created one at a time, then each awaited: the way most code creates work."""
    uuids = [tasker_core.create_task(*SINGLE) for _ in range(share)]
    for uuid in uuids:
        completed(tasker_core.wait_for_task(uuid, timeout=600))


def closed_loop(share: int) -> None:
    """Each task awaited before the next is created (latency-bound)."""
    for _ in range(share):
        completed(tasker_core.wait_for_task(tasker_core.create_task(*SINGLE), timeout=600))


def bulk(tasks: int, batch: int) -> float:
    started = time.perf_counter()
    uuids: list[str] = []
    for _ in range(tasks // batch):
        uuids.extend(tasker_core.create_tasks(*SINGLE, [{} for _ in range(batch)]))
    finals = tasker_core.wait_for_tasks(uuids, timeout=600)
    rate = len(uuids) / (time.perf_counter() - started)
    for status in finals:
        completed(status)
    return rate


def roundtrip(tasks: int) -> tuple[float, dict[str, int], int]:
    """64-step tasks created one by one and awaited: steps/s, as benches/roundtrip.rb; and the CPU
    by kind of thread, and the steps run."""
    before = ffi.worker_status().steps_processed
    cpu_before = thread_cpu_ns()
    started = time.perf_counter()
    uuids = [tasker_core.create_task(*WIDE) for _ in range(tasks)]
    for uuid in uuids:
        completed(tasker_core.wait_for_task(uuid, timeout=600))
    elapsed = time.perf_counter() - started
    steps = ffi.worker_status().steps_processed - before
    return steps / elapsed, cpu_groups(cpu_before, thread_cpu_ns()), steps


def task_api() -> float:
    calls = size(20_000, 200)
    tasks = size(20_000, 200)
    worker = start_worker(CONCURRENCY)
    try:
        ClientRun(max(tasks // 10, CLIENTS), create_then_wait_each).rate()  # warm-up

        print(f"   per call (memory backend, concurrency {CONCURRENCY}, one caller):")
        runs = [per_call(calls) for _ in range(RUNS)]
        for name in runs[0]:
            p50 = median([percentile(run[name], 50) for run in runs]) / 1000
            p99 = median([percentile(run[name], 99) for run in runs]) / 1000
            spread = f"(medians of {RUNS} runs of {calls} calls)"
            print(f"   {name:<32} p50 {p50:.1f} µs  p99 {p99:.1f} µs  {spread}")

        print(f"   single-step no-op tasks, concurrency {CONCURRENCY}, {CLIENTS} client threads:")
        rates = []
        profile = None
        for _ in range(RUNS):
            run = ClientRun(tasks, create_then_wait_each)
            before = thread_cpu_ns()
            rates.append(run.rate())
            groups = cpu_groups(before, thread_cpu_ns())
            groups["client threads"] = run.client_cpu_ns
            profile = (groups, run.share * CLIENTS)
        single = report("create_task one by one, then wait_for_task each", rates)
        if profile is not None:
            print_cpu(*profile, "task")
        report(
            "create_task + wait_for_task, one task at a time per client",
            [ClientRun(tasks // 4, closed_loop).rate() for _ in range(RUNS)],
        )
        report(
            "create_tasks (batches of 1,000) + wait_for_tasks",
            [bulk(tasks * 2, size(1000, 100)) for _ in range(RUNS)],
        )
    finally:
        worker.stop()
    return single


def round_trips() -> None:
    tasks = size(200_000, 2_000) // WIDE_STEPS
    print(f"   round trip: {WIDE_STEPS}-step no-op tasks, created one by one, awaited:")
    for concurrency in (1, 4):
        worker = start_worker(concurrency)
        try:
            roundtrip(max(tasks // 10, 1))  # warm-up
            runs = [roundtrip(tasks) for _ in range(RUNS)]
            report(f"concurrency {concurrency}", [rate for rate, _, _ in runs], "steps/s")
            print_cpu(runs[-1][1], runs[-1][2], "step")
        finally:
            worker.stop()


# -- Celery --------------------------------------------------------------------------------------------

REDIS_URL = os.environ.get("CELERY_REDIS_URL", "redis://127.0.0.1:6379/15")


def celery_unavailable() -> Optional[str]:
    """Why Celery cannot run here, or None."""
    if os.environ.get("CELERY") == "0":
        return "skipped (CELERY=0)"
    try:
        import celery  # noqa: F401
        import redis
    except ImportError as error:
        return f"not installed (pip install celery redis: {error})"
    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except Exception as error:
        return f"Redis unreachable at {REDIS_URL} ({type(error).__name__}: {error})"
    return None


class CeleryWorker:
    """A ``celery worker`` process with one pool, started on an empty Redis database."""

    def __init__(self, pool: str, concurrency: int, flush: bool = True) -> None:
        import redis

        self.redis = redis.Redis.from_url(REDIS_URL)
        if flush:
            self.redis.flushdb()  # the dedicated database only: queue and results of earlier runs
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "celery", "-A", "celery_noop", "worker", "--loglevel", "WARNING"),
                *("--pool", pool, "--concurrency", str(concurrency), "--hostname", f"tasker-bench-{pool}@%h"),
                # Cluster chatter a lone worker does not need (and that costs it wake-ups).
                *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            ],
            cwd=HERE,
            env={**os.environ, "CELERY_REDIS_URL": REDIS_URL},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        self.process.terminate()  # warm shutdown
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.redis.flushdb()

    def cpu_ns(self) -> int:
        """CPU time so far of the worker process and its pool's child processes (prefork)."""
        pids = [self.process.pid]
        try:
            children = pathlib.Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            pids += [int(pid) for pid in children.read_text().split()]
        except FileNotFoundError:
            pass
        total = 0
        for pid in pids:
            for task in pathlib.Path(f"/proc/{pid}/task").glob("*"):
                try:
                    total += int((task / "schedstat").read_text().split()[0])
                except (FileNotFoundError, ProcessLookupError):
                    continue
        return total

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]


def celery_one_by_one(share: int) -> None:
    from celery_noop import noop

    results = [noop.delay() for _ in range(share)]
    for result in results:
        if result.get(timeout=600) is not None:
            raise RuntimeError(f"Celery job {result.id} returned something: not the no-op job")


def celery_drain(pool: str, jobs: int) -> tuple[float, float]:
    """The Celery worker alone, as benches/api.rb times Sidekiq: ``jobs`` no-op jobs (results ignored)
    enqueued into an empty queue, then a worker started; jobs/s from the first job taken to the
    empty queue, and the worker's CPU µs per job over that time."""
    import redis
    from celery_noop import QUEUE, app, noop

    store = redis.Redis.from_url(REDIS_URL)
    store.flushdb()
    with app.producer_or_acquire() as producer:
        for _ in range(jobs):
            noop.apply_async(producer=producer, ignore_result=True)
    pushed = store.llen(QUEUE)
    worker = CeleryWorker(pool, CONCURRENCY, flush=False)
    try:
        deadline = time.monotonic() + 120
        while store.llen(QUEUE) == pushed:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Celery worker took no job in 120 s:\n{worker.output()}")
            time.sleep(0.001)
        started = time.perf_counter()
        cpu_at_start = worker.cpu_ns()
        taken_at_start = pushed - store.llen(QUEUE)
        while store.llen(QUEUE) > 0:
            time.sleep(0.001)
        elapsed = time.perf_counter() - started
        done = pushed - taken_at_start
        return done / elapsed, (worker.cpu_ns() - cpu_at_start) / done / 1000
    finally:
        worker.stop()


def celery(single: float) -> None:
    why_not = celery_unavailable()
    if why_not:
        print(f"   Celery: {why_not}; no ratio")
        return
    import celery as celery_package

    jobs = size(10_000, 100)
    pools = [pool for pool in os.environ.get("CELERY_POOLS", "prefork,threads").split(",") if pool]
    for pool in pools:
        worker = CeleryWorker(pool, CONCURRENCY)
        try:
            from celery_noop import noop

            try:
                noop.delay().get(timeout=60)  # the worker is up
            except Exception:
                print(worker.output(), file=sys.stderr)
                raise
            ClientRun(max(jobs // 10, CLIENTS), celery_one_by_one).rate()  # warm-up
            rates = [ClientRun(jobs, celery_one_by_one).rate() for _ in range(RUNS)]
        finally:
            worker.stop()
        label = f"Celery {celery_package.__version__}, {pool} pool, concurrency {CONCURRENCY}, local Redis"
        baseline = report(label, rates, "jobs/s")
        print(f"     ratio: single-step tasks/s (one by one) / Celery {pool} = {single / baseline:.2f}x")
        runs = [celery_drain(pool, jobs) for _ in range(RUNS)]
        drained = report(
            f"  its worker alone ({jobs:,} jobs queued first, no results)",
            [rate for rate, _ in runs],
            "jobs/s",
        )
        print(f"     worker CPU per job (process and pool children), µs: {runs_text([c for _, c in runs])}")
        print(f"     ratio: single-step tasks/s (one by one) / that = {single / drained:.2f}x")


def main() -> None:
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    print(
        f"== Python task API and round trip, beside Celery  ({os.cpu_count()} cores, Python "
        f"{platform.python_version()}, tasker_core {tasker_core.__version__}, {rustc or 'rustc ?'}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load average "
        f"{' '.join(f'{load:.2f}' for load in os.getloadavg())})"
    )
    print(f"   command: python python/benches/api.py{'  [smoke run: sizes reduced]' if SMOKE else ''}")
    single = task_api()
    round_trips()
    celery(single)
    print(f"   load average at the end: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")


if __name__ == "__main__":
    main()
