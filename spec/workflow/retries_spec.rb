# frozen_string_literal: true

RSpec.describe "Retries, failures and timeouts" do
  include_context "workflow worker"

  # A retry may start late on a busy machine, never early: allow this much lateness (seconds).
  def late
    0.2
  end

  def plan(step, **behaviour)
    { "plan" => { step => behaviour.transform_keys(&:to_s) } }
  end

  def attempts_of(uuid)
    WorkflowRecorder.for_task(uuid).sort_by(&:attempt)
  end

  # Seconds between the end of each attempt and the start of the next.
  def gaps(runs)
    runs.each_cons(2).map { |previous, following| following.started_at - previous.finished_at }
  end

  def expect_delays(runs, expected_seconds)
    actual = gaps(runs)
    expect(actual.size).to eq(expected_seconds.size)
    actual.zip(expected_seconds).each_with_index do |(gap, expected), i|
      expect(gap).to be_between(expected - 0.002, expected + late),
                     "delay before attempt #{i + 2}: expected #{expected}s, was #{gap.round(3)}s " \
                     "(all: #{actual.map { |g| g.round(3) }})"
    end
  end

  describe "backoff" do
    before { start_worker(concurrency: 2) }

    it "retries a RetryableError with exponential backoff (capped) up to max_attempts, then fails the step" do
      final = run_task("retry_exponential", plan("flaky", raise: "retryable"))

      expect(final[:status]).to eq("error")
      step = step_status(final, "flaky")
      expect(step).to include(status: "error", attempts: 5, result: nil)
      expect(step[:error_message]).to include("TaskerCore::RetryableError", "planned retryable failure on attempt 5")
      runs = attempts_of(final[:task_uuid])
      expect(runs.map(&:attempt)).to eq([1, 2, 3, 4, 5])
      # backoff_base_ms 100, doubling, max_backoff_ms 500.
      expect_delays(runs, [0.1, 0.2, 0.4, 0.5])
    end

    it "retries any StandardError with linear backoff" do
      final = run_task("retry_linear", plan("flaky", raise: "standard"))

      step = step_status(final, "flaky")
      expect(step).to include(status: "error", attempts: 5)
      expect(step[:error_message]).to include("RuntimeError", "planned standard failure on attempt 5")
      expect_delays(attempts_of(final[:task_uuid]), [0.1, 0.2, 0.3, 0.4])
    end

    it "retries at once with backoff: none" do
      final = run_task("retry_none", plan("flaky", raise: "retryable"))

      expect(step_status(final, "flaky")).to include(status: "error", attempts: 5)
      expect_delays(attempts_of(final[:task_uuid]), [0, 0, 0, 0])
    end

    it "completes the step when a retry succeeds" do
      final = run_task("quick", plan("work", raise: "retryable", until_attempt: 3))

      expect(final[:status]).to eq("complete")
      expect(step_status(final, "work")).to include(
        status: "complete", attempts: 3, error_message: nil,
        result: { "step" => "work", "attempt" => 3, "dependencies" => [] }
      )
      expect(attempts_of(final[:task_uuid]).map(&:attempt)).to eq([1, 2, 3])
    end

    it "waits retry_after seconds instead of the backoff when the handler asks" do
      # quick.yml's backoff would retry after 10 ms.
      final = run_task("quick", plan("work", raise: "retryable", until_attempt: 2, retry_after: 0.3))

      expect(step_status(final, "work")).to include(status: "complete", attempts: 2)
      expect_delays(attempts_of(final[:task_uuid]), [0.3])
    end

    it "shows waiting_for_retry between attempts" do
      uuid = create_workflow_task("quick", plan("work", raise: "retryable", until_attempt: 2, retry_after: 0.5))

      eventually { step_status(TaskerCore.task_status(uuid), "work")[:status] == "waiting_for_retry" }
      step = step_status(TaskerCore.task_status(uuid), "work")
      expect(step[:attempts]).to eq(1)
      expect(step[:error_message]).to include("planned retryable failure on attempt 1")
      expect(TaskerCore.task_status(uuid)[:status]).to eq("in_progress")
      expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")
    end
  end

  describe "failures that are not retried" do
    before { start_worker(concurrency: 1) }

    it "fails the step at once on PermanentError" do
      before = bootstrap.status
      final = run_task("quick", plan("work", raise: "permanent"))

      expect(final[:status]).to eq("error")
      step = step_status(final, "work")
      expect(step).to include(status: "error", attempts: 1)
      expect(step[:error_message]).to include("TaskerCore::PermanentError", "planned permanent failure")
      expect(attempts_of(final[:task_uuid]).size).to eq(1)
      after = bootstrap.status
      expect(after[:steps_processed] - before[:steps_processed]).to eq(1)
      expect(after[:steps_failed] - before[:steps_failed]).to eq(1)
    end

    { "NotImplementedError" => "not_implemented", "SystemStackError" => "stack" }.each do |error, kind|
      it "fails the step on #{error} and keeps the handler thread" do
        threads_before = bootstrap.status[:handler_threads_alive]
        expect(threads_before).to eq(1)

        final = run_task("quick", plan("work", raise: kind))

        expect(final[:status]).to eq("error")
        step = step_status(final, "work")
        expect(step).to include(status: "error", attempts: 1)
        expect(step[:error_message]).to include(error)
        expect(bootstrap.status[:handler_threads_alive]).to eq(threads_before)
        # The one handler thread still takes work.
        expect(run_task("quick")[:status]).to eq("complete")
        expect(WorkflowRecorder.executions.map(&:thread).uniq.size).to eq(1)
        expect(bootstrap.status[:handler_threads_alive]).to eq(threads_before)
      end
    end

    it "fails a step whose handler class does not exist, naming it (validate_handlers: false)" do
      bootstrap.shutdown!
      start_worker(concurrency: 1, templates: [WorkflowSpecHelpers::TEMPLATES_B, File.join(FIXTURES, "templates_lazy")],
                   validate_handlers: false)
      final = run_task("missing_handler")

      expect(final[:status]).to eq("error")
      step = step_status(final, "orphan")
      expect(step).to include(status: "error", attempts: 1)
      expect(step[:error_message]).to include("WorkflowHandlers::DoesNotExist")
      expect(bootstrap.status[:handler_threads_alive]).to eq(1)
    end
  end

  describe "timeout_seconds" do
    before { start_worker(concurrency: 2) }

    it "interrupts an attempt past its timeout and starts the next one only after the handler returned" do
      executions = listen("step.execution.received")
      completions = listen("step.completion.sent")
      # timeout.yml: 0.2 s per attempt, 2 attempts, no backoff. Only the first attempt is slow.
      uuid = create_workflow_task("timeout", plan("slow", sleep: 1.0, sleep_attempts: [1]))

      final = TaskerCore.wait_for_task(uuid, timeout: 5)
      expect(final[:status]).to eq("complete")
      expect(step_status(final, "slow")).to include(status: "complete", attempts: 2, error_message: nil)
      runs = attempts_of(uuid)
      expect(runs.map(&:attempt)).to eq([1, 2])
      # StepTimeoutError was raised inside the first attempt's sleep at its timeout (the deadline
      # runs from the claim, a moment before the handler starts)...
      expect(runs[0].outcome).to eq(:raised)
      expect(runs[0].finished_at - runs[0].started_at).to be_between(0.15, 0.2 + late)
      # ...and the second attempt started only once the first had returned: never two at once.
      expect(runs[1].started_at).to be >= runs[0].finished_at

      seen = []
      events = []
      eventually(timeout: 3) do
        seen.concat(drain(completions))
        events.concat(drain(executions))
        seen.size >= 2 && events.size >= 2
      end
      # The interrupted attempt reports its StepTimeoutError; the engine had already ended that
      # attempt, so the completion is not accepted (it only lets the next attempt start).
      first_attempt = events.find { |e| e[:task_sequence_step].workflow_step.attempts == 1 }
      interrupted = seen.find { |c| c[:event_id] == first_attempt[:event_id] }
      expect(interrupted).to include(success: false, accepted: false, error_class: "TaskerCore::StepTimeoutError")
      expect(seen.map { |c| [c[:success], c[:accepted]] }).to eq([[false, false], [true, true]])
      # The thread that ran the interrupted attempt lives on and keeps working.
      expect(bootstrap.status[:handler_threads_alive]).to eq(2)
      expect(TaskerCore.task_status(uuid)).to eq(final)
      expect(run_task("quick")[:status]).to eq("complete")
    end

    it "fails the step when every attempt times out" do
      completions = listen("step.completion.sent")
      started = monotonic
      final = run_task("timeout", plan("slow", sleep: 0.6))
      elapsed = monotonic - started

      expect(final[:status]).to eq("error")
      step = step_status(final, "slow")
      expect(step).to include(status: "error", attempts: 2)
      expect(step[:error_message]).to include("StepTimeoutError", "timed out after 0.2")
      # Two interrupted attempts of 0.2 s, not two sleeps of 0.6 s.
      expect(elapsed).to be_between(0.39, 0.4 + late)

      seen = []
      eventually(timeout: 3) { seen.concat(drain(completions)).size >= 2 }
      expect(seen.map { |c| c[:accepted] }).to eq([false, false])
      expect(bootstrap.status[:handler_threads_alive]).to eq(2)
      expect(run_task("quick")[:status]).to eq("complete")
    end
  end

  describe "failed dependencies" do
    before { start_worker(concurrency: 2) }

    it "never runs the dependents of a failed step (they are skipped), and the task errors" do
      final = run_task("chain", plan("first", raise: "permanent"))

      expect(final[:status]).to eq("error")
      expect(step_status(final, "first")).to include(status: "error", attempts: 1)
      %w[second third].each do |name|
        expect(step_status(final, name)).to include(status: "skipped", attempts: 0, result: nil)
      end
      sleep 0.2
      names = WorkflowRecorder.for_task(final[:task_uuid]).map(&:name)
      expect(names).to include("first")
      expect(names).not_to include("second", "third")
      expect(TaskerCore.task_status(final[:task_uuid])[:status]).to eq("error")
    end

    it "never runs them after retries run out either" do
      final = run_task("chain", plan("first", raise: "standard"))

      expect(step_status(final, "first")).to include(status: "error", attempts: 3)
      sleep 0.2
      names = WorkflowRecorder.for_task(final[:task_uuid]).map(&:name)
      expect(names.count("first")).to eq(3)
      expect(names).not_to include("second", "third")
    end

    it "runs the dependents when the step succeeds on a retry" do
      final = run_task("chain", plan("first", raise: "standard", until_attempt: 2))

      expect(final[:status]).to eq("complete")
      expect(final[:steps].map { |s| [s[:name], s[:attempts]] }).to eq(
        [["first", 2], ["second", 1], ["third", 1], ["side", 1]]
      )
    end
  end
end
