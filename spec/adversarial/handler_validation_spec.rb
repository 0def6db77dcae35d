# frozen_string_literal: true

require "fileutils"
require "tmpdir"

# start!'s handler check against handlers that break while they load, and configs that are not
# configs: each is one ConfigurationError naming the problem, and nothing is left running.
RSpec.describe "Handler validation at start!, adversarial" do
  let(:bootstrap) { TaskerCore::Worker::Bootstrap.instance }

  around do |example|
    Dir.mktmpdir("tasker-validation-adv") do |dir|
      @dir = dir
      example.run
    end
  end

  after { bootstrap.shutdown! }

  def template(steps)
    lines = steps.map { |step, callable| "  - { name: #{step}, handler: { callable: #{callable} } }" }
    File.write(File.join(@dir, "adversarial.yml"),
               "namespace: adversarial\nname: loads\nversion: 1.0.0\nsteps:\n#{lines.join("\n")}\n")
  end

  # `Object.autoload` stands in for Rails' autoloader: the constant's file runs on first use.
  def autoloaded(constant, source)
    path = File.join(@dir, "#{constant.downcase}.rb")
    File.write(path, source)
    Object.autoload(constant, path)
  end

  def expect_nothing_running
    expect(TaskerCore::FFI.worker_status).to include(running: false)
    expect(Thread.list.map(&:name).compact.grep(/\Atasker-handler-/)).to be_empty
  end

  it "reports a handler whose file raises, one with a syntax error, and one naming a missing constant, together" do
    autoloaded(:AdversarialRaises, "raise 'boom while loading'\n")
    autoloaded(:AdversarialSyntax, "class AdversarialSyntax < TaskerCore::StepHandler::Base\n  def call(\nend\n")
    autoloaded(:AdversarialMissingBase, "class AdversarialMissingBase < AdversarialNoSuchBase\nend\n")
    template("a" => "AdversarialRaises", "b" => "AdversarialSyntax", "c" => "AdversarialMissingBase")

    error = nil
    expect { bootstrap.start!(templates: @dir) }.to raise_error(TaskerCore::ConfigurationError) { |e| error = e }
    problems = error.message.lines.grep(/\A  - /)
    expect(problems.size).to eq(3)
    expect(problems[0]).to include("AdversarialRaises raised RuntimeError while loading: boom while loading")
    expect(problems[1]).to include("AdversarialSyntax raised SyntaxError while loading")
    expect(problems[2]).to include("AdversarialMissingBase raised NameError while loading:", "AdversarialNoSuchBase")
    expect_nothing_running
  end

  it "refuses a config that is not a Hash before looking at any handler" do
    expect { bootstrap.start!("templates") }.to raise_error(TaskerCore::ConfigurationError, /config must be a Hash/)
    expect { bootstrap.start!(templates: @dir, colour: "red") }
      .to raise_error(TaskerCore::ConfigurationError, /unknown config key `colour`/)
    expect { bootstrap.start!(templates: @dir, validate_handlers: false, "validate_handlers" => true) }
      .to raise_error(TaskerCore::ConfigurationError, /validate_handlers: given twice/)
    expect_nothing_running
  end

  it "checks nothing and starts when the namespaces it runs have no templates of their own (postgres)" do
    template("a" => "AdversarialNeverDefined")
    # A postgres worker may run namespaces whose templates other processes stored: only local
    # template files can be checked. Here the database is unreachable, so the start fails later,
    # at bootstrap, with WorkerBootstrapError, not at the handler check.
    expect do
      bootstrap.start!(templates: @dir, backend: "postgres", database_url: "postgres://u@127.0.0.1:1/x",
                       namespaces: ["elsewhere"])
    end.to raise_error(TaskerCore::WorkerBootstrapError)
    expect(TaskerCore::FFI.worker_status).to include(running: false)
  end
end
