# frozen_string_literal: true

require "io/wait"

# Logging is process-global (one tracing subscriber, one level): every example runs a child
# process and reads what it wrote to stderr.
RSpec.describe "Logging through the engine's subscriber" do
  # "2025-01-01T12:00:00.123456Z  INFO tasker_worker::engine: worker running worker_id=..."
  line_format = /
    \A(?<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z)
    \s+(?<level>TRACE|DEBUG|INFO|WARN|ERROR)
    \s+(?<target>[\w:]+):\x20(?<rest>.*)\z
  /x
  define_method(:line_format) { line_format }

  # Runs `code` after `require "tasker_core"`; returns the parsed stderr lines.
  def log_lines(code, env: {})
    out, err, status = run_ruby(%(require "tasker_core"\n#{code}), env: env)
    expect(status).to be_success, "child failed (#{status.inspect}):\n#{out}\n#{err}"
    lines = err.lines.map(&:chomp).reject(&:empty?)
    parsed = lines.map { |line| line_format.match(line) }
    expect(parsed).to all(be_a(MatchData)), "stderr has lines in another format:\n#{err}"
    parsed
  end

  def messages(lines)
    lines.map { |m| m[:rest] }
  end

  def line_for(lines, text)
    lines.find { |m| m[:rest].include?(text) }
  end

  describe "format" do
    it "writes Ruby's lines exactly like the engine's: timestamp, level, target, message" do
      lines = log_lines(<<~RUBY, env: { "TASKER_LOG_LEVEL" => "error" })
        TaskerCore::FFI.bootstrap_worker(log_level: "info")
        TaskerCore::FFI.log_info("hello from ruby", {})
        TaskerCore::FFI.stop_worker
      RUBY

      engine = line_for(lines, "worker running")
      ruby = line_for(lines, "hello from ruby")
      expect(engine).not_to be_nil, "no engine line in #{messages(lines)}"
      expect(ruby).not_to be_nil, "no Ruby line in #{messages(lines)}"

      expect(engine[:level]).to eq("INFO")
      expect(engine[:target]).to eq("tasker_worker::engine")
      expect(ruby[:level]).to eq("INFO")
      expect(ruby[:target]).to start_with("tasker_core")
      expect(ruby[:rest]).to eq("hello from ruby")
      # Both timestamps are ISO 8601 UTC instants, in order.
      [engine, ruby].each { |m| expect { Time.iso8601(m[:time]) }.not_to raise_error }
      expect(Time.iso8601(ruby[:time])).to be >= Time.iso8601(engine[:time])
    end

    it "uses the level word of each call" do
      lines = log_lines(<<~RUBY, env: { "TASKER_LOG_LEVEL" => "trace" })
        TaskerCore::FFI.log_trace("t-line")
        TaskerCore::FFI.log_debug("d-line")
        TaskerCore::FFI.log_info("i-line")
        TaskerCore::FFI.log_warn("w-line")
        TaskerCore::FFI.log_error("e-line")
      RUBY

      expect(lines.map { |m| [m[:level], m[:rest]] }).to eq(
        [%w[TRACE t-line], %w[DEBUG d-line], %w[INFO i-line], %w[WARN w-line], %w[ERROR e-line]]
      )
    end

    it "renders the context as fields" do
      lines = log_lines(<<~RUBY, env: { "TASKER_LOG_LEVEL" => "info" })
        TaskerCore::FFI.log_info("charged card", { user_id: 7, "op" => "refund", ok: true })
      RUBY

      line = line_for(lines, "charged card")
      expect(line[:rest]).to include("user_id=7")
      expect(line[:rest]).to match(/op="?refund"?/)
      expect(line[:rest]).to include("ok=true")
    end

    it "returns nil from the log functions" do
      out, err, status = run_ruby(<<~RUBY, env: { "TASKER_LOG_LEVEL" => "error" })
        require "tasker_core"
        p [TaskerCore::FFI.log_info("x", {}), TaskerCore::FFI.log_error("y"), TaskerCore::FFI.log_warn("z", { a: 1 })]
      RUBY
      expect(status).to be_success, err
      expect(out).to eq("[nil, nil, nil]\n")
    end
  end

  describe "level" do
    it "drops lines below the bootstrap's log_level, for the engine and for Ruby" do
      lines = log_lines(<<~RUBY, env: { "TASKER_LOG_LEVEL" => "trace" })
        TaskerCore::FFI.bootstrap_worker(log_level: "warn")
        TaskerCore::FFI.log_debug("debug-hidden", {})
        TaskerCore::FFI.log_info("info-hidden", { user_id: 1 })
        TaskerCore::FFI.log_warn("warn-shown", { user_id: 7 })
        TaskerCore::FFI.log_error("error-shown", {})
        TaskerCore::FFI.stop_worker
      RUBY

      text = messages(lines).join("\n")
      expect(text).not_to include("hidden")
      expect(text).not_to include("worker running") # the engine's own INFO line
      expect(lines.map { |m| m[:level] }).to eq(%w[WARN ERROR])
      expect(line_for(lines, "warn-shown")[:rest]).to include("user_id=7")
      expect(line_for(lines, "error-shown")).not_to be_nil
    end

    it "takes its initial level from TASKER_LOG_LEVEL, before any bootstrap" do
      quiet = log_lines(<<~RUBY, env: { "TASKER_LOG_LEVEL" => "error" })
        TaskerCore::FFI.log_info("info-line")
        TaskerCore::FFI.log_warn("warn-line")
        TaskerCore::FFI.log_error("error-line")
      RUBY
      chatty = log_lines(<<~RUBY, env: { "TASKER_LOG_LEVEL" => "debug" })
        TaskerCore::FFI.log_trace("trace-line")
        TaskerCore::FFI.log_debug("debug-line")
      RUBY

      expect(messages(quiet)).to eq(["error-line"])
      expect(messages(chatty)).to eq(["debug-line"])
    end

    it "defaults to info without TASKER_LOG_LEVEL" do
      lines = log_lines(<<~RUBY, env: { "TASKER_LOG_LEVEL" => nil })
        TaskerCore::FFI.log_debug("debug-line")
        TaskerCore::FFI.log_info("info-line")
      RUBY

      expect(messages(lines)).to eq(["info-line"])
    end

    it "can be lowered by a bootstrap (debug shows the debug lines)" do
      lines = log_lines(<<~RUBY, env: { "TASKER_LOG_LEVEL" => "error" })
        TaskerCore::FFI.log_debug("before-bootstrap")
        TaskerCore::FFI.bootstrap_worker(log_level: "debug")
        TaskerCore::FFI.log_debug("after-bootstrap")
        TaskerCore::FFI.stop_worker
      RUBY

      expect(messages(lines).join("\n")).not_to include("before-bootstrap")
      expect(line_for(lines, "after-bootstrap")[:level]).to eq("DEBUG")
    end

    it "is left alone by a bootstrap that fails its configuration" do
      lines = log_lines(<<~RUBY, env: { "TASKER_LOG_LEVEL" => "error" })
        begin
          TaskerCore::FFI.bootstrap_worker(log_level: "debug", templates: "/nonexistent/tasker-templates")
        rescue TaskerCore::ConfigurationError
          TaskerCore::FFI.log_error("refused")
        end
        TaskerCore::FFI.log_info("info-after-refusal")
      RUBY

      expect(messages(lines)).to eq(["refused"])
    end
  end

  describe "a stderr nobody reads" do
    # stderr is a pipe nobody reads: once its buffer is full, every write to it blocks.
    def run_with_stuck_stderr(code)
      stdout_r, stdout_w = IO.pipe
      stderr_r, stderr_w = IO.pipe
      pid = Process.spawn(RbConfig.ruby, "-I", SpecHelpers::LIB, "-e", code, out: stdout_w, err: stderr_w)
      stdout_w.close
      stderr_w.close
      line = stdout_r.wait_readable(20) && stdout_r.gets
      Process.kill("KILL", pid) unless line
      Process.wait(pid)
      stderr_r.close
      line
    end

    it "blocks no thread that logs: lines are queued for a writer thread" do
      line = run_with_stuck_stderr(<<~RUBY)
        require "tasker_core"
        logger = Thread.new { 5_000.times { TaskerCore::FFI.log_error("x" * 200) } }
        $stdout.puts "logging thread finished: \#{!logger.join(10).nil?}"
        $stdout.flush
        exit!(0)
      RUBY

      expect(line).to eq("logging thread finished: true\n")
    end

    it "drops the lines beyond a full queue and counts them" do
      line = run_with_stuck_stderr(<<~RUBY)
        require "tasker_core"
        200_000.times { TaskerCore::FFI.log_error("x") }
        $stdout.puts "dropped: \#{TaskerCore::FFI.dropped_log_lines}"
        $stdout.flush
        exit!(0)
      RUBY

      # The queue holds 128,000 lines and the pipe some more: the rest are dropped, none waited for.
      expect(line).to match(/\Adropped: \d+\n\z/)
      expect(Integer(line[/\d+/])).to be_between(1, 200_000 - 128_000)
    end
  end

  describe TaskerCore::Logger do
    it "writes through the same subscriber, honouring the worker's level" do
      lines = log_lines(<<~RUBY, env: { "TASKER_LOG_LEVEL" => "error" })
        TaskerCore::FFI.bootstrap_worker(log_level: "warn")
        logger = TaskerCore::Logger.new("spec")
        evaluated = []
        logger.debug("logger-debug-hidden")
        logger.info("logger-info-hidden", user_id: 1)
        logger.info { evaluated << :info; "logger-info-block-hidden" }
        logger.warn("logger-warn-shown", user_id: 7)
        logger.warn { evaluated << :warn; "logger-warn-block-shown" }
        logger.error("logger-error-shown")
        TaskerCore::FFI.log_warn("ffi-warn-shown")
        TaskerCore::FFI.stop_worker
        TaskerCore::FFI.log_error("evaluated=" + evaluated.inspect)
      RUBY

      text = messages(lines).join("\n")
      expect(text).not_to include("hidden")
      expect(line_for(lines, "logger-warn-shown")[:level]).to eq("WARN")
      expect(line_for(lines, "logger-warn-shown")[:rest]).to include("user_id=7")
      expect(line_for(lines, "logger-warn-block-shown")[:level]).to eq("WARN")
      expect(line_for(lines, "logger-error-shown")[:level]).to eq("ERROR")
      # A filtered block is never called.
      expect(line_for(lines, "evaluated=")[:rest]).to eq("evaluated=[:warn]")
      # The Logger's lines and FFI's own are indistinguishable in shape.
      logger_line = line_for(lines, "logger-warn-shown")
      ffi_line = line_for(lines, "ffi-warn-shown")
      expect(logger_line[:target]).to eq(ffi_line[:target])
    end

    it "filters further with its own level=" do
      lines = log_lines(<<~RUBY, env: { "TASKER_LOG_LEVEL" => "debug" })
        logger = TaskerCore::Logger.new
        logger.info("info-before-level")
        logger.level = ::Logger::ERROR
        logger.info("info-after-level")
        logger.warn("warn-after-level")
        logger.error("error-after-level")
        logger.level = :debug
        logger.debug("debug-after-reset")
      RUBY

      expect(messages(lines)).to eq(%w[info-before-level error-after-level debug-after-reset])
    end

    it "maps fatal and unknown to error, and << to info" do
      lines = log_lines(<<~RUBY, env: { "TASKER_LOG_LEVEL" => "info" })
        logger = TaskerCore::Logger.new
        logger.fatal("fatal-line")
        logger.unknown("unknown-line")
        logger << "raw-line\\n"
      RUBY

      expect(lines.map { |m| [m[:level], m[:rest]] }).to eq(
        [%w[ERROR fatal-line], %w[ERROR unknown-line], %w[INFO raw-line]]
      )
    end
  end
end
