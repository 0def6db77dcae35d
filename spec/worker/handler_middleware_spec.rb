# frozen_string_literal: true

require "spec_helper"
require "tasker_core/testing"

module MiddlewareSpec
  LOG = Queue.new

  # Records what it sees; the label comes from `add`'s arguments.
  class Recording
    def initialize(label)
      @label = label
    end

    def call(step_event)
      step = step_event[:task_sequence_step].workflow_step
      LOG << "#{@label} in #{step.name}##{step.attempts}"
      yield
    ensure
      LOG << "#{@label} out"
    end
  end

  # The same middleware twice, with different arguments (a chain holds a class once, as Sidekiq's).
  class Outer < Recording; end
  class Inner < Recording; end

  # Raises what the task context says, before the handler.
  class Raising
    def call(step_event)
      case step_event[:task_sequence_step].task.context["middleware_raises"]
      when "standard" then raise "middleware broke"
      when "permanent" then raise TaskerCore::PermanentError, "tenant suspended"
      end
      yield
    end
  end

  # Never yields: the handler is not called.
  class Swallowing
    def call(_step_event)
      LOG << "swallowed"
      :ignored
    end
  end

  # The handler of the spec's template.
  class Work < TaskerCore::StepHandler::Base
    def call(_task, _sequence, step)
      LOG << "handler #{step.name}"
      { "by" => "original" }
    end
  end
end

RSpec.describe "handler middleware" do
  let(:chain) { TaskerCore.configuration.handler_middleware }
  let(:log) { MiddlewareSpec::LOG }
  let(:templates) do
    template_dir("middleware.yml" => <<~YAML)
      namespace: middleware
      name: pair
      version: 1.0.0
      steps:
        - name: first
          handler: { callable: MiddlewareSpec::Work }
          retry: { max_attempts: 2, backoff: none }
        - name: second
          dependencies: [first]
          handler: { callable: MiddlewareSpec::Work }
    YAML
  end

  before { log.clear }

  after do
    chain.clear
    TaskerCore::Testing.disable!
    TaskerCore::Testing.config = {}
  end

  def entries
    Array.new(log.size) { log.pop }
  end

  def run_pair(context = {})
    uuid = TaskerCore.create_task(namespace: "middleware", name: "pair", context: context)
    TaskerCore.wait_for_task(uuid, timeout: 10)
  end

  # Each example runs on a worker and in test mode: the same chain wraps the handler on both.
  shared_examples "the handler call" do
    it "runs inside each middleware, first added outermost, with the step event" do
      chain.add(MiddlewareSpec::Outer, "outer")
      chain.add(MiddlewareSpec::Inner, "inner")

      expect(run_pair[:status]).to eq("complete")

      expect(entries).to eq(["outer in first#1", "inner in first#1", "handler first", "inner out", "outer out",
                             "outer in second#1", "inner in second#1", "handler second", "inner out", "outer out"])
    end

    it "fails the step as a handler raising the same error would, and the worker goes on" do
      chain.add(MiddlewareSpec::Raising)

      retried = run_pair("middleware_raises" => "standard")
      failed_at_once = run_pair("middleware_raises" => "permanent")
      fine = run_pair

      expect(retried[:status]).to eq("error")
      expect(retried[:steps].first).to include(
        status: "error", attempts: 2, error_message: "RuntimeError: middleware broke (gave up after 2 attempts)"
      )
      expect(failed_at_once[:steps].first)
        .to include(status: "error", attempts: 1, error_message: "TaskerCore::PermanentError: tenant suspended")
      expect(fine[:status]).to eq("complete")
      expect(entries).to eq(["handler first", "handler second"])
    end

    it "fails the step at once, not retried, when a middleware does not yield" do
      chain.add(MiddlewareSpec::Recording, "outer")
      chain.add(MiddlewareSpec::Swallowing)

      status = run_pair

      expect(status[:status]).to eq("error")
      expect(status[:steps].map { |s| s[:status] }).to eq(%w[error skipped])
      expect(status[:steps].first).to include(attempts: 1)
      expect(status[:steps].first[:error_message]).to eq(
        "TaskerCore::PermanentError: handler middleware MiddlewareSpec::Swallowing returned without yielding: " \
        "the step's handler was not called (raise TaskerCore::RetryableError from the middleware to run the step " \
        "again later)"
      )
      expect(entries).to eq(["outer in first#1", "swallowed", "outer out"])
    end

    it "resolves the handler class by name at each call: a reloaded class is never stale" do
      expect(run_pair[:steps].first[:result]).to eq("by" => "original")
      original = MiddlewareSpec::Work
      MiddlewareSpec.send(:remove_const, :Work)
      MiddlewareSpec.const_set(:Work, Class.new(TaskerCore::StepHandler::Base) { def call(*) = { "by" => "reloaded" } })

      expect(run_pair[:steps].map { |s| s[:result] }).to eq([{ "by" => "reloaded" }] * 2)
    ensure
      MiddlewareSpec.send(:remove_const, :Work)
      MiddlewareSpec.const_set(:Work, original)
    end
  end

  context "on a worker" do
    before { TaskerCore::Worker::Bootstrap.start!(templates: templates, concurrency: 2) }

    include_examples "the handler call"
  end

  context "in test mode (inline!)" do
    before do
      TaskerCore::Testing.config = { templates: templates }
      TaskerCore::Testing.inline!
    end

    include_examples "the handler call"
  end
end

RSpec.describe TaskerCore::Middleware::Chain do
  subject(:chain) { described_class.new }

  let(:one) { Class.new { def call(*) = yield } }
  let(:two) { Class.new { def call(*) = yield } }
  let(:three) { Class.new { def call(*) = yield } }

  it "adds, inserts before and after, prepends, removes and clears, as Sidekiq's chain does" do
    chain.add(one).add(two)
    chain.insert_before(two, three)
    expect(chain.to_a).to eq([one, three, two])

    chain.insert_after(one, two)
    expect(chain.to_a).to eq([one, two, three])

    chain.prepend(three)
    expect(chain.to_a).to eq([three, one, two])

    chain.add(three) # already there: moved to the end
    expect(chain.to_a).to eq([one, two, three])

    chain.remove(two)
    expect(chain.to_a).to eq([one, three])
    expect(chain.exists?(one)).to be(true)
    expect(chain.exists?(two)).to be(false)

    chain.clear
    expect(chain).to be_empty
  end

  it "builds each middleware anew for every step, with the arguments given to add" do
    seen = []
    counter = Class.new do
      define_method(:initialize) { |tag| seen << [tag, object_id] }
      def call(*) = yield
    end
    chain.add(counter, :apm)

    2.times { expect(chain.invoke({}) { :handled }).to eq(:handled) }

    expect(seen.map(&:first)).to eq(%i[apm apm])
    expect(seen.map(&:last).uniq.size).to eq(2)
  end

  it "refuses what is not a middleware class" do
    expect { chain.add(Object.new) }.to raise_error(ArgumentError, /must be a Class defining call/)
    expect { chain.add(Class.new) }.to raise_error(ArgumentError, /must be a Class defining call/)
  end
end
