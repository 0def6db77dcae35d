# frozen_string_literal: true

require "open3"
require "rbconfig"
require "tmpdir"

# A worker embedded in an application (Bootstrap.start!) leaves the application's signal handling
# as it was: it chains the traps installed before it, or installs none; Ctrl-C while waiting for
# a task ends a script as Ruby does; a hard stop raises TaskerCore::Shutdown into handlers.
RSpec.describe "embedding the worker" do
  handlers = File.join(FIXTURES, "cli", "handlers.rb")
  templates = File.join(FIXTURES, "cli", "templates")

  # Runs `code` in a child Ruby; once it prints "ready", sends `signal`. Returns [out, err, status].
  def run_then_signal(code, signal, timeout: 20)
    Open3.popen3({ "TASKER_LOG_LEVEL" => "error" }, RbConfig.ruby, "-I", SpecHelpers::LIB, "-e", code,
                 chdir: Dir.tmpdir) do |stdin, stdout, stderr, wait|
      stdin.close
      err = Thread.new { stderr.read }
      out = +""
      until out.include?("ready\n")
        chunk = stdout.gets
        raise "child ended before it was ready; stderr:\n#{err.value}" if chunk.nil?

        out << chunk
      end
      Process.kill(signal, wait.pid)
      out << stdout.read
      unless wait.join(timeout)
        Process.kill("KILL", wait.pid)
        raise "child still running #{timeout}s after SIG#{signal}; stderr:\n#{err.value}"
      end
      [out, err.value, wait.value]
    end
  end

  let(:prelude) do
    <<~RUBY
      require "tasker_core"
      require #{handlers.inspect}
      $stdout.sync = true
      LOG = File.join(#{Dir.tmpdir.inspect}, "tasker_embed_\#{Process.pid}.log")
      at_exit { File.delete(LOG) if File.exist?(LOG) }
      def slow_task(seconds)
        TaskerCore.create_task(namespace: "cli", name: "pair",
                               context: { "log" => LOG, "plan" => { "first" => { "sleep" => seconds } } })
      end
      def wait_started
        sleep 0.01 until File.exist?(LOG) && File.read(LOG).include?("start")
      end
    RUBY
  end

  it "calls the TERM handler installed before start! after starting its drain" do
    out, err, status = run_then_signal(<<~RUBY, "TERM")
      #{prelude}
      trap("TERM") { puts "app trap: running=\#{TaskerCore::Worker::Bootstrap.instance.running?}"; exit 3 }
      TaskerCore::Worker::Bootstrap.start!(templates: #{templates.inspect})
      TaskerCore::Worker::Bootstrap.instance.on_shutdown { puts "drained" }
      slow_task(0.5)
      wait_started
      puts "ready"
      sleep
    RUBY
    expect(status.exitstatus).to eq(3), err
    # The app's trap ran, the step in flight finished, the drain completed once, before the exit.
    expect(out.lines.map(&:chomp)).to eq(["ready", "app trap: running=true", "drained"])
  end

  it "installs no trap with install_signal_handlers: false" do
    out, err, status = run_ruby(<<~RUBY)
      #{prelude}
      app = proc { puts "app" }
      trap("INT", app)
      TaskerCore::Worker::Bootstrap.start!(templates: #{templates.inspect}, install_signal_handlers: false)
      puts trap("INT", "DEFAULT").equal?(app)
      puts trap("TERM", "DEFAULT").inspect
    RUBY
    expect(status).to be_success, err
    # Still the app's INT trap and Ruby's own TERM handler.
    expect(out.lines.map(&:chomp)).to eq(["true", '"DEFAULT"'])
  end

  [true, false].each do |install|
    it "Ctrl-C during wait_for_task raises Interrupt in the main thread: exit 130, no engine error " \
       "(install_signal_handlers: #{install})" do
      out, err, status = run_then_signal(<<~RUBY, "INT")
        #{prelude}
        TaskerCore::Worker::Bootstrap.start!(templates: #{templates.inspect}, shutdown_timeout: 0.5,
                                             install_signal_handlers: #{install})
        uuid = slow_task(30)
        wait_started
        # Said from another thread once the main thread waits, so that the signal finds it there.
        Thread.new { sleep 0.3; puts "ready" }
        TaskerCore.wait_for_task(uuid, timeout: 60)
        puts "not reached"
      RUBY
      expect(status.termsig).to eq(Signal.list["INT"]), "#{status.inspect}\n#{err}"
      expect(out).to eq("ready\n")
      expect(err).to match(/in `wait_for_task': Interrupt/)
      expect(err).not_to match(/WorkerNotInitializedError|FFIError|tasker_core\.rb|SystemExit/)
    end
  end

  it "past the deadline, raises TaskerCore::Shutdown (an Interrupt) in the handler, never Thread#kill" do
    out, err, status = run_ruby(<<~RUBY)
      #{prelude}
      class Recorder < TaskerCore::StepHandler::Base
        def call(_task, _sequence, _step)
          sleep 30
        rescue Exception => e
          puts "raised \#{e.class} < \#{e.class.superclass}"
          raise
        ensure
          puts "ensure ran"
        end
      end
      File.write(File.join(#{Dir.tmpdir.inspect}, "embed_\#{Process.pid}.yml"), <<~YAML)
        namespace: embed\#{Process.pid}
        name: rec
        version: 1.0.0
        steps:
          - { name: only, handler: { callable: Recorder } }
      YAML
      begin
      TaskerCore::Worker::Bootstrap.start!(templates: File.join(#{Dir.tmpdir.inspect}, "embed_\#{Process.pid}.yml"))
      TaskerCore.create_task(namespace: "embed\#{Process.pid}", name: "rec")
      sleep 0.05 until TaskerCore::FFI.worker_status[:steps_in_flight] == 1
      sleep 0.2
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      TaskerCore::Worker::Bootstrap.instance.shutdown!(timeout: 0.3)
      puts "stopped in \#{(Process.clock_gettime(Process::CLOCK_MONOTONIC) - started).round}s"
      puts TaskerCore::Worker::Bootstrap.instance.last_stop.slice(:handed_back, :abandoned).inspect
      ensure
        File.delete(File.join(#{Dir.tmpdir.inspect}, "embed_\#{Process.pid}.yml"))
      end
    RUBY
    expect(status).to be_success, err
    expect(out.lines.map(&:chomp)).to eq(["raised TaskerCore::Shutdown < Interrupt", "ensure ran", "stopped in 0s",
                                          "{:handed_back=>1, :abandoned=>0}"])
  end
end
