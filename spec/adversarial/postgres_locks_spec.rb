# frozen_string_literal: true

require "securerandom"

# Issue F2, defect 3: a worker that stops mid-transaction (SIGSTOP, a frozen VM, a partition) must
# cost the others seconds, and a write waiting on a lock must not stop the engine answering.
RSpec.describe "PostgreSQL backend (adversarial): row locks held by a stuck session" do
  include_context "postgres database"
  include PostgresFaults

  def idle_in_transaction
    psql_count("SELECT count(*) FROM pg_stat_activity WHERE datname = '#{db}' AND state = 'idle in transaction'",
               db: "postgres")
  end

  def first_step_running(uuid)
    eventually(timeout: 10, interval: 0.02) do
      psql("SELECT status FROM tasker_steps WHERE task_uuid = '#{uuid}' AND step_index = 0", db: db) == "in_progress"
    end
  end

  it "ends the transaction of a worker paused inside it within seconds (idle_in_transaction_session_timeout)" do
    worker_id = "paused-#{SecureRandom.hex(4)}"
    paused = start_pg_worker(db, worker_id: worker_id, poll_interval: 0.1)
    start_client(db)
    uuid = create_pg_task("linear", "plan" => { "first" => { "sleep" => 0.5 } })
    first_step_running(uuid)

    # Make the worker's write wait on the task row, pause the worker, then let the write through:
    # the server finishes the statement and the paused worker's transaction sits idle, holding its locks.
    holder = PostgresFaults::LockHolder.new(db, "SELECT 1 FROM tasker_tasks WHERE task_uuid = '#{uuid}' FOR UPDATE")
    begin
      eventually(timeout: 5, interval: 0.01) { sessions_waiting_for_locks.positive? }
      paused.signal("STOP")
    ensure
      holder.release
    end
    eventually(timeout: 3, interval: 0.05) { idle_in_transaction.positive? }
    held_from = pg_monotonic

    eventually(timeout: 10, interval: 0.1) { idle_in_transaction.zero? }
    expect(pg_monotonic - held_from).to be < 7
    # The locks are gone: everyone else goes on (a new task touching the same tables completes).
    start_pg_worker(db, poll_interval: 0.1)
    expect(TaskerCore.wait_for_task(create_pg_task("linear"), timeout: 10)&.fetch(:status)).to eq("complete")
  ensure
    paused&.signal("CONT")
  end

  it "keeps answering create_task while a write waits on another session's lock, and records every other " \
     "task meanwhile (lock_timeout, then writing around the locked row)" do
    worker = start_pg_worker(db, poll_interval: 0.1)
    start_client(db)
    blocked = worker.create_task("linear", { "plan" => { "first" => { "sleep" => 0.3 } } })
    first_step_running(blocked)
    holder = PostgresFaults::LockHolder.new(db, "SELECT 1 FROM tasker_tasks WHERE task_uuid = '#{blocked}' FOR UPDATE")
    begin
      eventually(timeout: 5, interval: 0.01) { sessions_waiting_for_locks.positive? }

      started = pg_monotonic
      other = worker.create_task("linear")
      expect(pg_monotonic - started).to be < 1

      # The other task runs all three steps while the lock is still held.
      expect(TaskerCore.wait_for_task(other, timeout: 15)&.fetch(:status)).to eq("complete")
      expect(TaskerCore.task_status(blocked)[:status]).to eq("in_progress")
    ensure
      holder.release
    end
    result = TaskerCore.wait_for_task(blocked, timeout: 10)
    expect(result && result[:status]).to eq("complete")
    expect(result[:steps].map { |s| s[:attempts] }).to eq([1, 1, 1])
  end
end
