# frozen_string_literal: true

# Where the idle dispatch latency goes, stage by stage. Needs the timestamps that
# dispatch_breakdown.patch adds (it is not applied in normal builds: it costs a few Hash stores
# per step):
#   git apply benches/profiles/dispatch_breakdown.patch && rake compile
#   ruby benches/profiles/dispatch_breakdown.rb
#   git apply -R benches/profiles/dispatch_breakdown.patch && rake compile

require_relative "../bench_helper"

STAGES = [
  ["engine: ready -> event taken by the woken thread", :ready_at_ns, :taken_ns],
  ["GVL re-acquired", :taken_ns, :gvl_ns],
  ["checks (draining, still in flight)", :gvl_ns, :checked_ns],
  ["shared step definition looked up", :checked_ns, :definition_ns],
  ["event Hash built", :definition_ns, :built_ns],
  ["back in Ruby (handler loop)", :built_ns, :ruby_ns],
  ["sequence wrapped", :ruby_ns, :wrapped_ns],
  ["published -> subscriber entered", :wrapped_ns, :entered_ns],
  ["total: ready -> subscriber entered", :ready_at_ns, :entered_ns]
].freeze

rows = []
listener = lambda do |event|
  entered = Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond)
  payload = event.payload
  rows << payload.merge(entered_ns: entered) if payload.key?(:taken_ns)
end
abort "apply dispatch_breakdown.patch first (see the top of this file)" unless File.read(
  File.expand_path("../../ext/tasker_core/src/bridge.rs", __dir__)
).include?("taken_ns")

TaskerCore::Worker::EventBridge.instance.subscribe("step.execution.received", &listener)
Bench.start_worker(concurrency: 1)
Bench.size(2_000, 50).times do
  TaskerCore.wait_for_task(TaskerCore.create_task(namespace: "bench", name: "single"), timeout: 10)
  sleep 0.0005
end
Bench.stop_worker
puts "   idle dispatch, stage by stage (#{rows.size} steps):"
STAGES.each do |label, from, to|
  spans = rows.map { |r| r[to] - r[from] }
  puts format("   %-52s p50 %6.2f µs  p90 %6.2f µs", label, Bench.percentile(spans, 50) / 1000.0,
              Bench.percentile(spans, 90) / 1000.0)
end
