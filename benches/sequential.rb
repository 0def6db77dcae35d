# frozen_string_literal: true

# A sequential 4-step workflow: time per task (create -> all four steps done), one task at a time.
#   rake bench:sequential

require_relative "bench_helper"

tasks = Bench.size(2_000, 20)
Bench.header("sequential 4-step workflow, one task at a time", "rake bench:sequential")
Bench.start_worker(concurrency: 1)
per_run = Array.new(Bench::RUNS) do
  times = Array.new(tasks) do
    started = Bench.now
    TaskerCore.wait_for_task(TaskerCore.create_task(namespace: "bench", name: "chain4"), timeout: 10)
    Bench.now - started
  end
  [Bench.median(times), Bench.percentile(times, 99)]
end
Bench.stop_worker
puts format("   time per task: median %.3f ms (p99 %.3f ms)  runs (median ms): %s",
            Bench.median(per_run.map(&:first)) * 1000, Bench.median(per_run.map(&:last)) * 1000,
            per_run.map { |m, _| format("%.3f", m * 1000) }.join(", "))
