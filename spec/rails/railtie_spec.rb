# frozen_string_literal: true

require "spec_helper"
require "json"

# The Railtie in a real Rails 6.1 app (Debian's railties and activerecord, on the real
# PostgreSQL), each scenario in a child process booted as an application is.
RSpec.describe "TaskerCore::Railtie" do
  let(:app) { RailsApp.create(Dir.mktmpdir("tasker-rails-app")) }
  let(:lib) { SpecHelpers::LIB }

  after { FileUtils.rm_rf(app) }

  # Runs `args` (a Ruby script and its arguments) in the app; returns its stdout lines parsed as JSON.
  def run_in_app(*args, env: {}, timeout: 60)
    out = err = status = nil
    Timeout.timeout(timeout) do
      out, err, status = Open3.capture3({ "TASKER_TEMPLATE_PATH" => nil }.merge(env), RbConfig.ruby, "-I", lib, *args,
                                        chdir: app)
    end
    expect(status).to be_success, "#{args.join(" ")} failed:\n#{out}\n#{err}"
    out.lines.map { |line| JSON.parse(line) }
  end

  it "gives the worker config.tasker_core, with templates in config/tasker and Rails.env" do
    config, = run_in_app("script/run_tasks.rb", env: { "RAILS_ENV" => "test" })

    expect(config).to eq("environment" => "test", "templates" => File.join(File.realpath(app), "config/tasker"),
                         "concurrency" => 2, "log_level" => "error")
  end

  it "runs each handler inside the Rails executor, which returns its database connection to the pool" do
    _, first, second, pool = run_in_app("script/run_tasks.rb")

    expect([first, second]).to all(include("status" => "complete"))
    expect(first["result"]).to eq("version" => "v1", "executor_active" => true, "database" => 42)
    expect(pool["busy"]).to eq(0)
  end

  it "leaves handlers unwrapped with wrap_handlers = false: their connections stay checked out" do
    _, first, _, pool = run_in_app("script/run_tasks.rb", env: { "WRAP" => "0" })

    expect(first["result"]).to include("executor_active" => false)
    expect(pool["busy"]).to be > 0
  end

  it "picks up an edited handler in development (reloading), not when classes are cached" do
    _, before, after = run_in_app("script/run_tasks.rb", env: { "RELOAD" => "1", "EDIT" => "1" })
    RailsApp.create(app) # the handler as it was
    _, cached_before, cached_after = run_in_app("script/run_tasks.rb", env: { "EDIT" => "1" })

    expect([before, after].map { |r| r.dig("result", "version") }).to eq(%w[v1 v2])
    expect([cached_before, cached_after].map { |r| r.dig("result", "version") }).to eq(%w[v1 v1])
  end

  it "gives test mode the app's templates, and wraps its handler calls the same way" do
    File.write(File.join(app, "script/inline.rb"), <<~RUBY)
      require_relative "../config/environment"
      require "tasker_core/testing"
      require "json"

      status = TaskerCore::Testing.inline! do
        TaskerCore.wait_for_task(TaskerCore.create_task(namespace: "orders", name: "stamp"))
      end
      puts JSON.generate(status[:steps].first.slice(:status, :result))
      puts JSON.generate("worker_running" => TaskerCore::FFI.worker_status[:running])
    RUBY

    step, worker = run_in_app("script/inline.rb")

    expect(step).to eq("status" => "complete",
                       "result" => { "version" => "v1", "executor_active" => true, "database" => 42 })
    expect(worker).to eq("worker_running" => false)
  end

  it "starts a worker with bin/rails tasker:worker, which stops gracefully on TERM" do
    Open3.popen3({ "TASKER_TEMPLATE_PATH" => nil, "RUBYLIB" => lib }, RbConfig.ruby, "bin/rails", "tasker:worker",
                 chdir: app) do |stdin, stdout, stderr, wait|
      stdin.close
      line = Timeout.timeout(60) { stdout.gets }
      expect(line).to match(/\Atasker_core worker \S+ running \(development, backend memory, namespaces orders\)/)

      Process.kill("TERM", wait.pid)
      status = Timeout.timeout(30) { wait.value }
      expect(status.exitstatus).to eq(0), stderr.read
    end
  end
end
