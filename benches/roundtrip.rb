# frozen_string_literal: true

# In-memory round trip with no-op handlers (event out to Ruby, completion back), concurrency 1
# and 4, beside the baseline: the same per-step Ruby work with no engine.
#   rake bench:roundtrip       (CONCURRENCIES=1,4,16 measures others)

require_relative "bench_helper"
require_relative "baseline"

steps_per_run = Bench.size(200_000, 2_000)
tasks = steps_per_run / 64

def run_once(tasks)
  before = TaskerCore::FFI.worker_status[:steps_processed]
  started = Bench.now
  uuids = Array.new(tasks) { TaskerCore.create_task(namespace: "bench", name: "wide") }
  uuids.each { |u| TaskerCore.wait_for_task(u, timeout: 600) }
  (TaskerCore::FFI.worker_status[:steps_processed] - before) / (Bench.now - started)
end

Bench.header("in-memory round trip, no-op handlers", "rake bench:roundtrip")
baseline = Array.new(Bench::RUNS) { Baseline.steps_per_second(steps_per_run) }
puts format("   baseline (plain Ruby, no engine): median %d steps/s  runs: %s", Bench.median(baseline),
            baseline.map(&:round).join(", "))
ENV.fetch("CONCURRENCIES", "1,4").split(",").map { |c| Integer(c) }.each do |concurrency|
  Bench.start_worker(concurrency: concurrency, task_retention: tasks * 2)
  run_once([tasks / 10, 1].max) # warm-up
  rates = Array.new(Bench::RUNS) { run_once(tasks) }
  Bench.stop_worker
  median = Bench.median(rates)
  puts format("   engine, concurrency %d: median %d steps/s (%.2fx baseline's time per step)  runs: %s",
              concurrency, median, Bench.median(baseline) / median, rates.map(&:round).join(", "))
end
