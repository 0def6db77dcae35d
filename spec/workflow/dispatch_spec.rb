# frozen_string_literal: true

RSpec.describe "Dispatch to Ruby handler threads" do
  include_context "workflow worker"

  # Start a thread that waits in next_step_event like a handler-pool thread: `false` (a wait cut
  # short with nothing, which Ruby may cause at any time) sends it round again; an event or nil ends
  # it. Gives it time to get into the wait.
  def blocked_waiter
    ready = Queue.new
    thread = Thread.new do
      ready << true
      loop do
        result = TaskerCore::FFI.next_step_event
        break result unless result == false
      end
    end
    thread.report_on_exception = false
    ready.pop
    sleep 0.1
    expect(thread).to be_alive
    thread
  end

  describe "concurrency" do
    it "runs eight 0.1 s steps at once with concurrency: 8" do
      start_worker(concurrency: 8)
      # Warm up: the first run resolves and autoloads the handler.
      run_task("fanout")
      WorkflowRecorder.reset!

      started = monotonic
      uuids = Array.new(3) { create_workflow_task("fanout") }
      uuids.each { |uuid| expect(TaskerCore.wait_for_task(uuid, timeout: 10)[:status]).to eq("complete") }
      elapsed = monotonic - started

      intervals = WorkflowRecorder.executions.map { |e| [e.started_at, e.finished_at] }
      expect(intervals.size).to eq(24)
      expect(max_overlap(intervals)).to eq(8)
      expect(WorkflowRecorder.executions.map(&:thread).uniq.size).to eq(8)
      # Sequentially: 24 x 0.1 s = 2.4 s. Eight at a time: 0.3 s plus overhead.
      expect(elapsed).to be < 1.0
    end

    it "never runs more steps at once than concurrency" do
      start_worker(concurrency: 3)

      short = { "plan" => (1..8).to_h { |i| ["s#{i}", { "sleep" => 0.03 }] } }
      uuids = Array.new(2) { create_workflow_task("fanout", short) }
      uuids.each { |uuid| expect(TaskerCore.wait_for_task(uuid, timeout: 10)[:status]).to eq("complete") }

      intervals = WorkflowRecorder.executions.map { |e| [e.started_at, e.finished_at] }
      expect(intervals.size).to eq(16)
      expect(max_overlap(intervals)).to eq(3)
    end
  end

  describe "TaskerCore::FFI.next_step_event" do
    it "returns false when its timeout passes with no work" do
      start_worker(concurrency: 1)

      # A wait may also end early with false (see blocked_waiter): at least one of three runs its course.
      waits = Array.new(3) do
        started = monotonic
        [TaskerCore::FFI.next_step_event(0.05), monotonic - started]
      end
      expect(waits.map(&:first)).to eq([false, false, false])
      expect(waits.map(&:last)).to all(be < 0.5)
      expect(waits.map(&:last).max).to be >= 0.045
    end

    it "returns nil with no worker running" do
      expect(TaskerCore::FFI.next_step_event(0.05)).to be_nil
    end

    it "rejects a negative or non-numeric timeout" do
      start_worker(concurrency: 1)

      expect { TaskerCore::FFI.next_step_event(-1) }.to raise_error(ArgumentError, /timeout/)
      expect { TaskerCore::FFI.next_step_event("soon") }.to raise_error(ArgumentError, /timeout/)
    end

    it "returns promptly when its thread is killed" do
      start_worker(concurrency: 2)
      waiter = blocked_waiter
      expect(waiter).to be_alive

      started = monotonic
      waiter.kill
      expect(waiter.join(2)).to eq(waiter)
      expect(monotonic - started).to be < 0.5
      expect(waiter).not_to be_alive
      expect(bootstrap.status[:handler_threads_alive]).to eq(2)
    end

    it "raises promptly what Thread#raise sends" do
      start_worker(concurrency: 2)
      waiter = blocked_waiter
      error_class = Class.new(StandardError)

      started = monotonic
      waiter.raise(error_class, "wake up")
      outcome = begin
        waiter.join(2) ? [:returned, waiter.value] : [:still_waiting, waiter.status]
      rescue error_class => e
        [:raised, e.message]
      end
      expect(outcome).to eq([:raised, "wake up"])
      expect(monotonic - started).to be < 0.5
    end

    it "returns false early when Thread#wakeup cuts the wait short" do
      start_worker(concurrency: 1)
      woken = false
      ready = Queue.new
      waiter = Thread.new do
        ready << true
        loop do
          result = TaskerCore::FFI.next_step_event(5)
          break [result, monotonic] if woken
        end
      end
      ready.pop
      sleep 0.1

      woken = true
      sent = monotonic
      waiter.wakeup
      expect(waiter.join(2)).to eq(waiter)
      result, returned = waiter.value
      expect(result).to be(false)
      expect(returned - sent).to be < 0.5
    end

    it "leaves a handler-pool thread serving when its wait is cut short (Thread#wakeup)" do
      start_worker(concurrency: 1)
      pool = Thread.list.select { |t| t.name.to_s.start_with?("tasker-handler-") }
      expect(pool.size).to eq(1)
      sleep 0.05

      3.times do
        pool.first.wakeup
        sleep 0.05
      end

      expect(pool.first).to be_alive
      expect(bootstrap.status[:handler_threads_alive]).to eq(1)
      expect(run_task("quick")[:status]).to eq("complete")
    end

    it "returns nil promptly in a blocked thread when the worker stops (FFI.stop_worker)" do
      TaskerCore::FFI.bootstrap_worker(templates: WorkflowSpecHelpers::TEMPLATES_B)
      waiter = blocked_waiter

      started = monotonic
      expect(TaskerCore::FFI.stop_worker).to be(true)
      expect(waiter.join(2)).to eq(waiter)
      expect(waiter.value).to be_nil
      expect(monotonic - started).to be < 0.5
    end

    it "returns nil promptly in blocked threads when Bootstrap#shutdown! runs" do
      start_worker(concurrency: 2)
      waiters = Array.new(3) { blocked_waiter }
      pool = Thread.list.select { |t| t.name.to_s.start_with?("tasker-handler-") }
      expect(pool.size).to eq(2)

      started = monotonic
      bootstrap.shutdown!
      waiters.each { |w| expect(w.join(2)).to eq(w) }
      expect(waiters.map(&:value)).to eq([nil, nil, nil])
      expect(pool).to all(satisfy { |t| !t.alive? })
      expect(monotonic - started).to be < 0.5
    end

    it "hands out an event a Ruby thread can run by hand, and the engine takes its completion" do
      TaskerCore::FFI.bootstrap_worker(templates: WorkflowSpecHelpers::TEMPLATES_B)
      uuid = create_workflow_task("quick")

      event = take_next_event(within: 2)
      expect(event).to include(task_uuid: uuid, event_id: a_string_matching(/\A\h{8}-/))
      expect(event[:task_sequence_step][:workflow_step]).to include(name: "work", attempts: 1, max_attempts: 3)
      expect(take_next_event(within: 0.05)).to be(false)

      completion = { event_id: event[:event_id], task_uuid: uuid, step_uuid: event[:step_uuid], success: true,
                     result: { "by" => "hand" } }
      expect(TaskerCore::FFI.send_step_completion_event(completion)).to be(true)
      final = TaskerCore.wait_for_task(uuid, timeout: 5)
      expect(final[:status]).to eq("complete")
      expect(step_status(final, "work")).to include(result: { "by" => "hand" }, attempts: 1)
    end
  end

  describe "EventBridge listeners" do
    it "other subscribers to step.execution.received and step.completion.sent see every event" do
      start_worker(concurrency: 4)
      executions = listen("step.execution.received")
      completions = listen("step.completion.sent")

      uuids = Array.new(20) { create_workflow_task("dag") }
      uuids.each { |uuid| expect(TaskerCore.wait_for_task(uuid, timeout: 10)[:status]).to eq("complete") }
      # The last completion event is published right after the engine accepts it.
      eventually { completions.size >= 120 }
      bootstrap.shutdown!

      executed = drain(executions)
      completed = drain(completions)
      expect(executed.size).to eq(120)
      expect(completed.size).to eq(120)
      expect(executed.map(&:id).uniq).to eq(["step.execution.received"])
      expect(executed.map { |e| e[:task_sequence_step] }).to all(be_a(TaskerCore::Models::TaskSequenceStepWrapper))
      expect(executed.map { |e| e[:task_uuid] }.tally.values).to all(eq(6))
      expect(completed.map { |e| e[:accepted] }).to all(be(true))
      expect(completed.map { |e| e[:success] }).to all(be(true))
      expect(completed.map { |e| e[:event_id] }).to match_array(executed.map { |e| e[:event_id] })
      expect(executed.map { |e| e[:step_uuid] }.uniq.size).to eq(120)
      expect(WorkflowRecorder.executions.size).to eq(120)
    end

    it "listener objects with on_step_execution_received / on_step_completion_sent see every event" do
      listener = Class.new do
        attr_reader :received, :sent

        def initialize
          @received = Queue.new
          @sent = Queue.new
        end

        def on_step_execution_received(event)
          @received << event
        end

        def on_step_completion_sent(event)
          @sent << event
        end
      end.new
      start_worker(concurrency: 2)
      attach_listener(listener)
      expect(bridge.subscribed?(listener)).to be(true)

      uuids = Array.new(5) { create_workflow_task("dag") }
      uuids.each { |uuid| TaskerCore.wait_for_task(uuid, timeout: 10) }
      eventually { listener.sent.size >= 30 }
      bootstrap.shutdown!

      received = drain(listener.received)
      sent = drain(listener.sent)
      expect(received.size).to eq(30)
      expect(sent.size).to eq(30)
      expect(received.map { |e| e[:task_uuid] }.uniq).to match_array(uuids)
      expect(sent.map { |e| e[:event_id] }).to match_array(received.map { |e| e[:event_id] })
      expect(sent.map { |e| e[:accepted] }).to all(be(true))
    end

    it "stops delivering to a listener once it unsubscribes" do
      start_worker(concurrency: 2)
      received = Queue.new
      block = proc { |event| received << event }
      bridge.subscribe("step.execution.received", &block)
      run_task("dag")
      bridge.unsubscribe(block)
      run_task("dag")

      expect(received.size).to eq(6)
      expect(WorkflowRecorder.executions.size).to eq(12)
    end

    it "keeps the handler thread when another subscriber raises, publishing bridge.error and logging it" do
      # In a child: the failure is logged at ERROR, which would land in this suite's output.
      # Only the template it runs: start! checks every handler its templates name, and the child
      # defines Scripted alone.
      quick = File.join(WorkflowSpecHelpers::TEMPLATES_B, "quick.yml")
      out, err, status = run_ruby(<<~RUBY, env: { "TASKER_TEMPLATE_PATH" => quick })
        require "tasker_core"
        module WorkflowHandlers
          class Scripted < TaskerCore::StepHandler::Base
            def call(_task, _sequence, step)
              { "attempt" => step.attempts }
            end
          end
        end
        bridge = TaskerCore::Worker::EventBridge.instance
        errors = Queue.new
        bridge.subscribe("bridge.error") { |event| errors << event[:error].message }
        TaskerCore::Worker::Bootstrap.start!(concurrency: 1)
        bridge.subscribe("step.execution.received") { |_event| raise "listener bug" }
        statuses = Array.new(2) do
          uuid = TaskerCore.create_task(namespace: "workflow", name: "quick")
          TaskerCore.wait_for_task(uuid, timeout: 10)[:status]
        end
        alive = TaskerCore::Worker::Bootstrap.instance.status[:handler_threads_alive]
        TaskerCore::Worker::Bootstrap.instance.shutdown!
        p [statuses, Array.new(errors.size) { errors.pop }, alive]
      RUBY

      expect(status).to be_success, err
      expect(out).to eq(%([["complete", "complete"], ["listener bug", "listener bug"], 1]\n))
      expect(err).to match(/ERROR .*subscriber raised.*listener bug/)
    end
  end
end
