# frozen_string_literal: true

# Dispatch latency: the engine marks a step ready -> the Ruby handler is entered, on an idle
# worker, one step at a time; beside a plain Rust thread woken the same way in the same run.
#   rake bench:latency

require_relative "bench_helper"

samples = Bench.size(2_000, 50)
Bench.header("dispatch latency (idle worker, one step at a time)", "rake bench:latency")
latencies = []
subscription = lambda do |event|
  latencies << (Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond) - event[:ready_at_ns])
end
ruby_runs = Array.new(Bench::RUNS) do
  latencies.clear
  # Subscribed before the worker's own subscriber, so it runs just before the handler is entered.
  TaskerCore::Worker::EventBridge.instance.subscribe("step.execution.received", &subscription)
  Bench.start_worker(concurrency: 1)
  samples.times do
    uuid = TaskerCore.create_task(namespace: "bench", name: "single")
    TaskerCore.wait_for_task(uuid, timeout: 10)
    sleep 0.0005 # let every thread park, as on an idle worker
  end
  Bench.stop_worker
  TaskerCore::Worker::EventBridge.instance.unsubscribe(subscription)
  latencies.dup
end
rust_runs = Array.new(Bench::RUNS) { TaskerCore::FFI.__measure_thread_wake(samples, 0.0005) }

[["Ruby handler entered (engine ready -> subscriber)", ruby_runs],
 ["plain Rust thread woken the same way (floor)", rust_runs]].each do |label, per_run|
  p50 = Bench.median(per_run.map { |r| Bench.percentile(r, 50) })
  p90 = Bench.median(per_run.map { |r| Bench.percentile(r, 90) })
  p99 = Bench.median(per_run.map { |r| Bench.percentile(r, 99) })
  puts format("   %-52s p50 %s  p90 %s  p99 %s  (median over %d runs of %d)", label, Bench.fmt_us(p50),
              Bench.fmt_us(p90), Bench.fmt_us(p99), per_run.size, samples)
end
ruby_p50 = Bench.median(ruby_runs.map { |r| Bench.percentile(r, 50) })
rust_p50 = Bench.median(rust_runs.map { |r| Bench.percentile(r, 50) })
puts format("   ratio p50 Ruby/Rust: %.2fx", ruby_p50.to_f / rust_p50)
