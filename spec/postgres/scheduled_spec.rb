# frozen_string_literal: true

# Tasks scheduled for a time (`create_task(..., run_at:)`) on PostgreSQL: the root steps wait in
# the ready table, hidden until then, so the schedule is in the database (a worker restart keeps
# it) and every worker's claim honours it. Margins are a second and more; nothing measures speed.
RSpec.describe "PostgreSQL backend: scheduled tasks (run_at)" do
  include_context "postgres database"

  after { TaskerCore::Worker::Bootstrap.instance.shutdown! }

  def started_at(final)
    final[:steps].map { |s| Time.iso8601(s[:started_at]) }.min
  end

  def not_before(run_at)
    Time.at(run_at.to_r.floor(3))
  end

  %w[Hybrid Polling EventDriven].each do |mode|
    it "keeps the task pending until run_at, then a #{mode} worker process runs it" do
      start_pg_worker(db, deployment_mode: mode)
      start_client(db)
      run_at = Time.now + 2
      uuid = create_pg_task_at("linear", { "value" => 1 }, run_at)

      sleep 1
      early = TaskerCore.task_status(uuid)
      expect(early[:status]).to eq("pending")
      expect(early[:steps]).to all(include(status: "pending", attempts: 0))

      final = TaskerCore.wait_for_task(uuid, timeout: 30)
      expect(final[:status]).to eq("complete")
      expect(started_at(final)).to be >= not_before(run_at)
      expect(final[:steps].map { |s| s[:result]["value"] }).to eq([2, 3, 4])
    end
  end

  it "keeps the schedule across a worker restart: it is in the database" do
    worker = start_pg_worker(db)
    start_client(db)
    run_at = Time.now + 3
    uuid = create_pg_task_at("single", {}, run_at)
    worker.stop
    expect(TaskerCore.task_status(uuid)[:status]).to eq("pending")

    start_pg_worker(db)
    final = TaskerCore.wait_for_task(uuid, timeout: 30)
    expect(final[:status]).to eq("complete")
    expect(started_at(final)).to be >= not_before(run_at)
  end

  it "cancels a scheduled task before its time: no worker ever runs it" do
    start_pg_worker(db)
    start_client(db)
    uuid = create_pg_task_at("linear", { "value" => 1 }, Time.now + 1)
    expect(TaskerCore.cancel_task(uuid)).to be(true)
    final = TaskerCore.wait_for_task(uuid, timeout: 10)
    expect(final[:status]).to eq("cancelled")
    expect(final[:steps]).to all(include(status: "cancelled", attempts: 0))
    sleep 2
    expect(TaskerCore.task_status(uuid)[:steps]).to all(include(status: "cancelled", attempts: 0))
    expect(psql_count("SELECT count(*) FROM tasker_ready_steps WHERE task_uuid = '#{uuid}'", db: db)).to eq(0)
  end

  it "runs a task whose run_at has passed at once, and schedules every task of create_tasks" do
    start_pg_worker(db)
    start_client(db)
    past = create_pg_task_at("single", {}, Time.now - 120)
    expect(TaskerCore.wait_for_task(past, timeout: 10)[:status]).to eq("complete")

    run_at = Time.now + 1.5
    uuids = TaskerCore.create_tasks(namespace: PostgresHelpers::PG_NAMESPACE, name: "single",
                                    contexts: [{}, {}], run_at: run_at)
    expect(uuids.map { |u| TaskerCore.task_status(u)[:status] }).to eq(%w[pending pending])
    finals = TaskerCore.wait_for_tasks(uuids, timeout: 30)
    expect(finals.map { |f| f[:status] }).to eq(%w[complete complete])
    expect(finals.map { |f| started_at(f) }).to all(be >= not_before(run_at))
  end

  it "refuses absurd run_at values with ArgumentError naming run_at, and writes nothing" do
    start_client(db)
    before = psql_count("SELECT count(*) FROM tasker_tasks", db: db)
    [Float::NAN, 1e19, Time.utc(9999), Time.at(0), "soon", nil.to_a].each do |value|
      expect { create_pg_task_at("single", {}, value) }.to raise_error(ArgumentError, /run_at/)
    end
    expect(psql_count("SELECT count(*) FROM tasker_tasks", db: db)).to eq(before)
    expect(TaskerCore::FFI.worker_status[:running]).to be(true)
  end

  def create_pg_task_at(name, context, run_at)
    TaskerCore.create_task(namespace: PostgresHelpers::PG_NAMESPACE, name: name, context: context, run_at: run_at)
  end
end
