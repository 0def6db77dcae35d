# frozen_string_literal: true

# Memory: RSS after warm-up and after 1,000,000 steps through the in-memory engine.
#   rake bench:memory

require_relative "bench_helper"

total = Bench.size(1_000_000, 5_000)
warmup = Bench.size(100_000, 1_000)
batch = 64 * 50

def run_steps(steps, batch)
  done = 0
  while done < steps
    uuids = Array.new(batch / 64) { TaskerCore.create_task(namespace: "bench", name: "wide") }
    uuids.each { |u| TaskerCore.wait_for_task(u, timeout: 600) }
    done += batch
  end
end

Bench.header("memory: RSS over #{total} steps", "rake bench:memory")
Bench.start_worker(concurrency: 4)
rss_start = Bench.rss_mb
run_steps(warmup, batch)
GC.start
rss_warm = Bench.rss_mb
started = Bench.now
run_steps(total, batch)
elapsed = Bench.now - started
GC.start
rss_end = Bench.rss_mb
steps = TaskerCore::FFI.worker_status[:steps_processed]
Bench.stop_worker
puts format("   RSS: %.1f MB at start, %.1f MB after warm-up (%d steps), %.1f MB after %d more steps " \
            "(growth %+.1f MB; %.0f steps/s)", rss_start, rss_warm, warmup, rss_end, steps - warmup,
            rss_end - rss_warm, (steps - warmup) / elapsed)
