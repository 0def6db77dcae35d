# frozen_string_literal: true

# Memory: RSS after warm-up and after 1,000,000 steps through the in-memory engine.
# The memory backend keeps the last `task_retention` finished tasks for task_status (10,000 by
# default); the bench keeps 1,000 (TASK_RETENTION=n to change), so the warm-up fills it and what
# grows after that is not retention but a leak.
#   rake bench:memory

require_relative "bench_helper"

total = Bench.size(1_000_000, 6_400)
warmup = Bench.size(100_000, 1_000)
batch = 64 * 50
retention = Integer(ENV.fetch("TASK_RETENTION", "1000"))

def run_steps(steps, batch)
  done = 0
  while done < steps
    uuids = Array.new(batch / 64) { TaskerCore.create_task(namespace: "bench", name: "wide") }
    uuids.each { |u| TaskerCore.wait_for_task(u, timeout: 600) }
    done += batch
  end
end

Bench.header("memory: RSS over #{total} steps", "rake bench:memory")
rss_start = Bench.rss_mb
runs = Array.new(Bench::RUNS) do
  Bench.start_worker(concurrency: 4, task_retention: retention)
  run_steps(warmup, batch)
  GC.start
  rss_warm = Bench.rss_mb
  started = Bench.now
  run_steps(total, batch)
  elapsed = Bench.now - started
  GC.start
  rss_end = Bench.rss_mb
  Bench.stop_worker
  puts format("   run: %.1f MB after warm-up (%d steps), %.1f MB after %d more (growth %+.1f MB; %.0f steps/s)",
              rss_warm, warmup, rss_end, total, rss_end - rss_warm, total / elapsed)
  [rss_warm, rss_end - rss_warm]
end
puts format("   task_retention %d; RSS %.1f MB at start; median after warm-up %.1f MB; median growth over %d steps " \
            "%+.1f MB; RSS at the end %.1f MB", retention, rss_start, Bench.median(runs.map(&:first)), total,
            Bench.median(runs.map(&:last)), Bench.rss_mb)
