# frozen_string_literal: true

# The baseline: the per-step work with no engine, in plain Ruby — build the event Hash the engine
# would hand over, wrap it, call the handler through the subscriber's logic, build the completion.
#   ruby benches/baseline.rb

require_relative "bench_helper"
require "securerandom"

module Baseline
  module_function

  # The template's step definitions, as the engine shares them: built once, frozen.
  DEFINITIONS = Array.new(64) do |index|
    {
      name: "s#{index}", handler: { callable: "Bench::Noop", initialization: {}.freeze }.freeze,
      dependencies: [].freeze,
      retry: { retryable: true, max_attempts: 3, backoff: "exponential", backoff_base_ms: 100,
               max_backoff_ms: 30_000 }.freeze,
      timeout_seconds: 30.0
    }.freeze
  end

  # The event Hash the engine hands over: ids, the task, the step, its dependencies' results.
  def event(task_uuid, index)
    step_uuid = SecureRandom.uuid
    {
      event_id: SecureRandom.uuid, task_uuid: task_uuid, step_uuid: step_uuid,
      task_sequence_step: {
        task: { task_uuid: task_uuid, namespace: "bench", name: "wide", version: "1.0.0", context: {} },
        workflow_step: { step_uuid: step_uuid, name: DEFINITIONS[index][:name], attempts: 1, max_attempts: 3,
                         retryable: true },
        dependency_results: {},
        step_definition: DEFINITIONS[index]
      },
      ready_at_ns: Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond)
    }
  end

  # Per step: build the event, wrap it, resolve and call the handler, build the completion the
  # subscriber builds. No engine, no thread hand-off, no bookkeeping.
  def steps_per_second(steps)
    registry = TaskerCore::Registry::HandlerRegistry.instance
    task_uuid = SecureRandom.uuid
    started = Bench.now
    steps.times do |i|
      data = event(task_uuid, i % 64)
      sequence = TaskerCore::Models::TaskSequenceStepWrapper.new(data[:task_sequence_step])
      handler = registry.resolve(sequence.step_definition.callable).new(config: sequence.step_definition.initialization)
      result = handler.call(sequence.task, sequence, sequence.workflow_step)
      { event_id: data[:event_id], task_uuid: data[:task_uuid], step_uuid: data[:step_uuid], success: true,
        result: result, metadata: {} }
    end
    steps / (Bench.now - started)
  end
end

if $PROGRAM_NAME == __FILE__
  Bench.header("baseline: per-step work in plain Ruby, no engine", "ruby benches/baseline.rb")
  rates = Array.new(Bench::RUNS) { Baseline.steps_per_second(Bench.size(200_000, 2_000)) }
  puts format("   median %d steps/s  runs: %s", Bench.median(rates), rates.map(&:round).join(", "))
end
