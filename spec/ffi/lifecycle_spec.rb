# frozen_string_literal: true

require "tmpdir"

# Handlers for the templates written by this spec: a step that takes its time, so that the
# worker can be observed with a step in flight.
module LifecycleSpecHandlers
  STARTED = Queue.new
  FINISHED = Queue.new

  class Nap < TaskerCore::StepHandler::Base
    def call(task, _sequence, step)
      STARTED << step.name
      sleep task.context.fetch("seconds", 0.5)
      FINISHED << step.name
      { "slept" => true }
    end
  end
end

RSpec.describe "TaskerCore::FFI worker lifecycle" do
  let(:ffi) { TaskerCore::FFI }

  # Native threads the engine owns (named by the engine crate), read from /proc.
  def engine_thread_count
    Dir.children("/proc/self/task").count do |tid|
      File.read("/proc/self/task/#{tid}/comm").strip == "tasker-engine"
    rescue Errno::ENOENT
      false
    end
  end

  describe ".bootstrap_worker" do
    it "starts a worker and answers success, handle_id, worker_id and status running" do
      result = ffi.bootstrap_worker({})

      expect(result).to include(success: true, status: "running")
      expect(result[:handle_id]).to match(/\A\h{8}-\h{4}-\h{4}-\h{4}-\h{12}\z/)
      expect(result[:worker_id]).to be_a(String).and(satisfy { |id| !id.empty? })
      expect(ffi.worker_status).to include(running: true, state: "running", worker_id: result[:worker_id])
    end

    it "uses the worker_id it is given" do
      result = ffi.bootstrap_worker(worker_id: "lifecycle-worker-1")

      expect(result[:worker_id]).to eq("lifecycle-worker-1")
      expect(ffi.worker_status[:worker_id]).to eq("lifecycle-worker-1")
    end

    it "gives every bootstrap a new handle_id and generated worker_id" do
      first = ffi.bootstrap_worker({})
      ffi.stop_worker
      second = ffi.bootstrap_worker({})

      expect(second[:handle_id]).not_to eq(first[:handle_id])
      expect(second[:worker_id]).not_to eq(first[:worker_id])
    end

    it "refuses a second bootstrap while a worker runs, and leaves the first one running" do
      first = ffi.bootstrap_worker({})

      expect { ffi.bootstrap_worker({}) }
        .to raise_error(TaskerCore::WorkerBootstrapError, /already running/)
      expect(ffi.worker_status).to include(running: true, state: "running", worker_id: first[:worker_id])
      expect(engine_thread_count).to eq(1)
    end
  end

  describe "calls that need a worker, without one" do
    it "stop_worker raises WorkerNotInitializedError" do
      expect { ffi.stop_worker }.to raise_error(TaskerCore::WorkerNotInitializedError)
    end

    it "stop_worker raises WorkerNotInitializedError after the worker was stopped" do
      ffi.bootstrap_worker({})
      expect(ffi.stop_worker).to be(true)
      expect { ffi.stop_worker }.to raise_error(TaskerCore::WorkerNotInitializedError)
    end

    it "transition_to_graceful_shutdown raises WorkerNotInitializedError" do
      expect { ffi.transition_to_graceful_shutdown }.to raise_error(TaskerCore::WorkerNotInitializedError)
    end
  end

  describe ".worker_status" do
    it "is {running: false, state: \"stopped\"} with no worker" do
      expect(ffi.worker_status).to eq(running: false, state: "stopped")
    end

    context "with a worker running" do
      before { ffi.bootstrap_worker(concurrency: 3) }

      let(:status) { ffi.worker_status }

      it "has every key the contract lists, with the right types" do
        expect(status).to include(
          running: true,
          state: "running",
          worker_id: a_kind_of(String),
          environment: a_kind_of(String),
          backend: "memory",
          deployment_mode: "Hybrid",
          uptime_seconds: a_kind_of(Float),
          steps_processed: a_kind_of(Integer),
          steps_failed: a_kind_of(Integer),
          steps_in_flight: a_kind_of(Integer),
          supported_namespaces: a_kind_of(Array),
          web_api_enabled: false,
          database_pool_size: 0,
          database_pool_idle: 0
        )
        expect(status.keys).to all(be_a(Symbol))
      end

      it "starts its counters at 0" do
        expect(status.values_at(:steps_processed, :steps_failed, :steps_in_flight)).to eq([0, 0, 0])
      end

      it "lists the namespaces of the templates it loaded" do
        expect(status[:supported_namespaces]).to eq(["test"])
      end

      it "reports an uptime that grows" do
        first = ffi.worker_status[:uptime_seconds]
        sleep 0.05
        second = ffi.worker_status[:uptime_seconds]

        expect(first).to be >= 0.0
        expect(second - first).to be >= 0.04
      end

      it "takes its environment from TASKER_ENV" do
        expect(status[:environment]).to eq("test")
      end
    end

    it "counts the steps it ran" do
      TaskerCore::Worker::Bootstrap.start!(concurrency: 2)
      uuid = create_test_task
      expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")

      status = eventually { ffi.worker_status.then { |s| s if s[:steps_processed] == 3 } }
      expect(status).to include(steps_processed: 3, steps_failed: 0, steps_in_flight: 0)
    end

    describe "environment, in a child process without TASKER_ENV" do
      let(:code) do
        <<~RUBY
          require "tasker_core"
          TaskerCore::FFI.bootstrap_worker({})
          print TaskerCore::FFI.worker_status[:environment]
          TaskerCore::FFI.stop_worker
        RUBY
      end
      let(:cleared) { { "TASKER_ENV" => nil, "RAILS_ENV" => nil, "RACK_ENV" => nil } }

      def environment_with(env)
        out, err, status = run_ruby(code, env: cleared.merge(env))
        expect(status).to be_success, "child failed: #{err}"
        out
      end

      it "uses RAILS_ENV" do
        expect(environment_with("RAILS_ENV" => "staging")).to eq("staging")
      end

      it "uses RACK_ENV when RAILS_ENV is unset" do
        expect(environment_with("RACK_ENV" => "production")).to eq("production")
      end

      it "prefers RAILS_ENV to RACK_ENV" do
        expect(environment_with("RAILS_ENV" => "staging", "RACK_ENV" => "production")).to eq("staging")
      end

      it "prefers TASKER_ENV to both" do
        expect(environment_with("TASKER_ENV" => "qa", "RAILS_ENV" => "staging", "RACK_ENV" => "production"))
          .to eq("qa")
      end

      it "falls back to development" do
        expect(environment_with({})).to eq("development")
      end
    end
  end

  describe "states, with a step in flight" do
    around do |example|
      Dir.mktmpdir("tasker-lifecycle") do |dir|
        File.write(File.join(dir, "naps.yml"), <<~YAML)
          namespace: lifecycle
          name: naps
          version: 1.0.0
          steps:
            - { name: nap_a, handler: { callable: LifecycleSpecHandlers::Nap } }
            - { name: nap_b, handler: { callable: LifecycleSpecHandlers::Nap } }
        YAML
        @templates = dir
        LifecycleSpecHandlers::STARTED.clear
        LifecycleSpecHandlers::FINISHED.clear
        example.run
      end
    end

    it "is running, then shutting_down (in-flight step finishes, queued one never starts), then stopped" do
      # One handler thread: one step runs, the other waits in the dispatch queue.
      TaskerCore::Worker::Bootstrap.start!(templates: @templates, concurrency: 1)
      expect(ffi.worker_status[:state]).to eq("running")

      TaskerCore.create_task(namespace: "lifecycle", name: "naps", context: { "seconds" => 0.6 })
      started = Timeout.timeout(5) { LifecycleSpecHandlers::STARTED.pop }
      expect(ffi.worker_status).to include(state: "running", steps_in_flight: 2)

      expect(ffi.transition_to_graceful_shutdown).to be(true)
      status = eventually { ffi.worker_status.then { |s| s if s[:state] == "shutting_down" } }
      # The queued step went back to the engine; only the running one is in flight.
      expect(status).to include(running: true, steps_in_flight: 1)
      expect(LifecycleSpecHandlers::FINISHED).to be_empty

      expect(ffi.stop_worker).to be(true)
      # stop_worker drained: the running step finished before it returned.
      expect(LifecycleSpecHandlers::FINISHED.size).to eq(1)
      expect(LifecycleSpecHandlers::FINISHED.pop).to eq(started)
      expect(ffi.worker_status).to eq(running: false, state: "stopped")

      sleep 0.1 # a queued step that wrongly started would show up here
      late = []
      late << LifecycleSpecHandlers::STARTED.pop until LifecycleSpecHandlers::STARTED.empty?
      expect(late).to eq([]), "started after the graceful shutdown: #{late.inspect} (first: #{started})"
    end

    it "refuses new tasks while shutting down" do
      TaskerCore::Worker::Bootstrap.start!(templates: @templates, concurrency: 1)
      TaskerCore.create_task(namespace: "lifecycle", name: "naps", context: { "seconds" => 0.3 })
      Timeout.timeout(5) { LifecycleSpecHandlers::STARTED.pop }

      ffi.transition_to_graceful_shutdown
      eventually { ffi.worker_status[:state] == "shutting_down" }

      # The contract's class for "no worker to take this"; the engine refuses rather than queueing.
      expect { TaskerCore.create_task(namespace: "lifecycle", name: "naps") }
        .to raise_error(TaskerCore::WorkerNotInitializedError, /shutting down: it takes no new tasks/)
    end
  end

  describe "stop_worker waiting for a step in flight" do
    it "can be interrupted (Thread#raise), leaves the worker stopping, and finishes when called again" do
      ffi.bootstrap_worker(concurrency: 1)
      ffi.create_task(namespace: "test", name: "linear", version: "1.0.0", context: {})
      event = ffi.next_step_event(5)
      expect(event).to include(:event_id, :task_uuid, :step_uuid)

      stopper = Thread.new { ffi.stop_worker }
      stopper.report_on_exception = false
      eventually { stopper.status == "sleep" }
      sleep 0.05
      expect(stopper).to be_alive # waiting for the step in flight

      raised_at = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      stopper.raise(RuntimeError, "interrupt the wait")
      expect { stopper.join }.to raise_error(RuntimeError, "interrupt the wait")
      expect(Process.clock_gettime(Process::CLOCK_MONOTONIC) - raised_at).to be < 1
      expect(ffi.worker_status).to include(state: "shutting_down", steps_in_flight: 1)

      completion = event.slice(:event_id, :task_uuid, :step_uuid).merge(success: true, result: {})
      expect(ffi.send_step_completion_event(completion)).to be(true)
      expect(ffi.stop_worker).to be(true)
      expect(ffi.worker_status).to eq(running: false, state: "stopped")
    end
  end

  describe "with signals arriving all the time" do
    # Every signal sets the main thread's interrupt flag and fires the unblocking function of a
    # GVL-released wait, but a trap that returns raises nothing: bootstrap and stop must not
    # mistake that (or a timer tick, or SIGCHLD) for a real interrupt and fail.
    it "bootstraps and stops every time" do
      traps = 0
      previous = trap("USR2") { traps += 1 }
      flooder = spawn("sh", "-c", "while kill -USR2 #{Process.pid} 2>/dev/null; do :; done")
      failures = []
      cycles = 0
      begin
        deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 0.5
        while Process.clock_gettime(Process::CLOCK_MONOTONIC) < deadline
          cycles += 1
          begin
            ffi.bootstrap_worker({})
            ffi.stop_worker
          rescue TaskerCore::Error => e
            failures << e.message
            ffi.stop_worker if ffi.worker_status[:running]
          end
        end
      ensure
        Process.kill("KILL", flooder)
        Process.wait(flooder)
        sleep 0.05 # let Ruby run the traps still queued before the default action is back
        trap("USR2", previous)
      end

      expect(traps).to be > 10
      expect(cycles).to be > 5
      expect(failures.tally).to eq({})
    end
  end

  describe "after fork" do
    # Runs one step by hand on the current worker: {worker:, accepted:, status:}.
    def run_one_step
      uuid = TaskerCore.create_task(namespace: "workflow", name: "quick")
      event = ffi.next_step_event(5)
      accepted = ffi.send_step_completion_event(event_id: event[:event_id], task_uuid: uuid,
                                                step_uuid: event[:step_uuid], success: true)
      { worker: ffi.worker_status[:worker_id], accepted: accepted,
        status: TaskerCore.wait_for_task(uuid, timeout: 5)[:status] }
    end

    it "a child does not see the parent's worker and can start its own; the parent's keeps running" do
      ffi.bootstrap_worker(templates: WorkflowSpecHelpers::TEMPLATES_B, worker_id: "parent")
      reader, writer = IO.pipe
      pid = fork do
        reader.close
        report = { after_fork: ffi.worker_status }
        ffi.bootstrap_worker(templates: WorkflowSpecHelpers::TEMPLATES_B, worker_id: "child")
        report[:run] = run_one_step
        ffi.stop_worker
        writer.write(Marshal.dump(report))
        exit!(0)
      end
      writer.close
      report = Marshal.load(reader.read) # rubocop:disable Security/MarshalLoad
      _, status = Process.wait2(pid)

      expect(status).to be_success
      expect(report[:after_fork]).to eq(running: false, state: "stopped")
      expect(report[:run]).to eq(worker: "child", accepted: true, status: "complete")
      expect(run_one_step).to eq(worker: "parent", accepted: true, status: "complete")
    end
  end

  describe "repeated bootstrap and stop" do
    it "leaks no threads over 30 cycles in one process" do
      # Warm up: the first cycle may create threads the process keeps (Ruby's own helpers).
      ffi.bootstrap_worker({})
      ffi.stop_worker
      GC.start
      ruby_before = Thread.list.size
      os_before = eventually { os_thread_count }

      30.times do |i|
        result = ffi.bootstrap_worker(worker_id: "cycle-#{i}", concurrency: 2)
        expect(result[:status]).to eq("running")
        expect(ffi.worker_status[:worker_id]).to eq("cycle-#{i}")
        expect(ffi.stop_worker).to be(true)
        expect(ffi.worker_status).to eq(running: false, state: "stopped")
      end

      expect(Thread.list.size).to eq(ruby_before)
      expect(eventually { engine_thread_count.zero? }).to be(true)
      settled = begin
        eventually(timeout: 3) { os_thread_count <= os_before }
      rescue RuntimeError
        false
      end
      expect(settled).to be(true), "OS threads: #{os_before} before, #{os_thread_count} after 30 cycles"
    end
  end
end
