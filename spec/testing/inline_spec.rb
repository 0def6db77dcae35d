# frozen_string_literal: true

require "spec_helper"
require "tasker_core/rspec"

RSpec.describe "TaskerCore::Testing.inline!" do
  include_context "workflow worker"

  let(:testing) { TaskerCore::Testing }

  around do |example|
    testing.config = { templates: [File.join(FIXTURES, "templates"), WorkflowSpecHelpers::TEMPLATES_B] }
    testing.inline! { example.run }
  ensure
    testing.config = nil
  end

  it "runs the whole task in the calling thread before create_task returns, with no worker" do
    uuid = create_test_task(context: { "value" => 10 })

    status = TaskerCore.task_status(uuid)
    expect(status).to include(task_uuid: uuid, namespace: "test", name: "linear", version: "1.0.0",
                              status: "complete", steps_retained: true)
    expect(status[:steps].map { |s| [s[:name], s[:status], s[:attempts], s[:result]] }).to eq(
      [["first", "complete", 1, { "value" => 11 }], ["second", "complete", 1, { "value" => 12 }],
       ["third", "complete", 1, { "value" => 13 }]]
    )
    expect(TaskerCore.wait_for_task(uuid, timeout: 0)).to eq(status.merge(steps: status[:steps]))
    expect(TaskerCore::FFI.worker_status[:running]).to be(false)
  end

  it "gives the handler the thread that called create_task, and the context as the engine stores it" do
    uuid = create_workflow_task("chain", { order: { id: 7, tags: %i[a b] } })

    executions = WorkflowRecorder.for_task(uuid)
    expect(executions.map(&:thread).uniq).to eq([Thread.current])
    expect(executions.first.task.context).to eq("order" => { "id" => 7, "tags" => %w[a b] })
  end

  it "starts steps in dependency order and hands each its dependencies' results" do
    uuid = create_workflow_task("dag")

    order = WorkflowRecorder.for_task(uuid).map(&:name)
    expect(order.index("fetch")).to be < order.index("left")
    expect(order.index("join")).to be > [order.index("left"), order.index("right")].max
    expect(order.last).to eq("finish")
    finish = step_status(TaskerCore.task_status(uuid), "finish")
    expect(finish[:result]).to eq("step" => "finish", "attempt" => 1, "dependencies" => %w[join side])
    expect(finish.keys).to contain_exactly(:step_uuid, :name, :status, :attempts, :result, :metadata,
                                           :error_message, :started_at, :completed_at, :duration_ms)
  end

  it "retries without sleeping: the backoff moves a virtual clock, which the step times show" do
    plan = { "plan" => { "flaky" => { "raise" => "retryable", "until_attempt" => 3, "retry_after" => 3600 } } }
    started = monotonic
    skipped_before = testing.clock.skipped

    uuid = create_workflow_task("retry_linear", plan)

    expect(monotonic - started).to be < 2
    expect(testing.clock.skipped - skipped_before).to be_within(5).of(7200)
    step = step_status(TaskerCore.task_status(uuid), "flaky")
    expect(step).to include(status: "complete", attempts: 3, error_message: nil)
    expect(WorkflowRecorder.for_task(uuid).map(&:attempt)).to eq([1, 2, 3])
    created = Time.iso8601(TaskerCore.task_status(uuid)[:created_at])
    expect(Time.iso8601(step[:started_at]) - created).to be_within(5).of(7200)
  end

  it "waits the template's backoff on the virtual clock when the handler gives no retry_after" do
    plan = { "plan" => { "flaky" => { "raise" => "standard", "until_attempt" => 4 } } }
    skipped_before = testing.clock.skipped

    uuid = create_workflow_task("retry_exponential", plan)

    # 100 ms, 200 ms, 400 ms (backoff_base_ms 100, exponential, max 500)
    expect(testing.clock.skipped - skipped_before).to be_within(0.05).of(0.7)
    expect(step_status(TaskerCore.task_status(uuid), "flaky")).to include(status: "complete", attempts: 4)
  end

  it "gives up after max_attempts with the engine's message, and skips the steps that can no longer run" do
    uuid = create_workflow_task("chain", "plan" => { "first" => { "raise" => "standard" } })

    status = TaskerCore.task_status(uuid)
    expect(status[:status]).to eq("error")
    expect(step_status(status, "first")).to include(
      status: "error", attempts: 3,
      error_message: "RuntimeError: planned standard failure on attempt 3 (gave up after 3 attempts)"
    )
    expect(step_status(status, "first")[:metadata]["backtrace"]).to be_an(Array)
    expect(%w[second third].map { |n| step_status(status, n)[:status] }).to eq(%w[skipped skipped])
    # Ready together with `first`, so already started when it failed: it ends as it would on a worker.
    expect(step_status(status, "side")[:status]).to eq("complete")
  end

  it "fails a step at once on PermanentError and on a non-StandardError" do
    permanent = create_workflow_task("retry_none", "plan" => { "flaky" => { "raise" => "permanent" } })
    not_implemented = create_workflow_task("retry_none", "plan" => { "flaky" => { "raise" => "not_implemented" } })

    expect(step_status(TaskerCore.task_status(permanent), "flaky")).to include(
      status: "error", attempts: 1, error_message: "TaskerCore::PermanentError: planned permanent failure on attempt 1"
    )
    expect(step_status(TaskerCore.task_status(not_implemented), "flaky")).to include(
      status: "error", attempts: 1, error_message: "NotImplementedError: planned not_implemented failure on attempt 1"
    )
  end

  it "interrupts a handler past timeout_seconds with StepTimeoutError, and records the engine's message" do
    uuid = create_workflow_task("timeout", "plan" => { "slow" => { "sleep" => 5 } })

    executions = WorkflowRecorder.for_task(uuid)
    expect(executions.map(&:outcome)).to eq(%i[raised raised])
    expect(executions.map { |e| e.finished_at - e.started_at }).to all(be < 1)
    expect(step_status(TaskerCore.task_status(uuid), "slow")).to include(
      status: "error", attempts: 2, metadata: {},
      error_message: "TaskerCore::StepTimeoutError: attempt 2 of step slow timed out after 0.200s " \
                     "(gave up after 2 attempts)"
    )
  end

  it "lets an on_timeout: wait handler run to its end, and still counts the attempt as timed out" do
    uuid = create_workflow_task("wait_timeout", "plan" => { "careful" => { "sleep" => 0.3, "sleep_attempts" => [1] } })

    expect(WorkflowRecorder.for_task(uuid).map(&:outcome)).to eq(%i[success success])
    expect(step_status(TaskerCore.task_status(uuid), "careful")).to include(status: "complete", attempts: 2)
  end

  it "fails a step whose result is not JSON-able, without retrying, as the engine does" do
    stub_const("TestModeHandlers::Unserializable", Class.new(TaskerCore::StepHandler::Base) do
      def call(*) = { "at" => Object.new }
    end)
    dir = template_dir("bad_result.yml" => <<~YAML)
      namespace: testmode
      name: bad_result
      version: 1.0.0
      steps:
        - { name: only, handler: { callable: TestModeHandlers::Unserializable } }
    YAML
    testing.config = { templates: dir }

    uuid = TaskerCore.create_task(namespace: "testmode", name: "bad_result")

    step = step_status(TaskerCore.task_status(uuid), "only")
    expect(step).to include(status: "error", attempts: 1)
    expect(step[:error_message]).to start_with("ArgumentError: result: a Object is not JSON-able")
  end

  it "refuses, as a worker's start! does, templates naming a handler class that does not exist" do
    dir = template_dir("missing.yml" => <<~YAML)
      namespace: testmode
      name: missing
      version: 1.0.0
      steps:
        - { name: only, handler: { callable: TestModeHandlers::NoSuchHandler } }
    YAML
    engine_error = begin
      TaskerCore::Worker::Bootstrap.start!(templates: dir)
    rescue TaskerCore::ConfigurationError => e
      e
    end
    testing.config = { templates: dir }

    expect(engine_error.message).to include("TestModeHandlers::NoSuchHandler")
    expect { TaskerCore.create_task(namespace: "testmode", name: "missing") }
      .to raise_error(TaskerCore::ConfigurationError, engine_error.message)
  end

  it "fails a step whose handler class does not exist, without retrying (validate_handlers: false)" do
    dir = template_dir("missing.yml" => <<~YAML)
      namespace: testmode
      name: missing
      version: 1.0.0
      steps:
        - { name: only, handler: { callable: TestModeHandlers::NoSuchHandler } }
    YAML
    testing.config = { templates: dir, validate_handlers: false }

    status = TaskerCore.wait_for_task(TaskerCore.create_task(namespace: "testmode", name: "missing"))

    expect(status[:status]).to eq("error")
    expect(step_status(status, "only")).to include(attempts: 1)
    expect(step_status(status, "only")[:error_message])
      .to start_with("NameError: handler class TestModeHandlers::NoSuchHandler not found")
  end

  it "runs a task created by a handler before the handler goes on" do
    stub_const("TestModeHandlers::Parent", Class.new(TaskerCore::StepHandler::Base) do
      def call(*)
        child = TaskerCore.create_task(namespace: "test", name: "linear", context: { "value" => 100 })
        { "child_status" => TaskerCore.task_status(child)[:status] }
      end
    end)
    dir = template_dir("parent.yml" => <<~YAML)
      namespace: testmode
      name: parent
      version: 1.0.0
      steps:
        - { name: spawn, handler: { callable: TestModeHandlers::Parent } }
    YAML
    testing.config = { templates: [dir, File.join(FIXTURES, "templates")] }

    uuid = TaskerCore.create_task(namespace: "testmode", name: "parent")

    expect(step_status(TaskerCore.task_status(uuid), "spawn")[:result]).to eq("child_status" => "complete")
    expect(testing.tasks.map(&:name)).to eq(%w[parent linear])
  end

  it "creates many tasks at once with create_tasks" do
    uuids = TaskerCore.create_tasks(namespace: "test", name: "linear", contexts: [{ "value" => 1 }, { "value" => 5 }])

    results = uuids.map { |u| step_status(TaskerCore.task_status(u), "third")[:result] }
    expect(results).to eq([{ "value" => 4 }, { "value" => 8 }])
    expect(TaskerCore.wait_for_tasks(uuids, timeout: 1).map { |s| s[:task_uuid] }).to eq(uuids)
  end

  it "retries a failed task from its failed step, attempts going on counting" do
    stub_const("TestModeHandlers::Declines", Class.new(TaskerCore::StepHandler::Base) do
      class << self
        attr_accessor :declining
      end

      def call(_task, sequence, step)
        raise TaskerCore::PermanentError, "declined" if self.class.declining

        { "retried" => step.attempts, "from" => sequence.dependency_results.keys }
      end
    end)
    dir = template_dir("retried.yml" => <<~YAML)
      namespace: testmode
      name: retried
      version: 1.0.0
      steps:
        - { name: first, handler: { callable: TestHandlers::Noop } }
        - { name: second, dependencies: [first], handler: { callable: TestModeHandlers::Declines } }
        - { name: third, dependencies: [second], handler: { callable: TestHandlers::Noop } }
    YAML
    testing.config = { templates: [dir, File.join(FIXTURES, "templates")] }
    TestModeHandlers::Declines.declining = true
    uuid = TaskerCore.create_task(namespace: "testmode", name: "retried")
    expect(TaskerCore.task_status(uuid)[:steps].map { |s| s[:status] }).to eq(%w[complete error skipped])
    TestModeHandlers::Declines.declining = false

    expect(TaskerCore.retry_task(uuid)).to be(true)

    status = TaskerCore.task_status(uuid)
    expect(status[:status]).to eq("complete")
    expect(step_status(status, "second")).to include(attempts: 2, result: { "retried" => 2, "from" => ["first"] })
    expect(step_status(status, "first")).to include(attempts: 1)
    expect { TaskerCore.retry_task(uuid) }
      .to raise_error(TaskerCore::ConfigurationError, /is complete: only a task that ended in error/)
    expect(TaskerCore.cancel_task(uuid)).to be(false)
  end

  it "restores the previous mode after a block" do
    testing.fake! { expect(testing.mode).to eq(:fake) }
    expect(testing.mode).to eq(:inline)
  end

  describe "errors, as the engine raises them" do
    it "an unknown template, listing the known ones" do
      expect { TaskerCore.create_task(namespace: "test", name: "nope") }.to raise_error(
        TaskerCore::ConfigurationError, %r{\Aunknown template test/nope@1\.0\.0 \(known: .*test/linear@1\.0\.0}
      )
    end

    it "a context that is not JSON-able, or not a Hash" do
      expect { TaskerCore.create_task(namespace: "test", name: "linear", context: { "at" => Object.new }) }
        .to raise_error(TaskerCore::ConfigurationError, /\Acontext: a Object is not JSON-able/)
      expect { TaskerCore.create_task(namespace: "test", name: "linear", context: [1]) }
        .to raise_error(TaskerCore::ConfigurationError, "contexts[0]: must be a Hash")
    end

    it "an unknown task uuid" do
      expect do
        TaskerCore.task_status(SecureRandom.uuid)
      end.to raise_error(TaskerCore::TaskNotFoundError, /never created/)
      expect { TaskerCore.task_status("nope") }
        .to raise_error(TaskerCore::TaskNotFoundError, 'unknown task "nope": not a UUID')
    end

    it "a bad template: the same ConfigurationError as a worker's bootstrap" do
      dir = template_dir("cycle.yml" => <<~YAML)
        namespace: testmode
        name: cycle
        version: 1.0.0
        steps:
          - { name: a, dependencies: [b], handler: { callable: TestHandlers::Noop } }
          - { name: b, dependencies: [a], handler: { callable: TestHandlers::Noop } }
      YAML
      engine_error = begin
        TaskerCore::Worker::Bootstrap.start!(templates: dir)
      rescue TaskerCore::ConfigurationError => e
        e
      end
      testing.config = { templates: dir }

      expect(engine_error).to be_a(TaskerCore::ConfigurationError)
      expect(engine_error.message).to include("dependency cycle")
      expect { TaskerCore.create_task(namespace: "testmode", name: "cycle") }
        .to raise_error(TaskerCore::ConfigurationError, engine_error.message)
    end
  end
end
