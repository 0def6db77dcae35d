# frozen_string_literal: true

module WorkflowTaskApiSpec
  RSpec.describe "The task API on the embedded engine" do
    include_context "workflow worker"

    def slow(seconds)
      { "plan" => { "work" => { "sleep" => seconds } } }
    end

    describe "TaskerCore.wait_for_tasks" do
      before { start_worker(concurrency: 4) }

      it "answers every task's final status, in the order given, finished or not yet" do
        done = create_workflow_task("quick")
        TaskerCore.wait_for_task(done, timeout: 10)
        failing = create_workflow_task("quick", { "plan" => { "work" => { "raise" => "permanent" } } })
        running = Array.new(5) { create_workflow_task("quick", slow(0.05)) }
        uuids = [running[0], done, failing, *running[1..], done]

        finals = TaskerCore.wait_for_tasks(uuids, timeout: 10)

        expect(finals.map { |f| f[:task_uuid] }).to eq(uuids)
        expect(finals.map { |f| f[:status] }).to eq(%w[complete complete error] + (%w[complete] * 4) + %w[complete])
        expect(finals).to all(include(steps_retained: true))
        expect(finals[0][:steps].first).to include(name: "work", status: "complete", attempts: 1)
        expect(finals[2][:steps].first[:error_message]).to match(/planned permanent failure/)
        # What they answered is what the tasks are now.
        uuids.each_with_index { |uuid, i| expect(TaskerCore.task_status(uuid)).to eq(finals[i]) }
      end

      it "answers [] for no uuids" do
        expect(TaskerCore.wait_for_tasks([], timeout: 1)).to eq([])
      end

      it "raises TaskNotFoundError for a uuid never created, before waiting for anything" do
        running = create_workflow_task("quick", slow(0.5))
        started = monotonic

        expect { TaskerCore.wait_for_tasks([running, SecureRandom.uuid], timeout: 10) }
          .to raise_error(TaskerCore::TaskNotFoundError)
        expect { TaskerCore.wait_for_tasks([running, "not-a-uuid"], timeout: 10) }
          .to raise_error(TaskerCore::TaskNotFoundError, /not a UUID/)
        expect { TaskerCore.wait_for_tasks([running, 42], timeout: 10) }.to raise_error(ArgumentError)
        expect { TaskerCore.wait_for_tasks(running, timeout: 10) }.to raise_error(ArgumentError, /Array/)
        expect(monotonic - started).to be < 0.4
      end

      it "raises Timeout::Error when one has not finished in time, and can be asked again" do
        quick = create_workflow_task("quick")
        slow_task = create_workflow_task("quick", slow(0.6))
        started = monotonic

        expect { TaskerCore.wait_for_tasks([quick, slow_task], timeout: 0.1) }
          .to raise_error(Timeout::Error, /2 tasks did not all finish within 0.1s/)
        expect(monotonic - started).to be_between(0.1, 0.5)
        expect(TaskerCore::FFI.wait_for_tasks([slow_task], 0)).to be_nil

        finals = TaskerCore.wait_for_tasks([quick, slow_task], timeout: 10)
        expect(finals.map { |f| f[:status] }).to eq(%w[complete complete])
      end

      it "is cut short by Thread#raise, and the tasks run on" do
        uuid = create_workflow_task("quick", slow(0.5))
        waiter = Thread.new { TaskerCore.wait_for_tasks([uuid], timeout: 30) }
        waiter.report_on_exception = false
        sleep 0.05
        started = monotonic
        waiter.raise(Interrupt, "stop waiting")

        expect { waiter.join }.to raise_error(Interrupt, "stop waiting")
        expect(monotonic - started).to be < 0.2
        expect(TaskerCore.wait_for_tasks([uuid], timeout: 10).first[:status]).to eq("complete")
      end
    end

    it "ends waits for tasks that will never finish when the worker stops, and refuses new ones" do
      # No handler threads: nothing runs.
      TaskerCore::FFI.bootstrap_worker(templates: WorkflowSpecHelpers::TEMPLATES_B)
      uuids = Array.new(3) { create_workflow_task("quick") }
      one = Thread.new { TaskerCore.wait_for_task(uuids[0], timeout: nil) }
      many = Thread.new { TaskerCore.wait_for_tasks(uuids, timeout: nil) }
      [one, many].each { |t| t.report_on_exception = false }
      eventually { [one, many].all? { |t| t.status == "sleep" } }
      started = monotonic

      TaskerCore::FFI.stop_worker

      [one, many].each do |waiter|
        expect { waiter.join(2) }.to raise_error(TaskerCore::WorkerNotInitializedError)
      end
      expect(monotonic - started).to be < 1
      expect { TaskerCore.wait_for_tasks(uuids, timeout: 1) }.to raise_error(TaskerCore::WorkerNotInitializedError)
    end

    it "answers tasks finished long ago from the final-status index, beyond task_retention" do
      start_worker(concurrency: 4, task_retention: 5, task_index_retention: 1000)
      uuids = TaskerCore.create_tasks(namespace: "workflow", name: "quick", contexts: Array.new(40) { {} })
      TaskerCore.wait_for_tasks(uuids, timeout: 10)

      finals = TaskerCore.wait_for_tasks(uuids, timeout: 1)

      expect(finals.map { |f| f[:status] }.uniq).to eq(["complete"])
      expect(finals.count { |f| f[:steps_retained] }).to eq(5)
      # Which tasks finished last (and keep their steps) depends on the handler threads' order: the
      # other 35, whichever they are, answer from the index, without steps.
      evicted = finals.reject { |f| f[:steps_retained] }
      expect(evicted.size).to eq(35)
      expect(evicted.map { |f| [f[:steps], f[:steps_retained]] }.uniq).to eq([[[], false]])
    end

    describe "task events on the EventBridge" do
      before { start_worker(concurrency: 2) }

      it "publishes task.completed with the task's final status" do
        completed = listen("task.completed")
        uuid = create_workflow_task("chain")

        final = TaskerCore.wait_for_task(uuid, timeout: 10)
        event = Timeout.timeout(5) { completed.pop }

        expect(event.id).to eq("task.completed")
        expect(event.payload).to eq(final)
        expect(event[:status]).to eq("complete")
        expect(event[:steps].map { |s| s[:status] }).to eq(%w[complete] * 4)
      end

      it "publishes task.failed and task.cancelled, each to its own subscribers, and to listener objects" do
        failed = listen("task.failed")
        cancelled = listen("task.cancelled")
        listener = Class.new do
          attr_reader :seen

          def initialize
            @seen = Queue.new
          end

          def on_task_failed(event)
            @seen << [event.id, event[:task_uuid]]
          end
        end.new
        attach_listener(listener)
        failing = create_workflow_task("chain", { "plan" => { "first" => { "raise" => "permanent" } } })
        stopping = create_workflow_task("quick", slow(5))
        eventually { TaskerCore.task_status(stopping)[:status] == "in_progress" }

        TaskerCore.cancel_task(stopping)

        failure = Timeout.timeout(5) { failed.pop }
        expect(failure[:task_uuid]).to eq(failing)
        expect(failure[:status]).to eq("error")
        steps = failure[:steps].to_h { |s| [s[:name], s[:status]] }
        expect(steps.slice("first", "second", "third")).to eq("first" => "error", "second" => "skipped",
                                                              "third" => "skipped")
        # The independent root ran if a handler took it before `first` failed, else it was skipped.
        expect(steps["side"]).to eq(failure[:steps].last[:attempts].zero? ? "skipped" : "complete")
        cancel = Timeout.timeout(5) { cancelled.pop }
        expect(cancel.payload).to include(task_uuid: stopping, status: "cancelled")
        expect(Timeout.timeout(5) { listener.seen.pop }).to eq(["task.failed", failing])
        expect([failed, cancelled, listener.seen].map(&:size)).to eq([0, 0, 0])
      end

      it "builds task events only while something subscribes" do
        TaskerCore.wait_for_task(create_workflow_task("quick"), timeout: 10)
        expect(TaskerCore::FFI.announce_task_ends(false)).to be(true)

        completed = listen("task.completed")
        later = create_workflow_task("quick")
        TaskerCore.wait_for_task(later, timeout: 10)
        expect(Timeout.timeout(5) { completed.pop }[:task_uuid]).to eq(later)

        bridge.unsubscribe(spec_listeners.pop)
        expect(bridge.task_events_observed?).to be(false)
        unobserved = create_workflow_task("quick")
        TaskerCore.wait_for_task(unobserved, timeout: 10)
        completed_again = listen("task.completed")
        last = create_workflow_task("quick")
        TaskerCore.wait_for_task(last, timeout: 10)

        # The task that finished while nobody listened was never announced: the next event is the last task's.
        expect(Timeout.timeout(5) { completed_again.pop }[:task_uuid]).to eq(last)
        expect(completed.size).to eq(0)
      end

      it "keeps delivering after a subscriber raises, and reports the error on bridge.error" do
        errors = listen("bridge.error")
        completed = listen("task.completed")
        raising = proc { |_event| raise "subscriber bug" }
        bridge.subscribe("task.completed", &raising)
        spec_listeners << raising
        uuids = Array.new(3) { create_workflow_task("quick") }

        TaskerCore.wait_for_tasks(uuids, timeout: 10)

        seen = Timeout.timeout(5) { Array.new(3) { completed.pop[:task_uuid] } }
        expect(seen).to match_array(uuids)
        expect(Timeout.timeout(5) { errors.pop }[:error].message).to eq("subscriber bug")
      end
    end
  end
end
