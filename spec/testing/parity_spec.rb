# frozen_string_literal: true

require "spec_helper"
require "tasker_core/testing"

# Each fixture template, run on the real engine and in test mode (inline!): the same final
# statuses. Where steps of one task race each other on a worker (a failure while independent
# steps run), only what does not depend on the race is compared.
RSpec.describe "test mode and the engine agree" do
  include_context "workflow worker"

  templates = [File.join(FIXTURES, "templates"), WorkflowSpecHelpers::TEMPLATES_B]

  def plan(step, **what)
    { "plan" => { step => what.transform_keys(&:to_s) } }
  end

  # [namespace, name, context, compare] — compare :steps (every step's status, attempts, result,
  # error), :task (the task's final status only), or the named steps (and the task's status).
  # A table, one scenario per line.
  def self.scenarios # rubocop:disable Metrics/MethodLength
    [
      ["test", "linear", { "value" => 1 }, :steps],
      ["test", "diamond", {}, :steps],
      ["workflow", "branches", {}, :steps],
      ["workflow", "branches", { "plan" => { "fails" => { "raise" => "permanent" } } }, :task],
      ["workflow", "chain", {}, :steps],
      # `side` starts with `first` or, if `first` fails before a thread took `side`, never (skipped).
      ["workflow", "chain", { "plan" => { "first" => { "raise" => "permanent" } } }, %w[first second third]],
      ["workflow", "chain", { "plan" => { "second" => { "raise" => "standard" } } }, :steps],
      ["workflow", "dag", {}, :steps],
      ["workflow", "edge_timeout", {}, :task],
      ["workflow", "fanout", {}, :steps],
      ["workflow", "pair", {}, :steps],
      ["workflow", "patient", { "plan" => { "slow" => { "sleep" => 0.05 } } }, :steps],
      ["workflow", "quick", { "plan" => { "work" => { "raise" => "retryable", "until_attempt" => 3 } } }, :steps],
      ["workflow", "quick", { "plan" => { "work" => { "raise" => "standard" } } }, :steps],
      ["workflow", "quick", { "plan" => { "work" => { "raise" => "not_implemented" } } }, :steps],
      ["workflow", "retry_exponential", { "plan" => { "flaky" => { "raise" => "standard", "until_attempt" => 3 } } },
       :steps],
      ["workflow", "retry_linear",
       { "plan" => { "flaky" => { "raise" => "retryable", "retry_after" => 0.05, "until_attempt" => 4 } } }, :steps],
      ["workflow", "retry_none", { "plan" => { "flaky" => { "raise" => "permanent" } } }, :steps],
      ["workflow", "retry_none", { "plan" => { "flaky" => { "raise" => "stack" } } }, :steps],
      ["workflow", "stubborn", { "stubborn_for" => 0.4 }, :steps],
      ["workflow", "timeout", { "plan" => { "slow" => { "sleep" => 1 } } }, :steps],
      ["workflow", "wait_timeout", { "plan" => { "careful" => { "sleep" => 0.3, "sleep_attempts" => [1] } } }, :steps]
    ]
  end

  def outcome(status, compare)
    return status[:status] if compare == :task

    steps = compare == :steps ? status[:steps] : status[:steps].select { |s| compare.include?(s[:name]) }
    [status[:status], steps.map { |s| s.slice(:name, :status, :attempts, :result, :error_message) }]
  end

  def run_all(scenarios)
    scenarios.map do |namespace, name, context, compare|
      uuid = TaskerCore.create_task(namespace: namespace, name: name, context: context)
      outcome(TaskerCore.wait_for_task(uuid, timeout: 20), compare)
    end
  end

  it "covers every fixture template" do
    loaded = TaskerCore::FFI.testing_templates(templates: templates)[:templates].map { |t| t[:name] }
    expect(self.class.scenarios.map { |s| s[1] }.uniq).to match_array(loaded)
  end

  it "gives each fixture template's tasks the same final statuses" do
    TaskerCore::Worker::Bootstrap.start!(templates: templates)
    on_engine = run_all(self.class.scenarios)
    TaskerCore::Worker::Bootstrap.instance.shutdown!

    TaskerCore::Testing.config = { templates: templates }
    inline = TaskerCore::Testing.inline! { run_all(self.class.scenarios) }

    self.class.scenarios.zip(on_engine, inline).each do |(_, name, context), engine, test_mode|
      expect(test_mode).to eq(engine), "#{name} #{context.inspect}:\n engine:    #{engine.inspect}\n " \
                                       "test mode: #{test_mode.inspect}"
    end
    expect(on_engine.map { |o| o.is_a?(String) ? o : o.first }.uniq).to contain_exactly("complete", "error")
  ensure
    TaskerCore::Testing.config = nil
  end

  describe "errors" do
    let(:dir) do
      # One step each: two root steps of one task race on a worker (the second may or may not have
      # started when the first fails).
      template_dir("edge.yml" => <<~YAML, "unstorable.yml" => <<~YAML2)
        namespace: edge
        name: cases
        version: 1.0.0
        steps:
          - { name: missing, handler: { callable: ParityHandlers::NotDefined } }
      YAML
        namespace: edge
        name: unstorable
        version: 1.0.0
        steps:
          - { name: unstorable, handler: { callable: ParityHandlers::Unstorable } }
      YAML2
    end

    before do
      stub_const("ParityHandlers::Unstorable", Class.new(TaskerCore::StepHandler::Base) do
        def call(*) = { "nan" => Float::NAN }
      end)
    end

    def attempts
      [
        -> { TaskerCore.create_task(namespace: "edge", name: "nope") },
        -> { TaskerCore.create_task(namespace: "edge", name: "cases", version: "") },
        -> { TaskerCore.create_task(namespace: "edge", name: "cases", context: "text") },
        -> { TaskerCore.create_task(namespace: "edge", name: "cases", context: { "big" => 2**70 }) },
        -> { TaskerCore.create_tasks(namespace: "edge", name: "cases", contexts: [{}, 3]) },
        -> { TaskerCore.task_status("not-a-uuid") },
        -> { TaskerCore.task_status("00000000-0000-4000-8000-000000000000") },
        -> { TaskerCore.task_status(42) },
        *%w[cases unstorable].map do |name|
          lambda {
            status = TaskerCore.wait_for_task(TaskerCore.create_task(namespace: "edge", name: name), timeout: 10)
            status[:steps].map { |s| s.slice(:status, :attempts, :error_message) }
          }
        end
      ]
    end

    def outcomes
      attempts.map do |attempt|
        attempt.call
      rescue StandardError => e
        [e.class, e.message]
      end
    end

    it "raises the same errors and fails the same steps" do
      TaskerCore::Worker::Bootstrap.start!(templates: dir, validate_handlers: false)
      on_engine = outcomes
      TaskerCore::Worker::Bootstrap.instance.shutdown!

      TaskerCore::Testing.config = { templates: dir, validate_handlers: false }
      inline = TaskerCore::Testing.inline! { outcomes }

      expect(inline).to eq(on_engine)
      expect(on_engine.last(2).map { |steps| steps.map { |s| s[:status] } }).to eq([%w[error], %w[error]])
    ensure
      TaskerCore::Testing.config = nil
    end
  end
end
