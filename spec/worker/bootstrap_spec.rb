# frozen_string_literal: true

require "tmpdir"

# A step that takes its time, so that shutdown can be observed with a step in flight.
module BootstrapSpecHandlers
  STARTED = Queue.new
  FINISHED = Queue.new

  class Nap < TaskerCore::StepHandler::Base
    def call(task, _sequence, step)
      STARTED << step.name
      sleep task.context.fetch("seconds", 0.3)
      FINISHED << step.name
      { "slept" => true }
    end
  end
end

RSpec.describe TaskerCore::Worker::Bootstrap do
  # Child processes start workers with no templates (this suite's TASKER_TEMPLATE_PATH names
  # handlers the children do not define, which start! would refuse): they test the lifecycle only.
  def child_env
    { "TASKER_LOG_LEVEL" => "error", "TASKER_TEMPLATE_PATH" => nil }
  end

  let(:bootstrap) { described_class.instance }
  let(:bridge) { TaskerCore::Worker::EventBridge.instance }

  # Hooks registered by an example; removed afterwards so they do not run in later examples.
  let(:hooks) { [] }

  def on_shutdown(&block)
    hooks << block
    bootstrap.on_shutdown(&block)
  end

  after do
    bootstrap.shutdown!
    registered = bootstrap.instance_variable_get(:@shutdown_handlers)
    hooks.each { |hook| registered&.delete(hook) }
  end

  # How many subscribers a step execution event would reach (without calling them).
  def step_subscribers
    bridge.process(TaskerCore::Worker::EventBridge::STEP_EXECUTION, {}).count
  end

  def naps_template(dir)
    File.write(File.join(dir, "naps.yml"), <<~YAML)
      namespace: bootstrap_spec
      name: naps
      version: 1.0.0
      steps:
        - { name: nap, handler: { callable: BootstrapSpecHandlers::Nap } }
    YAML
    dir
  end

  describe ".start!" do
    it "starts the engine, the handler threads and the bridge subscription" do
      expect(described_class.start!(concurrency: 3)).to be(bootstrap)

      expect(bootstrap.running?).to be(true)
      expect(TaskerCore::FFI.worker_status).to include(running: true, state: "running")
      expect(step_subscribers).to eq(1)
      # Each thread names itself as it starts.
      names = eventually { Thread.list.map(&:name).grep(/\Atasker-handler-/).sort.then { |n| n if n.size == 3 } }
      expect(names).to eq(%w[tasker-handler-0 tasker-handler-1 tasker-handler-2])
    end

    it "runs tasks" do
      described_class.start!
      uuid = create_test_task(context: { "value" => 10 })

      status = TaskerCore.wait_for_task(uuid, timeout: 5)
      expect(status[:status]).to eq("complete")
      expect(status[:steps].map { |s| s[:result] }).to eq([{ "value" => 11 }, { "value" => 12 }, { "value" => 13 }])
    end

    it "refuses to start twice" do
      described_class.start!
      expect { described_class.start! }.to raise_error(TaskerCore::WorkerBootstrapError, /already running/)
      expect(bootstrap.running?).to be(true)
      expect(step_subscribers).to eq(1)
    end

    it "leaves nothing behind when the configuration is refused, and starts afterwards" do
      threads_before = Thread.list.size

      expect { described_class.start!(concurrency: 0) }
        .to raise_error(TaskerCore::ConfigurationError, /concurrency/)
      expect(bootstrap.running?).to be(false)
      expect(step_subscribers).to eq(0)
      expect(Thread.list.size).to eq(threads_before)

      described_class.start!
      expect(bootstrap.running?).to be(true)
      expect(step_subscribers).to eq(1)
    end
  end

  describe "#running?" do
    it "is false before start!, true while running, false after shutdown!" do
      expect(bootstrap.running?).to be(false)
      described_class.start!
      expect(bootstrap.running?).to be(true)
      bootstrap.shutdown!
      expect(bootstrap.running?).to be(false)
    end

    it "is false when the engine was stopped under it" do
      described_class.start!
      TaskerCore::FFI.stop_worker
      expect(bootstrap.running?).to be(false)
    end
  end

  describe "#status" do
    it "merges the engine's status with event_bridge_active and handler_registry_size" do
      described_class.start!(concurrency: 2)
      status = bootstrap.status

      expect(status).to include(
        running: true, state: "running", backend: "memory", environment: "test",
        event_bridge_active: true, handler_registry_size: a_kind_of(Integer)
      )
      expect(status.keys).to include(:uptime_seconds, :steps_processed, :steps_in_flight, :supported_namespaces)
    end

    it "counts the handlers resolved so far" do
      described_class.start!
      uuid = create_test_task
      TaskerCore.wait_for_task(uuid, timeout: 5)

      expect(bootstrap.status[:handler_registry_size])
        .to eq(TaskerCore::Registry::HandlerRegistry.instance.handlers.size)
      expect(TaskerCore::Registry::HandlerRegistry.instance.handlers).to include("TestHandlers::Increment")
    end

    it "reports a stopped worker and an inactive bridge after shutdown!" do
      described_class.start!
      bootstrap.shutdown!

      expect(bootstrap.status).to include(running: false, state: "stopped", event_bridge_active: false)
    end
  end

  describe "#shutdown!" do
    it "is idempotent: true the first time, false (doing nothing) after" do
      described_class.start!
      ran = 0
      on_shutdown { ran += 1 }

      expect(bootstrap.shutdown!).to be(true)
      expect(bootstrap.shutdown!).to be(false)
      expect(ran).to eq(1)
    end

    it "returns false when never started" do
      expect(bootstrap.shutdown!).to be(false)
    end

    it "stops the handler threads and removes the bridge subscription" do
      described_class.start!(concurrency: 4)
      bootstrap.shutdown!

      expect(Thread.list.map(&:name).grep(/tasker-handler/)).to be_empty
      expect(step_subscribers).to eq(0)
      expect(TaskerCore::FFI.worker_status).to eq(running: false, state: "stopped")
    end

    it "lets the step in flight finish before it returns" do
      Dir.mktmpdir("tasker-bootstrap") do |dir|
        BootstrapSpecHandlers::STARTED.clear
        BootstrapSpecHandlers::FINISHED.clear
        described_class.start!(templates: naps_template(dir), concurrency: 1)
        TaskerCore.create_task(namespace: "bootstrap_spec", name: "naps", context: { "seconds" => 0.4 })
        Timeout.timeout(5) { BootstrapSpecHandlers::STARTED.pop }

        expect(BootstrapSpecHandlers::FINISHED).to be_empty
        expect(bootstrap.shutdown!).to be(true)
        expect(BootstrapSpecHandlers::FINISHED.size).to eq(1)
      end
    end
  end

  describe "#on_shutdown" do
    it "needs a block" do
      expect { bootstrap.on_shutdown }.to raise_error(ArgumentError)
    end

    it "runs every hook once per shutdown, after the worker stopped" do
      seen = []
      on_shutdown { seen << [:first, TaskerCore::FFI.worker_status[:state]] }
      on_shutdown { seen << [:second, TaskerCore::FFI.worker_status[:state]] }

      described_class.start!
      bootstrap.shutdown!
      bootstrap.shutdown!
      expect(seen).to eq([%i[first] + ["stopped"], %i[second] + ["stopped"]])

      described_class.start!
      bootstrap.shutdown!
      expect(seen.size).to eq(4)
    end

    it "keeps running the other hooks when one raises (and logs the failure)" do
      # In a child: the failure is logged at ERROR, which would land in this suite's output.
      out, err, status = run_ruby(<<~RUBY, env: child_env, timeout: 10)
        require "tasker_core"
        bootstrap = TaskerCore::Worker::Bootstrap.instance
        bootstrap.on_shutdown { raise "hook failure" }
        bootstrap.on_shutdown { puts "second hook ran" }
        TaskerCore::Worker::Bootstrap.start!
        p bootstrap.shutdown!
      RUBY

      expect(status).to be_success, err
      expect(out).to eq("second hook ran\ntrue\n")
      expect(err).to match(/ERROR .*on_shutdown hook raised.*hook failure/)
    end
  end

  describe "start! after shutdown!" do
    it "works on the same singleton, cycle after cycle, each step run exactly once" do
      completions = Queue.new
      listener = proc { |event| completions << event.payload }
      bridge.subscribe(TaskerCore::Worker::EventBridge::STEP_COMPLETION, &listener)
      GC.start
      ruby_threads = Thread.list.size
      os_threads = os_thread_count

      begin
        4.times do |cycle|
          described_class.start!(concurrency: 2)
          expect(bootstrap.running?).to be(true)
          expect(step_subscribers).to eq(1)

          uuid = create_test_task(context: { "value" => cycle })
          expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")
          expect(bootstrap.shutdown!).to be(true)
          expect(bootstrap.running?).to be(false)
        end
      ensure
        bridge.unsubscribe(listener)
      end

      sent = []
      sent << completions.pop until completions.empty?
      # 4 tasks × 3 steps, each completed once and accepted: no duplicate handler runs.
      expect(sent.size).to eq(12)
      expect(sent.map { |c| c[:accepted] }).to all(be(true))
      expect(Thread.list.size).to eq(ruby_threads)
      settled = begin
        eventually(timeout: 3) { os_thread_count <= os_threads }
      rescue RuntimeError
        false
      end
      expect(settled).to be(true), "OS threads: #{os_threads} before, #{os_thread_count} after 4 cycles"
    end
  end

  describe "signals, in a child process" do
    # Starts a child, waits for "ready" on its stdout, sends `signal`, and returns
    # [stdout after ready, stderr, exit status, seconds from signal to exit].
    def run_until_signal(code, signal, ready_timeout: 10, exit_timeout: 5)
      Open3.popen3(child_env, RbConfig.ruby, "-I", SpecHelpers::LIB, "-e", code,
                   chdir: Dir.tmpdir) do |stdin, stdout, stderr, wait|
        stdin.close
        errors = Thread.new { stderr.read }
        line = Timeout.timeout(ready_timeout) { stdout.gets }
        unless line == "ready\n"
          Process.kill("KILL", wait.pid)
          raise "child did not get ready: #{line.inspect}; stderr: #{errors.value}"
        end

        sent_at = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        Process.kill(signal, wait.pid)
        unless wait.join(exit_timeout)
          Process.kill("KILL", wait.pid)
          wait.join
          raise "child still running #{exit_timeout}s after SIG#{signal}; stderr: #{errors.value}"
        end
        elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - sent_at
        [stdout.read, errors.value, wait.value, elapsed]
      end
    end

    let(:child) do
      <<~RUBY
        require "tasker_core"
        TaskerCore::Worker::Bootstrap.start!
        TaskerCore::Worker::Bootstrap.instance.on_shutdown { puts "hook ran"; $stdout.flush }
        puts "ready"
        $stdout.flush
        sleep
      RUBY
    end

    # After the drain the process ends as Ruby's own handler ends it (the handler that was there
    # before is called): killed by the signal, so a shell sees 143 (TERM) or 130 (INT).
    %w[TERM INT].each do |signal|
      it "shuts down gracefully on SIG#{signal}, runs the hook once and ends as Ruby's default handler does" do
        out, err, status, elapsed = run_until_signal(child, signal)

        expect(status.termsig).to eq(Signal.list.fetch(signal)), "status #{status.inspect}; stderr: #{err}"
        expect(out.lines.map(&:chomp)).to eq(["hook ran"])
        expect(elapsed).to be < 5
      end
    end

    it "finishes the step in flight before exiting on SIGTERM" do
      Dir.mktmpdir("tasker-bootstrap") do |dir|
        code = <<~RUBY
          require "tasker_core"
          STARTED = Queue.new
          class Nap < TaskerCore::StepHandler::Base
            def call(_task, _sequence, _step)
              STARTED << true
              sleep 0.5
              puts "step finished"; $stdout.flush
              {}
            end
          end
          File.write(File.join(#{dir.inspect}, "nap.yml"), <<~YAML)
            namespace: child
            name: nap
            version: 1.0.0
            steps:
              - { name: nap, handler: { callable: Nap } }
          YAML
          TaskerCore::Worker::Bootstrap.start!(templates: #{dir.inspect})
          TaskerCore::Worker::Bootstrap.instance.on_shutdown { puts "hook ran"; $stdout.flush }
          TaskerCore.create_task(namespace: "child", name: "nap")
          STARTED.pop
          puts "ready"
          $stdout.flush
          sleep
        RUBY
        out, err, status, = run_until_signal(code, "TERM")

        expect(status.termsig).to eq(Signal.list.fetch("TERM")), "status #{status.inspect}; stderr: #{err}"
        expect(out.lines.map(&:chomp)).to eq(["step finished", "hook ran"])
      end
    end

    it "shuts down at exit when the program simply ends" do
      out, err, status = run_ruby(<<~RUBY, env: child_env, timeout: 10)
        require "tasker_core"
        TaskerCore::Worker::Bootstrap.start!
        TaskerCore::Worker::Bootstrap.instance.on_shutdown { puts "hook ran" }
        puts "main done"
      RUBY

      expect(status.exitstatus).to eq(0), err
      expect(out.lines.map(&:chomp)).to eq(["main done", "hook ran"])
    end
  end
end
