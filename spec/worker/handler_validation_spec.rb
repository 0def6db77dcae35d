# frozen_string_literal: true

require "fileutils"
require "tmpdir"

# Handlers for the templates below: some good, some broken in each way start! must report.
module HandlerValidationSpec
  class Charge < TaskerCore::StepHandler::Base
    def call(_task, _sequence, _step)
      { "charged" => true }
    end
  end

  class TwoArguments < TaskerCore::StepHandler::Base
    def call(_task, _step)
      {}
    end
  end

  class KeywordStep < TaskerCore::StepHandler::Base
    def call(_task, _sequence, step:)
      { "step" => step }
    end
  end

  class Splat < TaskerCore::StepHandler::Base
    def call(*args)
      { "arguments" => args.size }
    end
  end

  # Subclasses Base but forgot to define #call: every run would raise NotImplementedError.
  class Forgotten < TaskerCore::StepHandler::Base
  end

  # A class with #call that is not a handler: autoload would accept it, the check refuses it.
  class Service
    def call(_task, _sequence, _step)
      {}
    end
  end

  # No #call at all.
  class Model
    attr_reader :id
  end

  module JustAModule
  end

  NOT_A_CLASS = "a string"

  class OddInitialize < TaskerCore::StepHandler::Base
    def initialize(name, config:)
      super(config: config)
      @name = name
    end

    def call(_task, _sequence, _step)
      {}
    end
  end

  # Not a Base subclass, but built and called as the subscriber does: it runs, so it passes.
  class DuckHandler
    def initialize(config: {})
      @config = config
    end

    def call(_task, _sequence, _step)
      { "duck" => true }
    end
  end

  class DuckWithoutConfig
    def call(_task, _sequence, _step)
      {}
    end
  end
end

RSpec.describe TaskerCore::Worker::HandlerValidation do
  let(:bootstrap) { TaskerCore::Worker::Bootstrap.instance }
  let(:registry) { TaskerCore::Registry::HandlerRegistry.instance }

  around do |example|
    Dir.mktmpdir("tasker-validation") do |dir|
      @dir = dir
      example.run
    end
  end

  after do
    bootstrap.shutdown!
    %w[HandlerValidationSpec::Fixed HandlerValidation::Alias].each { |name| registry.unregister(name) }
    HandlerValidationSpec.send(:remove_const, :Fixed) if HandlerValidationSpec.const_defined?(:Fixed, false)
  end

  # One template per call: `steps` maps step name => callable (a chain, in order).
  def template(name, namespace: "validation", dir: @dir, **steps)
    yaml = +"namespace: #{namespace}\nname: #{name}\nversion: 1.0.0\nsteps:\n"
    previous = nil
    steps.each do |step, callable|
      dependencies = previous ? ", dependencies: [#{previous}]" : ""
      yaml << "  - { name: #{step}#{dependencies}, handler: { callable: #{callable} } }\n"
      previous = step
    end
    FileUtils.mkdir_p(dir)
    File.write(File.join(dir, "#{namespace}_#{name}.yml"), yaml)
  end

  def start_error(**config)
    error = nil
    expect { bootstrap.start!({ templates: @dir }.merge(config)) }
      .to raise_error(TaskerCore::ConfigurationError) { |e| error = e }
    error
  end

  def expect_nothing_running
    expect(bootstrap.running?).to be(false)
    expect(TaskerCore::FFI.worker_status).to include(running: false, state: "stopped")
    expect(Thread.list.map(&:name).compact.grep(/\Atasker-handler-/)).to be_empty
    engine_threads = Dir["/proc/self/task/*/comm"].count { |comm| File.read(comm).strip == "tasker-engine" }
    expect(engine_threads).to eq(0)
  end

  it "lets a worker whose handlers all resolve start, and run them" do
    template("order", "charge" => "HandlerValidationSpec::Charge", "any" => "HandlerValidationSpec::Splat")

    bootstrap.start!(templates: @dir)
    uuid = TaskerCore.create_task(namespace: "validation", name: "order")
    expect(TaskerCore.wait_for_task(uuid, timeout: 10)[:status]).to eq("complete")
  end

  it "refuses a typo'd class at start!, naming it, the template and the step" do
    template("order", "charge" => "HandlerValidationSpec::Chrage")

    error = start_error
    expect(error.message).to include("HandlerValidationSpec::Chrage is not defined")
    expect(error.message).to include("validation/order@1.0.0 step charge")
    expect(error.message).to include("validate_handlers: false")
    expect_nothing_running
  end

  it "refuses a constant that is not a StepHandler::Base subclass, saying what it is" do
    template("order", "a" => "HandlerValidationSpec::Service", "b" => "HandlerValidationSpec::Model",
                      "c" => "HandlerValidationSpec::JustAModule", "d" => "HandlerValidationSpec::NOT_A_CLASS")

    message = start_error.message
    expect(message).to include("4 of the 4 handler classes")
    expect(message).to include("HandlerValidationSpec::Service is not a TaskerCore::StepHandler::Base subclass, " \
                               "and has an initialize() that cannot be called as new(config: Hash)")
    expect(message).to include("HandlerValidationSpec::Model is not a TaskerCore::StepHandler::Base subclass " \
                               "(it defines no #call)")
    expect(message).to include("HandlerValidationSpec::JustAModule is a module, not a TaskerCore::StepHandler::Base")
    expect(message).to include("HandlerValidationSpec::NOT_A_CLASS is a String, not a TaskerCore::StepHandler::Base")
    expect_nothing_running
  end

  it "refuses a #call of the wrong arity, showing the signature it has" do
    template("order", "two" => "HandlerValidationSpec::TwoArguments", "kw" => "HandlerValidationSpec::KeywordStep",
                      "none" => "HandlerValidationSpec::Forgotten")

    message = start_error.message
    expect(message).to include("HandlerValidationSpec::TwoArguments has the wrong arity: #call(_task, _step) is " \
                               "called as call(task, sequence, step)")
    expect(message).to include("HandlerValidationSpec::KeywordStep has the wrong arity: " \
                               "#call(_task, _sequence, step:)")
    expect(message).to include("HandlerValidationSpec::Forgotten does not define #call")
  end

  it "lists every problem in one error, each class once with every step that uses it" do
    template("order", "validate" => "HandlerValidationSpec::Charge", "charge" => "HandlerValidationSpec::Chrage",
                      "ship" => "HandlerValidationSpec::TwoArguments", "recharge" => "HandlerValidationSpec::Chrage")
    template("refund", "refund" => "HandlerValidationSpec::Chrage")

    message = start_error.message
    expect(message).to start_with("2 of the 3 handler classes named by the templates cannot run:\n")
    problems = message.lines.grep(/\A  - /)
    expect(problems.size).to eq(2)
    expect(problems.first).to include("HandlerValidationSpec::Chrage is not defined")
    expect(problems.first).to include("used by validation/order@1.0.0 steps charge, recharge; " \
                                      "validation/refund@1.0.0 step refund)")
    expect(problems.last).to include("HandlerValidationSpec::TwoArguments has the wrong arity")
    expect(message).not_to include("HandlerValidationSpec::Charge ")
  end

  it "skips the check with validate_handlers: false (Symbol or String key); the step fails when it runs" do
    template("order", "charge" => "HandlerValidationSpec::Chrage")

    bootstrap.start!(templates: @dir, validate_handlers: false)
    expect(bootstrap.running?).to be(true)
    bootstrap.shutdown!

    bootstrap.start!("templates" => @dir, "validate_handlers" => false)
    final = TaskerCore.wait_for_task(TaskerCore.create_task(namespace: "validation", name: "order"), timeout: 10)
    expect(final[:status]).to eq("error")
    expect(final[:steps].first[:error_message]).to include("HandlerValidationSpec::Chrage not found")
  end

  it "checks with validate_handlers: true or nil, and refuses any other value naming the key" do
    template("order", "charge" => "HandlerValidationSpec::Chrage")

    expect(start_error(validate_handlers: true).message).to include("Chrage")
    expect(start_error(validate_handlers: nil).message).to include("Chrage")
    %w[no false].each do |value|
      expect(start_error(validate_handlers: value).message)
        .to eq("validate_handlers: expected true or false, got a string")
    end
    expect(start_error(validate_handlers: 0).message).to eq("validate_handlers: expected true or false, got a number")
    expect_nothing_running
  end

  it "does not check the templates of namespaces the worker does not run" do
    template("order", "charge" => "HandlerValidationSpec::Charge", namespace: "shop")
    template("report", "build" => "HandlerValidationSpec::Chrage", namespace: "reports")

    bootstrap.start!(templates: @dir, namespaces: ["shop"])
    expect(bootstrap.running?).to be(true)
    bootstrap.shutdown!

    expect(start_error(namespaces: %w[shop reports]).message).to include("used by reports/report@1.0.0 step build)")
  end

  it "leaves nothing running after a refused start!, and start! works once the handler is fixed" do
    template("order", "charge" => "HandlerValidationSpec::Fixed")
    subscribers_before = TaskerCore::Worker::EventBridge.instance
                                                        .process(TaskerCore::Worker::EventBridge::STEP_EXECUTION, {})
                                                        .count

    expect(start_error.message).to include("HandlerValidationSpec::Fixed is not defined")
    expect_nothing_running
    expect(TaskerCore::Worker::EventBridge.instance.process(TaskerCore::Worker::EventBridge::STEP_EXECUTION, {}).count)
      .to eq(subscribers_before)

    HandlerValidationSpec.const_set(:Fixed, Class.new(TaskerCore::StepHandler::Base) do
      def call(_task, _sequence, _step)
        { "fixed" => true }
      end
    end)
    bootstrap.start!(templates: @dir)
    uuid = TaskerCore.create_task(namespace: "validation", name: "order")
    expect(TaskerCore.wait_for_task(uuid, timeout: 10)[:steps].first[:result]).to eq("fixed" => true)
  end

  it "resolves through the HandlerRegistry, as the subscriber does: a registered alias counts" do
    template("order", "charge" => "HandlerValidation::Alias")
    expect(start_error.message).to include("HandlerValidation::Alias is not defined")

    registry.register("HandlerValidation::Alias", HandlerValidationSpec::Charge)
    bootstrap.start!(templates: @dir)
    uuid = TaskerCore.create_task(namespace: "validation", name: "order")
    expect(TaskerCore.wait_for_task(uuid, timeout: 10)[:steps].first[:result]).to eq("charged" => true)
  end

  it "accepts a class that follows the protocol without subclassing Base (as the subscriber does)" do
    template("order", "duck" => "HandlerValidationSpec::DuckHandler",
                      "bad" => "HandlerValidationSpec::DuckWithoutConfig")

    message = start_error.message
    expect(message).to start_with("1 of the 2 handler classes")
    expect(message).to include("HandlerValidationSpec::DuckWithoutConfig is not a TaskerCore::StepHandler::Base " \
                               "subclass, and has an initialize() that cannot be called as new(config: Hash)")

    File.delete(File.join(@dir, "validation_order.yml"))
    template("order", "duck" => "HandlerValidationSpec::DuckHandler")
    bootstrap.start!(templates: @dir)
    uuid = TaskerCore.create_task(namespace: "validation", name: "order")
    expect(TaskerCore.wait_for_task(uuid, timeout: 10)[:steps].first[:result]).to eq("duck" => true)
  end

  it "refuses a Base subclass whose initialize cannot take config:" do
    template("order", "odd" => "HandlerValidationSpec::OddInitialize")

    expect(start_error.message).to include("HandlerValidationSpec::OddInitialize has an initialize(name, config:) " \
                                           "that cannot be called as new(config: Hash)")
  end

  it "reports a bad template before any handler, as bootstrap_worker would" do
    File.write(File.join(@dir, "broken.yml"), "namespace: validation\nname: broken\n")

    expect(start_error.message).to include("broken.yml")
    expect_nothing_running
  end
end
