# frozen_string_literal: true

# Publish throughput of TaskerCore::Events::Publisher with 1 block subscriber.
#   ruby benches/publisher_bench.rb
# Measured (Ruby 3.1.7, x86_64, 2 shared vCPUs, 5 invocations): 1.70M-1.93M publishes/s, typically ~1.87M,
# i.e. ~0.5 us per publish; the only per-publish allocation is the Event object.

require "benchmark"
require_relative "../lib/tasker_core/events/publisher"

# Minimal publisher, as the EventBridge uses it.
class BenchPublisher
  include TaskerCore::Events::Publisher

  def initialize
    register_event("step.execution.received")
  end
end

PUBLISHES = 200_000
RUNS = 5
PAYLOAD = { event_id: "e-1", task_uuid: "t-1", step_uuid: "s-1" }.freeze

# @return [Float] seconds for PUBLISHES publishes (one run)
def timed_run(publisher)
  Benchmark.realtime do
    i = 0
    while i < PUBLISHES
      publisher.publish("step.execution.received", PAYLOAD)
      i += 1
    end
  end
end

publisher = BenchPublisher.new
received = 0
publisher.subscribe("step.execution.received") { |_event| received += 1 }
timed_run(publisher) # warm-up

times = Array.new(RUNS) { timed_run(publisher) }.sort
median = times[RUNS / 2]
abort "delivered #{received}, expected #{PUBLISHES * (RUNS + 1)}" unless received == PUBLISHES * (RUNS + 1)

puts format("ruby %<ruby>s: %<rate>d publishes/s (median of %<runs>d runs x %<n>d, 1 block subscriber)",
            ruby: RUBY_VERSION, rate: (PUBLISHES / median).round, runs: RUNS, n: PUBLISHES)
