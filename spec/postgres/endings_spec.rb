# frozen_string_literal: true

require "securerandom"
require "tmpdir"

# Issue E on PostgreSQL: honest task endings, cancel and retry (across processes), the claim lease.
# Steps run in worker processes (spec/fixtures/postgres/worker.rb); this process creates, cancels,
# retries and waits. The handler logs "<step_uuid> <attempt> <pid> start|done|cancelled <time>".
RSpec.describe "PostgreSQL backend: endings, cancel, retry and the claim lease" do
  include_context "postgres database"

  let(:log) { File.join(Dir.tmpdir, "tasker_pg_endings_#{Process.pid}_#{SecureRandom.hex(4)}.log") }
  let(:unfinished) { %w[pending enqueued in_progress waiting_for_retry] }

  after { FileUtils.rm_f(log) }

  def plan(plans)
    { "plan" => plans, "log" => log }
  end

  def statuses(task)
    task[:steps].to_h { |s| [s[:name], s[:status]] }
  end

  def lines_of(step_uuid, event = nil)
    handler_log(log).select { |l| l[:step_uuid] == step_uuid && (event.nil? || l[:event] == event) }
  end

  # The step's uuid once its handler started (per the handler log).
  def started(task_uuid, name)
    step_uuid = step_of(TaskerCore.task_status(task_uuid), name)[:step_uuid]
    eventually(timeout: 10) { lines_of(step_uuid, "start").any? }
    step_uuid
  end

  describe "a step that fails for good" do
    it "starts nothing new, lets the running branch finish, skips what never ran, and ends error only then" do
      worker = start_pg_worker(db)
      start_client(db)
      # diamond: start -> (left, right) -> join. left fails at once; right runs 1.5 s.
      uuid = create_pg_task("diamond", plan("left" => { "raise" => "permanent" }, "right" => { "sleep" => 1.5 }))
      right = started(uuid, "right")
      eventually(timeout: 5) { step_of(TaskerCore.task_status(uuid), "left")[:status] == "error" }

      # left has failed for good, right still runs: the task is not over, and join was skipped.
      during = TaskerCore.task_status(uuid)
      expect(during[:status]).to eq("in_progress")
      expect(statuses(during)).to include("left" => "error", "right" => "in_progress", "join" => "skipped")
      expect(during[:completed_at]).to be_nil

      final = TaskerCore.wait_for_task(uuid, timeout: 10)
      answered = Time.now.to_f
      done = lines_of(right, "done").first
      expect(done).not_to be_nil
      expect(answered).to be >= done[:at]
      expect(final[:status]).to eq("error")
      expect(statuses(final)).to eq("start" => "complete", "left" => "error", "right" => "complete",
                                    "join" => "skipped")
      expect(Time.iso8601(final[:completed_at]).to_f).to be >= done[:at] - 0.05
      expect(step_of(final, "join")).to include(attempts: 0, started_at: nil)
      expect(psql_count("SELECT count(*) FROM tasker_ready_steps", db: db)).to eq(0)
      expect(worker.status[:steps_in_flight]).to eq(0)
    end

    it "never leaves a finished task with a step pending, enqueued, in progress or waiting for retry" do
      start_pg_workers(db, 2, poll_interval: 0.1)
      start_client(db)
      uuids = Array.new(30) do |i|
        failing = i.even? ? { "raise" => "permanent" } : { "raise" => "retryable", "until_attempt" => 2 }
        create_pg_task("fanout", "plan" => { "child#{(i % 10) + 1}" => failing, "*" => { "sleep" => 0.02 } })
      end
      finals = uuids.map { |u| TaskerCore.wait_for_task(u, timeout: 30) }
      expect(finals.map { |f| f[:status] }.tally).to eq("error" => 15, "complete" => 15)
      finals.each do |f|
        expect(f[:steps].map { |s| s[:status] } & unfinished).to eq([]), f.inspect
        expect(step_of(f, "join")[:status]).to eq("skipped") if f[:status] == "error"
      end
      expect(psql_count("SELECT count(*) FROM tasker_ready_steps", db: db)).to eq(0)
    end
  end

  describe "cancel_task" do
    it "in the process running the step: interrupts it with StepCancelledError, cancels the rest" do
      worker = start_pg_worker(db)
      start_client(db)
      uuid = create_pg_task("linear", plan("first" => { "sleep" => 10 }))
      first = started(uuid, "first")

      expect(worker.cancel_task(uuid)).to eq("true")
      final = TaskerCore.wait_for_task(uuid, timeout: 5)
      expect(final[:status]).to eq("cancelled")
      expect(statuses(final)).to eq("first" => "cancelled", "second" => "cancelled", "third" => "cancelled")
      expect(step_of(final, "first")[:error_message]).to include("cancelled while running", "StepCancelledError")
      expect(lines_of(first, "cancelled").map { |l| l[:pid] }).to eq([worker.pid])
      expect(lines_of(first, "done")).to eq([])
      # A finished task is not cancelled again, and nothing changes.
      expect(worker.cancel_task(uuid)).to eq("false")
      expect(TaskerCore.cancel_task(uuid)).to be(false)
      expect(TaskerCore.task_status(uuid)).to eq(final)
      expect(psql_count("SELECT count(*) FROM tasker_ready_steps", db: db)).to eq(0)
    end

    polling = { deployment_mode: "Polling", claim_lease: 1 }
    [["Hybrid", {}], ["Polling (no LISTEN: the lease renewal carries it)", polling]].each do |mode, config|
      it "from another process (#{mode}): reaches the process running the step, whose handler gets " \
         "StepCancelledError" do
        runner = start_pg_worker(db, **config)
        start_client(db)
        uuid = create_pg_task("diamond", plan("left" => { "sleep" => 10 }, "right" => { "sleep" => 10 }))
        left = started(uuid, "left")
        right = started(uuid, "right")

        cancelled_at = Time.now.to_f
        expect(TaskerCore.cancel_task(uuid)).to be(true)
        final = TaskerCore.wait_for_task(uuid, timeout: 5)

        expect(final[:status]).to eq("cancelled")
        expect(statuses(final)).to eq("start" => "complete", "left" => "cancelled", "right" => "cancelled",
                                      "join" => "cancelled")
        [left, right].each do |step|
          interrupted = lines_of(step, "cancelled")
          expect(interrupted.map { |l| l[:pid] }).to eq([runner.pid])
          expect(interrupted.first[:at] - cancelled_at).to be < 2
        end
        expect(runner.status[:steps_in_flight]).to eq(0)
      end
    end

    it "ends a task none of whose steps runs at once (false after that); an unknown uuid raises TaskNotFoundError" do
      start_client(db)
      # No worker runs namespace pg: the step stays enqueued.
      uuid = create_pg_task("linear")
      expect(TaskerCore.cancel_task(uuid)).to be(true)
      final = TaskerCore.wait_for_task(uuid, timeout: 2)
      expect(final[:status]).to eq("cancelled")
      expect(final[:steps].map { |s| s[:status] }).to all(eq("cancelled"))
      expect(TaskerCore.cancel_task(uuid)).to be(false)
      expect(psql_count("SELECT count(*) FROM tasker_ready_steps WHERE task_uuid = '#{uuid}'", db: db)).to eq(0)
      expect { TaskerCore.cancel_task(SecureRandom.uuid) }.to raise_error(TaskerCore::TaskNotFoundError)
    end
  end

  describe "retry_task" do
    it "runs an error task again from its failed and skipped steps; completed steps keep their results" do
      worker = start_pg_worker(db)
      start_client(db)
      uuid = create_pg_task("linear", plan("second" => { "raise" => "permanent", "until_attempt" => 2 }))
      failed = TaskerCore.wait_for_task(uuid, timeout: 10)
      expect(failed[:status]).to eq("error")
      expect(statuses(failed)).to eq("first" => "complete", "second" => "error", "third" => "skipped")
      first_result = step_of(failed, "first")[:result]

      expect(TaskerCore.retry_task(uuid)).to be(true)
      again = TaskerCore.wait_for_task(uuid, timeout: 10)

      expect(again[:status]).to eq("complete")
      expect(step_of(again, "first")).to include(status: "complete", attempts: 1, result: first_result)
      # Attempts go on counting: the second run of `second` is its attempt 2.
      expect(step_of(again, "second")).to include(status: "complete", attempts: 2)
      expect(step_of(again, "second")[:result]).to include("attempt" => 2, "pid" => worker.pid)
      expect(step_of(again, "third")).to include(status: "complete", attempts: 1)
      expect(step_of(again, "third")[:result]["value"]).to eq(3)
      expect(lines_of(step_of(again, "first")[:step_uuid], "start").size).to eq(1)
    end

    it "gives each step its retry budget again (max_attempts more attempts)" do
      start_pg_worker(db)
      start_client(db)
      # retrying.yml: flaky has max_attempts 3; it fails on its first 4 attempts.
      uuid = create_pg_task("retrying", plan("flaky" => { "raise" => "retryable", "until_attempt" => 5 }))
      expect(TaskerCore.wait_for_task(uuid, timeout: 15)).to include(status: "error")
      expect(step_of(TaskerCore.task_status(uuid), "flaky")).to include(attempts: 3)

      TaskerCore.retry_task(uuid)
      final = TaskerCore.wait_for_task(uuid, timeout: 15)
      expect(final[:status]).to eq("complete")
      expect(step_of(final, "flaky")).to include(status: "complete", attempts: 5)
    end

    it "runs a cancelled task again, from another process" do
      worker = start_pg_worker(db)
      start_client(db)
      uuid = create_pg_task("linear", plan("second" => { "sleep" => 10, "sleep_attempts" => [1] }))
      started(uuid, "second")
      expect(TaskerCore.cancel_task(uuid)).to be(true)
      expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("cancelled")

      expect(worker.retry_task(uuid)).to eq("true")
      final = TaskerCore.wait_for_task(uuid, timeout: 10)
      expect(final[:status]).to eq("complete")
      expect(final[:steps].map { |s| [s[:name], s[:attempts]] }).to eq([["first", 1], ["second", 2], ["third", 1]])
    end

    it "completes at once a cancelled task whose running step returned a success after the cancel" do
      start_pg_worker(db)
      start_client(db)
      uuid = create_pg_task("single", plan("only" => { "sleep" => 10, "finish_when_cancelled" => true }))
      started(uuid, "only")
      expect(TaskerCore.cancel_task(uuid)).to be(true)
      cancelled = TaskerCore.wait_for_task(uuid, timeout: 5)
      # The cancel stands, and so does the success that came after it.
      expect(cancelled[:status]).to eq("cancelled")
      expect(step_of(cancelled, "only")).to include(status: "complete", attempts: 1)

      expect(TaskerCore.retry_task(uuid)).to be(true)
      final = TaskerCore.wait_for_task(uuid, timeout: 5)
      expect(final[:status]).to eq("complete")
      expect(step_of(final, "only")).to eq(step_of(cancelled, "only"))
      expect(final[:completed_at]).not_to be_nil
    end

    it "refuses a task that is still running or complete, changing nothing; an unknown uuid raises TaskNotFoundError" do
      worker = start_pg_worker(db)
      start_client(db)
      uuid = create_pg_task("single", plan("only" => { "sleep" => 0.5 }))
      expect { TaskerCore.retry_task(uuid) }.to raise_error(TaskerCore::ConfigurationError, /still running/)
      final = TaskerCore.wait_for_task(uuid, timeout: 10)
      expect { TaskerCore.retry_task(uuid) }.to raise_error(TaskerCore::ConfigurationError, /is complete/)
      expect(worker.retry_task(uuid)).to start_with("!TaskerCore::ConfigurationError:").and include("is complete")
      expect(TaskerCore.task_status(uuid)).to eq(final)
      expect { TaskerCore.retry_task(SecureRandom.uuid) }.to raise_error(TaskerCore::TaskNotFoundError)
      expect(worker.retry_task(SecureRandom.uuid)).to start_with("!TaskerCore::TaskNotFoundError:")
    end
  end

  describe "the claim lease" do
    it "keeps a step running longer than the lease with its owner, and lets another process take it over " \
       "only once its owner is SIGKILLed" do
      # A lease of 1 s (renewed every 1/3 s); the steps may run 30 s (single.yml's default timeout).
      owner = start_pg_worker(db, worker_id: "lease-owner", claim_lease: 1, poll_interval: 0.1)
      start_client(db)
      kept = create_pg_task("single", plan("only" => { "sleep" => 3 }))
      taken = create_pg_task("single", plan("only" => { "sleep" => 6, "sleep_attempts" => [1] }))
      kept_step = started(kept, "only")
      taken_step = started(taken, "only")
      other = start_pg_worker(db, worker_id: "lease-other", claim_lease: 1, poll_interval: 0.1)

      # Three leases pass while the owner's handler runs: nobody takes the step over.
      final = TaskerCore.wait_for_task(kept, timeout: 10)
      expect(final[:status]).to eq("complete")
      expect(step_of(final, "only")).to include(attempts: 1)
      expect(step_of(final, "only")[:result]["pid"]).to eq(owner.pid)
      expect(lines_of(kept_step, "start").map { |l| l[:pid] }).to eq([owner.pid])

      # Now the owner dies holding the other step: the other process takes it over once the lease expires.
      expect(lines_of(taken_step, "start").map { |l| l[:pid] }).to eq([owner.pid])
      expect(TaskerCore.task_status(taken)[:status]).to eq("in_progress")
      owner.signal("KILL")
      killed_at = Time.now.to_f
      expect(owner.exit_status(5)&.termsig).to eq(Signal.list["KILL"])

      final = TaskerCore.wait_for_task(taken, timeout: 10)
      expect(final[:status]).to eq("complete")
      expect(step_of(final, "only")).to include(attempts: 2)
      expect(step_of(final, "only")[:result]["pid"]).to eq(other.pid)
      restart = lines_of(taken_step, "start").find { |l| l[:attempt] == 2 }
      expect(restart[:pid]).to eq(other.pid)
      # Within the lease (1 s) and a poll of the kill, not before the owner's last renewal expired.
      expect(restart[:at] - killed_at).to be_between(0.3, 2.5)
    end
  end
end
