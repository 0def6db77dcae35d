# frozen_string_literal: true

# Dispatch latency: the engine marks a step ready -> the Ruby handler's #call is entered, on an
# idle worker, one step at a time; beside plain Rust threads woken the same way in the same run:
#   - "engine-shaped": a creator thread asks an engine thread for work and blocks for the answer;
#     the engine wakes a waiting thread, answers the creator and polls on. This is what happens
#     here (the main thread's create_task is answered as the handler thread is woken), and the
#     floor the ratio is taken against.
#   - "pair": one thread wakes another and sleeps; nothing else wants a core (the lowest wake).
# Also, in the same runs: successor steps in a running workflow (steps 2-4 of a 4-step chain),
# ready when the engine records the previous step's completion.
#   rake bench:latency

require_relative "bench_helper"

samples = Bench.size(2_000, 50)
Bench.header("dispatch latency (idle worker, one step at a time)", "rake bench:latency")
# The handler (Bench::Probe) notes when it is entered; a listener subscribed before the worker's
# subscriber notes when the engine made the step ready (the event's ready_at_ns), keyed by step.
ready = {} # step_uuid => [ready_at_ns, step name]
subscription = lambda do |event|
  ready[event[:step_uuid]] = [event[:ready_at_ns], event[:task_sequence_step].workflow_step.name]
end
latencies = []
successors = []
collect = lambda do
  ready.each do |step_uuid, (ready_at, name)|
    # "only" and "one" (a chain's first step) start on an idle worker; the rest follow a step.
    (%w[only one].include?(name) ? latencies : successors) << (Bench::Probe.entered.fetch(step_uuid) - ready_at)
  end
  ready.clear
  Bench::Probe.entered.clear
end

# Interleaved: each run measures Ruby, then both floors, so that a run's ratio compares
# measurements taken moments apart on this (noisy) machine.
ruby_runs = []
successor_runs = []
engine_runs = []
pair_runs = []
Bench::RUNS.times do
  latencies.clear
  successors.clear
  # Subscribed before the worker's own subscriber, so it runs just before the handler is entered.
  TaskerCore::Worker::EventBridge.instance.subscribe("step.execution.received", &subscription)
  Bench.start_worker(concurrency: 1)
  samples.times do
    uuid = TaskerCore.create_task(namespace: "bench", name: "probe")
    TaskerCore.wait_for_task(uuid, timeout: 10)
    sleep 0.0005 # let every thread park, as on an idle worker
  end
  (samples / 3).times do
    TaskerCore.wait_for_task(TaskerCore.create_task(namespace: "bench", name: "probe_chain"), timeout: 10)
    sleep 0.0005
  end
  Bench.stop_worker
  TaskerCore::Worker::EventBridge.instance.unsubscribe(subscription)
  collect.call
  ruby_runs << latencies.dup
  successor_runs << successors.dup
  engine_runs << TaskerCore::FFI.__measure_thread_wake(samples, 0.0005, "engine")
  pair_runs << TaskerCore::FFI.__measure_thread_wake(samples, 0.0005, "pair")
end

[["Ruby handler entered (engine ready -> #call)", ruby_runs],
 ["  successor step in a running workflow", successor_runs],
 ["plain Rust thread, engine-shaped wake (floor)", engine_runs],
 ["plain Rust thread, pair wake", pair_runs]].each do |label, per_run|
  p50 = Bench.median(per_run.map { |r| Bench.percentile(r, 50) })
  p90 = Bench.median(per_run.map { |r| Bench.percentile(r, 90) })
  p99 = Bench.median(per_run.map { |r| Bench.percentile(r, 99) })
  puts format("   %-52s p50 %s  p90 %s  p99 %s  (median over %d runs of %d)", label, Bench.fmt_us(p50),
              Bench.fmt_us(p90), Bench.fmt_us(p99), per_run.size, samples)
end
ratios = lambda do |floor_runs|
  ruby_runs.zip(floor_runs).map { |r, f| Bench.percentile(r, 50).to_f / Bench.percentile(f, 50) }
end
engine_ratios = ratios.call(engine_runs)
pair_ratios = ratios.call(pair_runs)
puts format("   p50 ratio, Ruby / engine-shaped floor: median %.2fx (runs: %s)", Bench.median(engine_ratios),
            engine_ratios.map { |r| format("%.2f", r) }.join(", "))
puts format("   p50 ratio, Ruby / pair wake:           median %.2fx (runs: %s)", Bench.median(pair_ratios),
            pair_ratios.map { |r| format("%.2f", r) }.join(", "))
