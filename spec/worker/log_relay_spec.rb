# frozen_string_literal: true

require "spec_helper"
require "json"
require "open3"

# log_output: "rails": the engine's and handlers' lines reach a Ruby logger through a Ruby thread
# of its own (TaskerCore::LogRelay). Each scenario runs in a child process, because the log output
# is the process's.
RSpec.describe "log_output: \"rails\" (TaskerCore::LogRelay)" do
  def run_child(script)
    out, err, status = Timeout.timeout(60) do
      Open3.capture3({ "TASKER_LOG_LEVEL" => "info" }, RbConfig.ruby, "-I", SpecHelpers::LIB, "-e", script)
    end
    expect(status).to be_success, "child failed:\n#{out}\n#{err}"
    [JSON.parse(out.lines.last), err]
  end

  it "writes engine and handler lines to the logger, at their level, from Ruby threads" do
    result, err = run_child(<<~RUBY)
      require "tasker_core"
      require "json"
      require "tmpdir"
      class Lines < Logger
        attr_reader :seen
        def initialize; super(nil); @seen = []; end
        def add(severity, message = nil, progname = nil)
          @seen << [severity, message, progname, Thread.current.name]
          true
        end
      end
      logger = Lines.new
      TaskerCore::LogRelay.start(logger)
      dir = Dir.mktmpdir
      File.write(File.join(dir, "t.yml"), "namespace: relay\\nname: t\\nversion: 1.0.0\\nsteps:\\n  - { name: a, handler: { callable: Noisy } }\\n")
      class Noisy < TaskerCore::StepHandler::Base
        def call(*) = (TaskerCore::Logger.new("noisy").warn("from the handler"); {})
      end
      TaskerCore::Worker::Bootstrap.start!(templates: dir, log_output: "rails", log_level: "info")
      TaskerCore.wait_for_task(TaskerCore.create_task(namespace: "relay", name: "t"), timeout: 10)
      TaskerCore::Worker::Bootstrap.instance.shutdown!
      TaskerCore::LogRelay.stop
      handler = logger.seen.find { |l| l[1].include?("from the handler") }
      puts JSON.generate("handler" => handler, "count" => logger.seen.size,
                         "threads" => logger.seen.map(&:last).uniq,
                         "engine" => logger.seen.any? { |l| l[1].include?("tasker_worker") })
    RUBY

    expect(result["handler"].first(3)).to eq([Logger::WARN, result["handler"][1], "tasker_core"])
    expect(result["handler"][1]).to include("progname=noisy")
    expect(result["engine"]).to be(true)
    # Written by Ruby threads: the relay's, and at stop the one that stops it (never an engine thread).
    expect(result["threads"]).to include("tasker-log-relay")
    # Nothing went to stderr once the output was "rails".
    expect(err).not_to include("from the handler")
  end

  it "never holds up the engine behind a slow logger: lines past the queue are dropped and counted" do
    result, = run_child(<<~RUBY)
      require "tasker_core"
      require "json"
      require "tmpdir"
      class Slow < Logger
        def initialize; super(nil); end
        def add(*) = (sleep 0.01; true)
      end
      TaskerCore::LogRelay.start(Slow.new)
      dir = Dir.mktmpdir
      File.write(File.join(dir, "t.yml"), "namespace: relay\\nname: t\\nversion: 1.0.0\\nsteps:\\n  - { name: a, handler: { callable: Quiet } }\\n")
      class Quiet < TaskerCore::StepHandler::Base
        def call(*) = {}
      end
      TaskerCore::Worker::Bootstrap.start!(templates: dir, log_output: "rails", log_level: "info")
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      30_000.times { |i| TaskerCore::FFI.log_info("line \#{i}") }
      uuids = Array.new(200) { TaskerCore.create_task(namespace: "relay", name: "t") }
      statuses = TaskerCore.wait_for_tasks(uuids, timeout: 30).map { |t| t[:status] }.uniq
      elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
      TaskerCore::FFI.flush_logs
      puts JSON.generate("statuses" => statuses, "elapsed" => elapsed, "dropped" => TaskerCore::FFI.dropped_log_lines)
      $stdout.flush
      exit!(0) # the slow logger would take minutes to write out what is queued
    RUBY

    expect(result["statuses"]).to eq(["complete"])
    # Written one by one the 30,000 lines would take 300 s.
    expect(result["elapsed"]).to be < 20
    expect(result["dropped"]).to be > 10_000
  end
end
