# frozen_string_literal: true

require "json"
require "tmpdir"

# log_format and log_output are process-global like the level: every example runs a child process.
RSpec.describe "log_format and log_output" do
  def child(code, env: {})
    out, err, status = run_ruby(%(require "tasker_core"\n#{code}), env: { "TASKER_LOG_LEVEL" => "info" }.merge(env))
    expect(status).to be_success, "child failed (#{status.inspect}):\n#{out}\n#{err}"
    [out, err]
  end

  def json_lines(text)
    text.lines.map(&:chomp).reject(&:empty?).map { |line| JSON.parse(line) }
  end

  it "writes one JSON object a line to a file: engine, step, FFI and Logger lines with their fields as keys" do
    Dir.mktmpdir("tasker-log") do |dir|
      log = File.join(dir, "worker.log")
      _out, err = child(<<~RUBY)
        class Dawdle < TaskerCore::StepHandler::Base
          def call(_task, _sequence, _step)
            sleep 0.6
            success(result: {})
          end
        end
        File.write(File.join(#{dir.inspect}, "dawdle.yml"), <<~YAML)
          namespace: logs
          name: dawdle
          version: 1.0.0
          steps:
            - { name: dawdle, handler: { callable: Dawdle }, timeout_seconds: 0.2, on_timeout: wait,
                retry: { max_attempts: 1 } }
        YAML
        TaskerCore::Worker::Bootstrap.start!(templates: #{dir.inspect}, log_format: "json",
                                             log_output: #{log.inspect}, install_signal_handlers: false)
        uuid = TaskerCore.create_task(namespace: "logs", name: "dawdle")
        TaskerCore.wait_for_task(uuid, timeout: 10)
        TaskerCore::FFI.log_warn("from ffi", { user_id: 7, tags: ["a", "b"] })
        TaskerCore::Logger.new("myapp").info("from logger", order: "A-1")
        File.write(File.join(#{dir.inspect}, "uuid"), uuid)
        TaskerCore::Worker::Bootstrap.instance.shutdown!
      RUBY

      expect(err).to eq("") # nothing left on stderr
      lines = json_lines(File.read(log))
      expect(lines).to all(include("timestamp", "level", "target", "message"))
      lines.each { |line| expect { Time.iso8601(line["timestamp"]) }.not_to raise_error }

      running = lines.find { |l| l["message"] == "worker running" }
      expect(running).to include("level" => "INFO", "target" => "tasker_worker::engine")

      uuid = File.read(File.join(dir, "uuid"))
      step = lines.find { |l| l["message"].include?("step attempt timed out") }
      expect(step).to include("level" => "WARN", "task_uuid" => uuid, "step" => "dawdle", "attempt" => 1,
                              "timeout_seconds" => a_kind_of(String))

      ffi = lines.find { |l| l["message"] == "from ffi" }
      expect(ffi).to include("level" => "WARN", "user_id" => 7, "tags" => %w[a b])
      expect(ffi["target"]).to start_with("tasker_core")

      logger = lines.find { |l| l["message"] == "from logger" }
      expect(logger).to include("level" => "INFO", "progname" => "myapp", "order" => "A-1")
    end
  end

  it "appends to an existing file" do
    Dir.mktmpdir("tasker-log") do |dir|
      log = File.join(dir, "app.log")
      File.write(log, "earlier line\n")
      child(<<~RUBY)
        TaskerCore::FFI.bootstrap_worker(log_output: #{log.inspect})
        TaskerCore::FFI.log_info("later line", {})
        TaskerCore::FFI.stop_worker
      RUBY
      lines = File.read(log).lines
      expect(lines.first).to eq("earlier line\n")
      expect(lines.grep(/INFO tasker_core\S*: later line/).size).to eq(1)
    end
  end

  it "writes to stdout with log_output: stdout, in text with progname as a field" do
    out, err = child(<<~RUBY)
      TaskerCore::FFI.bootstrap_worker(log_output: "stdout")
      TaskerCore::Logger.new("myapp").warn("to stdout", user_id: 7)
      TaskerCore::FFI.stop_worker
    RUBY

    expect(err).to eq("")
    line = out.lines.find { |l| l.include?("to stdout") }
    expect(line).to match(/\A\S+Z\s+WARN tasker_core\S*: to stdout /)
    expect(line).to include("progname=myapp")
    expect(line).to include("user_id=7")
    expect(out).to include("worker running")
  end

  it "writes JSON to stderr with log_format alone, and lines logged before the bootstrap stay text" do
    _out, err = child(<<~RUBY)
      TaskerCore::FFI.log_info("before", {})
      TaskerCore::FFI.bootstrap_worker(log_format: "json")
      TaskerCore::FFI.log_info("after", { n: 1 })
      TaskerCore::FFI.stop_worker
    RUBY

    lines = err.lines.map(&:chomp).reject(&:empty?)
    expect(lines.first).to match(/INFO tasker_core\S*: before\z/)
    after = json_lines(lines.drop(1).join("\n")).find { |l| l["message"] == "after" }
    expect(after).to include("level" => "INFO", "n" => 1)
  end

  describe "bad values" do
    it "raises ConfigurationError naming the key, and keeps logging as before" do
      out, err = child(<<~'RUBY')
        [{ log_format: "xml" }, { log_format: 1 }, { log_output: "" }, { log_output: 5 },
         { log_output: "/nonexistent-dir/sub/worker.log" }].each do |config|
          TaskerCore::FFI.bootstrap_worker(**config)
          puts "started with #{config}"
        rescue TaskerCore::ConfigurationError => e
          puts e.message
        end
        TaskerCore::FFI.log_error("still on stderr", {})
      RUBY

      messages = out.lines.map(&:chomp)
      expect(messages[0]).to start_with("log_format:").and include("xml")
      expect(messages[1]).to start_with("log_format:")
      expect(messages[2]).to start_with("log_output:")
      expect(messages[3]).to start_with("log_output:") # ("rails" is valid: see spec/worker/log_relay_spec.rb)
      expect(messages[4]).to start_with("log_output:").and include("/nonexistent-dir/sub/worker.log")
        .and include("No such file or directory")
      expect(err).to match(/ERROR tasker_core\S*: still on stderr/)
    end
  end
end
