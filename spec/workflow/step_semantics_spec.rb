# frozen_string_literal: true

# Issue E: one attempt at a time, honest task endings, cancel and retry, waiting never lies,
# step records a person can read (memory backend).
RSpec.describe "Step semantics" do
  include_context "workflow worker"

  let(:late) { 0.25 }

  def plan(plans)
    { "plan" => plans.transform_values { |b| b.transform_keys(&:to_s) } }
  end

  def runs_of(uuid, name = nil)
    WorkflowRecorder.for_task(uuid).select { |r| name.nil? || r.name == name }.sort_by(&:attempt)
  end

  describe "on_timeout: wait" do
    before { start_worker(concurrency: 2) }

    it "does not interrupt the handler, records the attempt as timed out, and retries only after it returned" do
      completions = listen("step.completion.sent")
      final = run_task("wait_timeout", plan("careful" => { sleep: 0.5, sleep_attempts: [1] }))

      expect(final[:status]).to eq("complete")
      runs = runs_of(final[:task_uuid])
      expect(runs.map(&:attempt)).to eq([1, 2])
      # Not interrupted: the first attempt slept its full 0.5 s and returned normally...
      expect(runs[0].outcome).to eq(:success)
      expect(runs[0].finished_at - runs[0].started_at).to be >= 0.5
      # ...and the retry waited for it.
      expect(runs[1].started_at).to be >= runs[0].finished_at
      # Its late success was discarded: the step's attempts count the timeout.
      expect(step_status(final, "careful")).to include(status: "complete", attempts: 2)
      seen = []
      eventually { seen.concat(drain(completions)).size >= 2 }
      expect(seen.map { |c| [c[:success], c[:accepted]] }).to eq([[true, false], [true, true]])
    end
  end

  describe "a step's timeout counts from when a handler thread takes it" do
    before { start_worker(concurrency: 1) }

    it "does not time out steps that wait behind others for the only thread" do
      # 0.5 s allowed per attempt, 0.3 s each: the third and fourth wait 0.6 s before they start.
      uuids = Array.new(4) { create_workflow_task("patient", plan("slow" => { sleep: 0.3 })) }
      finals = uuids.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 5) }

      expect(finals.map { |f| f[:status] }).to eq(%w[complete] * 4)
      expect(finals.map { |f| step_status(f, "slow")[:attempts] }).to eq([1] * 4)
      expect(uuids.map { |uuid| runs_of(uuid).map(&:outcome) }).to eq([[:success]] * 4)
    end

    it "hands a step back unrun when it waited a whole timeout, and does not count the attempt" do
      # The only thread is held 0.6 s by a handler that must not be interrupted...
      held = create_workflow_task("wait_timeout", plan("careful" => { sleep: 0.6, sleep_attempts: [1] }))
      eventually { runs_of(held).any? }
      # ...so this step (0.2 s allowed) waits longer than its timeout, queued, and goes back.
      waiting = create_workflow_task("timeout", plan("slow" => {}))

      final = TaskerCore.wait_for_task(waiting, timeout: 5)
      expect(final[:status]).to eq("complete")
      expect(step_status(final, "slow")).to include(attempts: 1, error_message: nil)
      expect(runs_of(waiting).map(&:attempt)).to eq([1])
      expect(runs_of(waiting).first.started_at).to be >= runs_of(held).first.finished_at
      expect(TaskerCore.wait_for_task(held, timeout: 5)[:status]).to eq("complete")
    end
  end

  describe "a handler that ignores StepTimeoutError" do
    before { start_worker(concurrency: 1) }

    it "is logged once as a runaway, and a replacement thread keeps handlers available" do
      handler_threads = -> { Thread.list.count { |t| t.alive? && t.name&.start_with?("tasker-handler") } }
      uuid = create_workflow_task("stubborn", "stubborn_for" => 4.0)
      # The only handler thread is stuck in the runaway: a new one takes its place...
      eventually(timeout: 5) { handler_threads.call == 2 }
      expect(bootstrap.status[:handler_threads_alive]).to eq(1)
      # ...so another task still runs.
      other = run_task("quick", {}, timeout: 5)
      expect(other[:status]).to eq("complete")
      expect(WorkflowHandlers::Stubborn.swallowed.pop).to be_a(TaskerCore::StepTimeoutError)

      final = TaskerCore.wait_for_task(uuid, timeout: 10)
      # The attempt timed out (its late result is discarded); the task errs after the handler returned.
      expect(final[:status]).to eq("error")
      expect(step_status(final, "ignores_timeout")[:error_message]).to include("StepTimeoutError")
      run = runs_of(uuid).first
      expect(final[:completed_at]).not_to be_nil
      expect(Time.iso8601(final[:completed_at]).to_f).to be >= Time.now.to_f - (monotonic - run.finished_at) - late
      # The runaway's thread left once its step was done: back to `concurrency` threads.
      eventually(timeout: 3) { handler_threads.call == 1 }
      expect(run_task("quick")[:status]).to eq("complete")
    end
  end

  describe "when a step fails for good" do
    before { start_worker(concurrency: 2) }

    it "starts nothing new, lets the running branch finish, skips what never ran, and only then ends" do
      uuid = create_workflow_task("branches",
                                  plan("fails" => { sleep: 0.1, raise: "permanent" }, "slow" => { sleep: 0.5 }))
      final = TaskerCore.wait_for_task(uuid, timeout: 5)
      answered = monotonic

      slow = runs_of(uuid, "slow").first
      expect(slow.finished_at).not_to be_nil
      expect(answered).to be >= slow.finished_at
      expect(final[:status]).to eq("error")
      expect(final[:steps].to_h { |s| [s[:name], s[:status]] }).to eq(
        "fails" => "error", "after_fails" => "skipped", "slow" => "complete", "after_slow" => "skipped"
      )
      expect(runs_of(uuid).map(&:name)).to contain_exactly("fails", "slow")
    end

    it "never leaves a finished task with a step pending, enqueued, in progress or waiting for retry" do
      uuids = Array.new(30) do |i|
        create_workflow_task("dag", plan("left" => { raise: i.even? ? "permanent" : "standard", until_attempt: 2 },
                                         "side" => { sleep: [0.0, 0.05] }))
      end
      finals = uuids.map { |u| TaskerCore.wait_for_task(u, timeout: 10) }
      expect(finals.map { |f| f[:status] }.tally).to eq("error" => 15, "complete" => 15)
      unfinished = %w[pending enqueued in_progress waiting_for_retry]
      finals.each do |f|
        expect(f[:steps].map { |s| s[:status] } & unfinished).to eq([]), f.inspect
      end
    end
  end

  describe "cancel_task" do
    before { start_worker(concurrency: 2) }

    it "interrupts running handlers with StepCancelledError, cancels the rest, and ends the task cancelled" do
      uuid = create_workflow_task("branches", plan("fails" => { sleep: 5 }, "slow" => { sleep: 5 }))
      eventually { runs_of(uuid).size == 2 }

      expect(TaskerCore.cancel_task(uuid)).to be(true)
      final = TaskerCore.wait_for_task(uuid, timeout: 3)
      expect(final[:status]).to eq("cancelled")
      expect(final[:steps].map { |s| s[:status] }).to all(eq("cancelled"))
      expect(final[:completed_at]).not_to be_nil
      runs = runs_of(uuid)
      expect(runs.map(&:outcome)).to all(eq(:raised))
      expect(runs.map { |r| r.finished_at - r.started_at }).to all(be < 1.0)
      # Nothing else ran, and a finished task is not cancelled again.
      sleep 0.1
      expect(runs_of(uuid).size).to eq(2)
      expect(TaskerCore.cancel_task(uuid)).to be(false)
      expect(TaskerCore.task_status(uuid)).to eq(final)
      expect(run_task("quick")[:status]).to eq("complete")
    end

    it "raises TaskNotFoundError for a uuid never created" do
      expect { TaskerCore.cancel_task(SecureRandom.uuid) }.to raise_error(TaskerCore::TaskNotFoundError)
    end
  end

  describe "retry_task" do
    before { start_worker(concurrency: 2) }

    it "runs an error task again from its failed and skipped steps; completed steps keep their results" do
      final = run_task("chain", plan("second" => { raise: "permanent", until_attempt: 2 }))
      expect(final[:status]).to eq("error")
      first_result = step_status(final, "first")[:result]

      expect(TaskerCore.retry_task(final[:task_uuid])).to be(true)
      again = TaskerCore.wait_for_task(final[:task_uuid], timeout: 5)

      expect(again[:status]).to eq("complete")
      expect(step_status(again, "first")).to include(status: "complete", attempts: 1, result: first_result)
      # Attempts go on counting: the second run of `second` is its attempt 2.
      expect(step_status(again, "second")).to include(status: "complete", attempts: 2)
      expect(step_status(again, "third")).to include(status: "complete", attempts: 1)
      expect(runs_of(final[:task_uuid], "first").size).to eq(1)
    end

    it "runs a cancelled task again" do
      uuid = create_workflow_task("branches", plan("fails" => { sleep: 5, sleep_attempts: [1] },
                                                   "slow" => { sleep: 5, sleep_attempts: [1] }))
      eventually { runs_of(uuid).size == 2 }
      TaskerCore.cancel_task(uuid)
      expect(TaskerCore.wait_for_task(uuid, timeout: 3)[:status]).to eq("cancelled")

      TaskerCore.retry_task(uuid)
      expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")
    end

    it "refuses a task that is still running or complete, changing nothing" do
      uuid = create_workflow_task("quick", plan("work" => { sleep: 0.3 }))
      expect { TaskerCore.retry_task(uuid) }.to raise_error(TaskerCore::ConfigurationError, /still running/)
      final = TaskerCore.wait_for_task(uuid, timeout: 5)
      expect { TaskerCore.retry_task(uuid) }.to raise_error(TaskerCore::ConfigurationError, /is complete/)
      expect(TaskerCore.task_status(uuid)).to eq(final)
      expect { TaskerCore.retry_task(SecureRandom.uuid) }.to raise_error(TaskerCore::TaskNotFoundError)
    end
  end

  describe "waiting never lies" do
    it "answers each task's real final status well beyond task_retention, then TaskNotFoundError" do
      start_worker(concurrency: 4, task_retention: 50, task_index_retention: 2000)
      uuids = Array.new(1200) do |i|
        create_workflow_task("quick", i % 3 == 0 ? plan("work" => { raise: "permanent" }) : {})
      end
      finals = uuids.map { |u| TaskerCore.wait_for_task(u, timeout: 10) }
      expect(finals.map { |f| f[:status] }).to eq(Array.new(1200) { |i| i % 3 == 0 ? "error" : "complete" })
      # Once all have finished, the oldest are known by their final status only. (A wait that began
      # before the task finished was answered in full, as the task then was.)
      expect(TaskerCore.wait_for_task(uuids.first, timeout: 1))
        .to include(task_uuid: uuids.first, namespace: "workflow", name: "quick", status: "error",
                    steps: [], steps_retained: false)
      expect(finals.last[:steps_retained]).to be(true)

      # Past both limits a task is forgotten, and says so.
      more = TaskerCore.create_tasks(namespace: "workflow", name: "quick", contexts: Array.new(3000) { {} })
      TaskerCore.wait_for_task(more.last, timeout: 20)
      expect { TaskerCore.wait_for_task(uuids.first, timeout: 1) }.to raise_error(TaskerCore::TaskNotFoundError)
      expect { TaskerCore.task_status(SecureRandom.uuid) }.to raise_error(TaskerCore::TaskNotFoundError)
    end

    it "forgets a waiter that timed out (no reply kept per abandoned wait)" do
      start_worker(concurrency: 1)
      uuid = create_workflow_task("quick", plan("work" => { sleep: 3 }))
      rss = -> { File.read("/proc/self/status")[/VmRSS:\s+(\d+)/, 1].to_i }
      20_000.times { TaskerCore::FFI.wait_for_task(uuid, 0) }
      GC.start
      before = rss.call
      100_000.times { TaskerCore::FFI.wait_for_task(uuid, 0) }
      GC.start
      # 100k kept replies took ~150 MB; forgotten ones leave RSS flat.
      expect(rss.call - before).to be < 40_000
      TaskerCore.cancel_task(uuid)
    end
  end

  describe "step records" do
    before { start_worker(concurrency: 2) }

    it "carry started_at, completed_at, duration_ms and metadata; the task created_at and completed_at" do
      stamped = Class.new(TaskerCore::StepHandler::Base) do
        def call(_task, _sequence, _step)
          sleep 0.05
          success(result: { "ok" => true }, metadata: { "region" => "eu", "tries" => 1 })
        end
      end
      stub_const("StampedHandler", stamped)
      TaskerCore::Registry::HandlerRegistry.instance.register("WorkflowHandlers::Scripted", StampedHandler)
      final = run_task("quick")
      TaskerCore::Registry::HandlerRegistry.instance.register("WorkflowHandlers::Scripted", WorkflowHandlers::Scripted)

      step = step_status(final, "work")
      expect(step[:metadata]).to eq("region" => "eu", "tries" => 1)
      started = Time.iso8601(step[:started_at])
      completed = Time.iso8601(step[:completed_at])
      expect(step[:duration_ms]).to be_within(1).of((completed - started) * 1000)
      expect(step[:duration_ms]).to be >= 50
      expect(Time.iso8601(final[:created_at])).to be <= started
      expect(Time.iso8601(final[:completed_at])).to be >= completed
      expect(final[:created_at]).to match(/\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\z/)
    end
  end
end
