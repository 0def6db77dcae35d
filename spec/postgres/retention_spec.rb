# frozen_string_literal: true

RSpec.describe "PostgreSQL backend: retention" do
  include_context "postgres database"

  def count_for(table, uuids)
    psql_count("SELECT count(*) FROM #{table} WHERE task_uuid = ANY(#{uuid_array(uuids)})", db: db)
  end

  it "keeps only work in progress in the hot table: finished steps leave tasker_ready_steps" do
    start_client(db)
    uuids = Array.new(30) { create_pg_task("diamond") }
    uuids << create_pg_task("retrying", "plan" => { "flaky" => { "raise" => "permanent" } })
    uuids << create_pg_task("retrying", "plan" => { "flaky" => { "raise" => "retryable", "until_attempt" => 2 } })
    # Before any worker runs: one ready row per task (its root step), nothing else.
    expect(count_for("tasker_ready_steps", uuids)).to eq(32)

    start_pg_workers(db, 2)
    results = uuids.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 20) }

    expect(results.map { |r| r[:status] }.tally).to eq("complete" => 31, "error" => 1)
    expect(psql_count("SELECT count(*) FROM tasker_ready_steps", db: db)).to eq(0)
    # The tasks and their steps stay (for task_status) until finished_task_ttl.
    expect(count_for("tasker_tasks", uuids)).to eq(32)
    expect(count_for("tasker_steps", uuids)).to eq((30 * 4) + (2 * 2))
  end

  it "deletes finished tasks (and their steps) once older than finished_task_ttl, never unfinished ones" do
    start_pg_worker(db, finished_task_ttl: 1)
    start_client(db)
    finished = Array.new(5) { create_pg_task("diamond") }
    finished.each { |uuid| TaskerCore.wait_for_task(uuid, timeout: 10) }
    finished_at = pg_monotonic
    running = create_pg_task("single", "plan" => { "only" => { "sleep" => 3.5 } })

    # Kept for the TTL...
    expect(count_for("tasker_tasks", finished)).to eq(5)
    expect(TaskerCore.task_status(finished.first)[:status]).to eq("complete")
    # ...then deleted, steps included (the cleanup runs every min(60 s, TTL)).
    eventually(timeout: 5, interval: 0.05) { count_for("tasker_tasks", finished).zero? }
    expect(pg_monotonic - finished_at).to be >= 0.9
    expect(count_for("tasker_steps", finished)).to eq(0)
    expect { TaskerCore.task_status(finished.first) }.to raise_error(TaskerCore::TaskNotFoundError, /no such task/)
    # The running task, older than the TTL as well, had not finished: kept, and it completes.
    expect(TaskerCore.task_status(running)[:status]).to eq("in_progress")
    expect(TaskerCore.wait_for_task(running, timeout: 10)[:status]).to eq("complete")
  end
end
