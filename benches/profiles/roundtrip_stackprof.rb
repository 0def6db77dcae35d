# frozen_string_literal: true

# A Ruby-level profile of the round trip's per-step path. The handler loop runs on the main thread
# here (stackprof samples the main thread), on a worker bootstrapped through FFI with no handler
# threads of its own. Needs Debian's ruby-stackprof (not a dependency of the gem):
#   apt-get install ruby-stackprof && ruby benches/profiles/roundtrip_stackprof.rb

require_relative "../bench_helper"
require "stackprof"
require "tmpdir"

ffi = TaskerCore::FFI
ffi.bootstrap_worker(templates: Bench::TEMPLATES, log_level: "error", concurrency: 1, task_retention: 100_000)
bridge = TaskerCore::Worker::EventBridge.instance
bridge.start!
subscriber = TaskerCore::Worker::StepExecutionSubscriber.new
bridge.subscribe_to_step_execution { |event| subscriber.call(event) }

run = lambda do |tasks|
  tasks.times { ffi.create_task({ namespace: "bench", name: "wide" }) }
  done = 0
  while done < tasks * 64
    event = ffi.next_step_event(1.0)
    raise "the worker stopped" if event.nil?
    next unless event

    bridge.dispatch_step_execution(event)
    done += 1
  end
end
run.call(100)
out = File.join(Dir.tmpdir, "tasker_roundtrip.stackprof")
StackProf.run(mode: :cpu, interval: 50, raw: true, out: out) { run.call(Bench.size(2_000, 20)) }
ffi.stop_worker
system("stackprof", out, "--limit", "30")
