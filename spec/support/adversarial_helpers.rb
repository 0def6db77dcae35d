# frozen_string_literal: true

# Shared by spec/adversarial: a worker on spec/fixtures/adversarial, and child Ruby processes.
module AdversarialHelpers
  ADVERSARIAL_TEMPLATES = File.join(FIXTURES, "adversarial")

  # Raised into handler threads by the specs (a stand-in for any stray Thread#raise).
  class Poke < StandardError; end

  # Records what a HandlerPool logs (it takes any logger answering #error(message, context)).
  class RecordingLogger
    attr_reader :errors

    def initialize
      @errors = Queue.new
    end

    def error(message, context = {})
      @errors << [message, context]
    end
  end

  # Raises RetryableError with `retry_after` on a step's first attempt, succeeds on the next.
  class RetryAfterHandler < TaskerCore::StepHandler::Base
    class << self
      attr_accessor :retry_after
    end

    def call(_task, _sequence, step)
      raise TaskerCore::RetryableError.new("later", retry_after: self.class.retry_after) if step.attempts == 1

      { "attempt" => step.attempts }
    end
  end

  def adversarial_config(**config)
    { templates: ADVERSARIAL_TEMPLATES, namespaces: ["adversarial"] }.merge(config)
  end

  def create_adversarial_task(name = "once", context = {})
    TaskerCore.create_task(namespace: "adversarial", name: name, context: context)
  end

  def monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  # A successful completion for a step event taken by hand.
  def success_for(event)
    { event_id: event[:event_id], task_uuid: event[:task_uuid], step_uuid: event[:step_uuid], success: true,
      result: { "ok" => true } }
  end

  # Wait until `thread` sleeps (for a handler thread: waiting inside next_step_event, GVL released).
  def until_asleep(thread, timeout: 5)
    deadline = monotonic + timeout
    Thread.pass until thread.status == "sleep" || !thread.alive? || monotonic > deadline
    thread.status == "sleep"
  end
end
