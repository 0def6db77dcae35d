# frozen_string_literal: true

# Memory: RSS after warm-up and after 1,000,000 steps through the in-memory engine.
# The memory backend keeps the last `task_retention` finished tasks for task_status (10,000 by
# default); the bench keeps 1,000 (TASK_RETENTION=n to change), so the warm-up fills it and what
# grows after that is not retention but a leak.
#   rake bench:memory                 ONLY=steps | ONLY=retention runs one of its two parts

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

only = ENV.fetch("ONLY", "all")
abort "ONLY must be steps or retention (got #{only.inspect})" unless %w[all steps retention].include?(only)

if only != "retention"
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
end
exit if only == "steps"

# Retention with default settings: TASKS single-step tasks (default 10,000,000) through a worker
# with the default task_retention and task_index_retention. RSS is sampled every tenth of the way;
# it must level off once both are full. Then the README's pattern, checked: 100,000 tasks created
# one by one, then waited on one by one, each answering its real final status.
tasks = Bench.size(Integer(ENV.fetch("TASKS", "10000000")), 20_000)
chunk = 1_000
Bench.header("memory: RSS over #{tasks} single-step tasks, default retention", "rake bench:memory")
Bench.start_worker(concurrency: 4)
samples = []
started = Bench.now
(tasks / chunk).times do |i|
  uuids = TaskerCore.create_tasks(namespace: "bench", name: "single", contexts: Array.new(chunk) { {} })
  uuids.each { |u| TaskerCore.wait_for_task(u, timeout: 600) }
  next unless ((i + 1) * chunk % (tasks / 10)).zero?

  GC.start
  samples << [(i + 1) * chunk, Bench.rss_mb]
  puts format("   %10d tasks: RSS %.1f MB (%.0f tasks/s)", samples.last[0], samples.last[1],
              samples.last[0] / (Bench.now - started))
end
second = samples[1] || samples.first
puts format("   RSS from %d to %d tasks: %+.1f MB (both retentions fill within the first %d tasks)",
            second[0], samples.last[0], samples.last[1] - second[1], 510_000)

wait_n = Bench.size(100_000, 2_000)
uuids = Array.new(wait_n) { TaskerCore.create_task(namespace: "bench", name: "single") }
statuses = uuids.map { |u| TaskerCore.wait_for_task(u, timeout: 600)[:status] }.tally
puts format("   %d tasks created one by one, then waited on one by one: %s", wait_n, statuses.inspect)
Bench.stop_worker
