# frozen_string_literal: true

require "spec_helper"
require "tasker_core/rspec"

module RunStepHandlers
  # Adds the context's "amount" to the dependency "subtotal"'s "amount", with the configured fee.
  class Total < TaskerCore::StepHandler::Base
    def call(task, sequence, step)
      subtotal = sequence.dependency_result(:subtotal)["amount"]
      success(result: { total: subtotal + task.context["amount"] + config.fetch("fee", 0), attempt: step.attempts,
                        step: step.name },
              metadata: { "computed_by" => self.class.name })
    end
  end

  # Fails as the context asks.
  class Failing < TaskerCore::StepHandler::Base
    def call(task, _sequence, step)
      case task.context["fail"]
      when "retryable" then raise TaskerCore::RetryableError.new("busy", retry_after: 7)
      when "permanent" then raise TaskerCore::PermanentError, "card declined"
      when "standard" then raise ArgumentError, "bad input on attempt #{step.attempts}"
      when "unserializable" then { "at" => Object.new }
      when "sleep" then sleep(task.context["seconds"]) && { "slept" => true }
      else { "ok" => true }
      end
    end
  end
end

RSpec.describe "TaskerCore::Testing.run_step" do
  let(:testing) { TaskerCore::Testing }

  after { TaskerCore.configuration.handler_middleware.clear }

  it "runs one handler and returns its completion, data as the engine stores it" do
    completion = testing.run_step(RunStepHandlers::Total, context: { amount: 5 },
                                                          dependency_results: { subtotal: { amount: 10 } },
                                                          config: { fee: 2 }, attempt: 2)

    expect(completion).to include(success: true, result: { "total" => 17, "attempt" => 2, "step" => "total" },
                                  metadata: { "computed_by" => "RunStepHandlers::Total" })
    expect(completion).to complete_with(total: 17, attempt: 2, step: "total")
    expect(completion).not_to complete_with(total: 18, attempt: 2, step: "total")
  end

  it "classifies errors as the worker does" do
    retryable = testing.run_step(RunStepHandlers::Failing, context: { fail: "retryable" })
    permanent = testing.run_step(RunStepHandlers::Failing, context: { fail: "permanent" })
    standard = testing.run_step(RunStepHandlers::Failing, context: { fail: "standard" }, attempt: 3)

    expect(retryable).to include(success: false, retryable: true, retry_after: 7.0,
                                 error_class: "TaskerCore::RetryableError", error_message: "busy")
    expect(permanent).to include(success: false, retryable: false, error_class: "TaskerCore::PermanentError")
    expect(standard).to include(success: false, retryable: true, error_class: "ArgumentError",
                                error_message: "bad input on attempt 3")
    expect(standard[:metadata]["backtrace"].first).to include("run_step_spec.rb")
  end

  it "fails, not retryable, a result the engine cannot store" do
    completion = testing.run_step(RunStepHandlers::Failing, context: { fail: "unserializable" })

    expect(completion).to include(success: false, retryable: false, error_class: "ArgumentError")
    expect(completion[:error_message]).to start_with("result: a Object is not JSON-able")
  end

  it "interrupts a handler past timeout_seconds" do
    started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    completion = testing.run_step(RunStepHandlers::Failing, context: { fail: "sleep", seconds: 30 },
                                                            timeout_seconds: 0.1)

    # Interrupted, not left to sleep its 30 s (the margin is for slow runs, e.g. under GC.stress).
    expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).to be < 10
    expect(completion).to include(success: false, timed_out: true, retryable: true,
                                  error_message: "TaskerCore::StepTimeoutError: attempt 1 of step failing " \
                                                 "timed out after 0.100s")
  end

  it "resolves a callable name through the HandlerRegistry, as a worker does" do
    expect(testing.run_step("RunStepHandlers::Failing")).to complete_with("ok" => true)
    expect(testing.run_step("RunStepHandlers::Missing"))
      .to include(success: false, retryable: false, error_class: "NameError")
  end

  it "runs anonymous handler classes" do
    handler = Class.new(TaskerCore::StepHandler::Base) { def call(task, *) = { "seen" => task.context } }

    expect(testing.run_step(handler, context: { "a" => 1 })).to complete_with("seen" => { "a" => 1 })
  end

  it "runs the handler middleware around the handler" do
    stub_const("TagMiddleware", Class.new do
      def call(step_event)
        step_event[:task_sequence_step].task.context["tagged"] = true
        yield
      end
    end)
    handler = Class.new(TaskerCore::StepHandler::Base) { def call(task, *) = { "tagged" => task.context["tagged"] } }
    TaskerCore.configure { |c| c.handler_middleware.add(TagMiddleware) }

    expect(testing.run_step(handler)).to complete_with("tagged" => true)
  end

  it "refuses options it does not know" do
    expect { testing.run_step(RunStepHandlers::Failing, atempt: 2) }
      .to raise_error(ArgumentError, /unknown option\(s\) atempt/)
  end

  it "explains a failed complete_with" do
    completion = testing.run_step(RunStepHandlers::Failing, context: { fail: "permanent" })

    expect { expect(completion).to complete_with("ok" => true) }.to raise_error(
      RSpec::Expectations::ExpectationNotMetError,
      /to complete with \{"ok"=>true\}, but it failed: TaskerCore::PermanentError: card declined/
    )
  end
end
