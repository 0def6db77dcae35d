# frozen_string_literal: true

RSpec.describe "PostgreSQL backend: execution across processes" do
  include_context "postgres database"

  # Two worker processes that define the handlers, and this process as a client (it runs nothing).
  def start_cluster(**config)
    @workers = start_pg_workers(db, 2, **config)
    start_client(db)
    @workers
  end

  attr_reader :workers

  def pids
    workers.map(&:pid)
  end

  def finals(uuids, timeout: 20)
    uuids.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: timeout) }
  end

  it "completes tasks created in any process, on both workers" do
    start_cluster
    slow = { "plan" => { "*" => { "sleep" => 0.01 } }, "value" => 0 }
    uuids = Array.new(30) { create_pg_task("diamond", slow) }
    uuids += workers.flat_map { |w| Array.new(15) { w.create_task("diamond", slow) } }

    results = finals(uuids)

    expect(results.map { |r| r[:status] }.tally).to eq("complete" => 60)
    steps = results.flat_map { |r| r[:steps] }
    expect(steps.map { |s| [s[:status], s[:attempts]] }.tally).to eq(["complete", 1] => 240)
    expect(results.map { |r| r[:steps].map { |s| s[:result]["value"] } }.uniq).to eq([[1, 2, 2, 5]])
    # Both workers ran steps, and nobody else did.
    ran = steps.map { |s| s[:result]["pid"] }.tally
    expect(ran.keys).to match_array(pids)
    expect(ran.values.min).to be >= 10
    statuses = workers.map(&:stop)
    expect(statuses.map { |s| s[:steps_processed] }.sum).to eq(240)
    expect(statuses.map { |s| s[:steps_processed] }).to eq(pids.map { |pid| ran[pid] })
    expect(statuses.map { |s| s[:steps_failed] }).to eq([0, 0])
    # Nothing left in the hot table.
    expect(psql_count("SELECT count(*) FROM tasker_ready_steps", db: db)).to eq(0)
  end

  it "creates a batch with create_tasks in one transaction, runs every task with its own context" do
    start_cluster
    contexts = Array.new(200) { |i| { "value" => i * 10 } }

    uuids = TaskerCore.create_tasks(namespace: PostgresHelpers::PG_NAMESPACE, name: "linear", contexts: contexts)

    expect(uuids.size).to eq(200)
    expect(uuids.uniq.size).to eq(200)
    # All 200 tasks were committed together: the rows are there in full at once.
    expect(psql_count("SELECT count(*) FROM tasker_tasks WHERE task_uuid = ANY(#{uuid_array(uuids)})", db: db))
      .to eq(200)
    finals(uuids).each_with_index do |result, i|
      expect(result[:status]).to eq("complete")
      expect(result[:steps].map { |s| s[:result]["value"] }).to eq([(i * 10) + 1, (i * 10) + 2, (i * 10) + 3])
    end
  end

  it "creates nothing from a batch with an unknown template or a context that is not a Hash" do
    start_cluster
    before = psql_count("SELECT count(*) FROM tasker_tasks", db: db)

    expect { TaskerCore.create_tasks(namespace: PostgresHelpers::PG_NAMESPACE, name: "nope", contexts: [{}, {}]) }
      .to raise_error(TaskerCore::ConfigurationError, %r{pg/nope})
    expect { TaskerCore.create_tasks(namespace: PostgresHelpers::PG_NAMESPACE, name: "linear", contexts: [{}, [1]]) }
      .to raise_error(TaskerCore::ConfigurationError, /contexts\[1\]: must be a Hash/)
    expect(psql_count("SELECT count(*) FROM tasker_tasks", db: db)).to eq(before)
  end

  it "hands each step its dependencies' results" do
    start_cluster
    uuids = Array.new(30) { |i| create_pg_task("linear", "value" => i * 10, "plan" => { "*" => { "sleep" => 0.01 } }) }

    results = finals(uuids)

    results.each_with_index do |result, i|
      expect(result[:steps].map { |s| s[:result]["value"] }).to eq([(i * 10) + 1, (i * 10) + 2, (i * 10) + 3])
      first, second, third = result[:steps].map { |s| s[:result] }
      expect(first["dependency_pids"]).to eq({})
      expect(second["dependency_pids"]).to eq("first" => first["pid"])
      expect(third["dependency_pids"]).to eq("second" => second["pid"])
    end
  end

  it "hands a step the results its dependencies produced in another process" do
    # A worker claims the successors of what it completes in the same transaction, so a chain
    # tends to stay on one worker: stop the first one between the steps to make the results cross.
    start_client(db)
    uuids = Array.new(10) { |i| create_pg_task("linear", "value" => i, "plan" => { "second" => { "sleep" => 0.3 } }) }
    # Every first step is ready (and older than any second) when it starts: it runs them all first.
    first_worker = start_pg_worker(db, concurrency: 2)
    eventually(timeout: 10) do
      psql_count("SELECT count(*) FROM tasker_steps WHERE name = 'first' AND status = 'complete' " \
                 "AND task_uuid = ANY(#{uuid_array(uuids)})", db: db) == 10
    end
    first_worker.stop
    second_worker = start_pg_worker(db)

    results = finals(uuids)

    expect(results.map { |r| r[:steps].map { |s| s[:result]["value"] } })
      .to eq(Array.new(10) { |i| [i + 1, i + 2, i + 3] })
    expect(results.map { |r| step_of(r, "first")[:result]["pid"] }.uniq).to eq([first_worker.pid])
    crossed = results.map { |r| step_of(r, "second")[:result] }.select { |r| r["pid"] == second_worker.pid }
    # The stopped worker ran at most the seconds it had started (2 threads) before it stopped.
    expect(crossed.size).to be >= 5
    expect(crossed.map { |r| r["dependency_pids"] }.uniq).to eq([{ "first" => first_worker.pid }])
    expect(results.flat_map { |r| r[:steps].map { |s| s[:attempts] } }.uniq).to eq([1])
  end

  it "retries with backoff, counting attempts, and runs the dependent once it succeeds" do
    start_cluster
    log = File.join(Dir.tmpdir, "tasker_pg_retry_#{Process.pid}_#{rand(1 << 30)}.log")
    plan = { "flaky" => { "raise" => "retryable", "until_attempt" => 3 } }

    result = TaskerCore.wait_for_task(create_pg_task("retrying", "plan" => plan, "log" => log), timeout: 15)

    expect(result[:status]).to eq("complete")
    flaky = step_of(result, "flaky")
    expect(flaky).to include(status: "complete", attempts: 3, error_message: nil)
    expect(flaky[:result]).to include("attempt" => 3)
    expect(step_of(result, "after")).to include(status: "complete", attempts: 1)
    runs = handler_log(log).select { |l| l[:step_uuid] == flaky[:step_uuid] }
    starts = runs.select { |l| l[:event] == "start" }
    expect(starts.map { |l| l[:attempt] }).to eq([1, 2, 3])
    expect(runs.count { |l| l[:event] == "done" }).to eq(1)
    # Exponential backoff from 300 ms: at least 0.3 s, then 0.6 s between attempts (and not much more).
    gaps = starts.each_cons(2).map { |a, b| b[:at] - a[:at] }
    expect(gaps[0]).to be_between(0.3, 1.5)
    expect(gaps[1]).to be_between(0.6, 1.8)
  ensure
    FileUtils.rm_f(log) if log
  end

  it "fails a task for good on a permanent error, or once retries run out; dependents never run" do
    start_cluster
    log = File.join(Dir.tmpdir, "tasker_pg_fail_#{Process.pid}_#{rand(1 << 30)}.log")
    permanent = create_pg_task("retrying", "plan" => { "flaky" => { "raise" => "permanent" } }, "log" => log)
    exhausted = create_pg_task("retrying", "plan" => { "flaky" => { "raise" => "retryable" } }, "log" => log)

    permanent, exhausted = finals([permanent, exhausted])

    expect(permanent[:status]).to eq("error")
    expect(step_of(permanent, "flaky")).to include(status: "error", attempts: 1)
    expect(step_of(permanent, "flaky")[:error_message]).to include("planned permanent failure on attempt 1")
    expect(exhausted[:status]).to eq("error")
    expect(step_of(exhausted, "flaky")).to include(status: "error", attempts: 3)
    expect(step_of(exhausted, "flaky")[:error_message]).to include("attempt 3").and include("gave up after 3 attempts")
    [permanent, exhausted].each do |task|
      expect(step_of(task, "after")).to include(status: "skipped", attempts: 0, result: nil)
    end
    # The dependents never reached a handler, and nothing of these tasks is left to claim.
    sleep 0.5
    ran = handler_log(log).map { |l| l[:step_uuid] }.uniq
    expect(ran).to match_array([step_of(permanent, "flaky")[:step_uuid], step_of(exhausted, "flaky")[:step_uuid]])
    expect(psql_count("SELECT count(*) FROM tasker_ready_steps", db: db)).to eq(0)
    expect(workers.map { |w| w.status[:steps_failed] }.sum).to eq(4)
  ensure
    FileUtils.rm_f(log) if log
  end

  it "reports the postgres backend and its connection pool in worker_status" do
    # application_name tells the workers' connections apart in pg_stat_activity.
    @workers = %w[tasker_spec_w1 tasker_spec_w2].map do |name|
      start_pg_worker(db, database_pool_size: 3, database_url: "#{pg_url(db)}?application_name=#{name}")
    end
    start_client(db)
    finals(Array.new(20) { create_pg_task("diamond") })

    workers.each do |worker|
      status = worker.status
      expect(status).to include(running: true, state: "running", backend: "postgres", deployment_mode: "Hybrid",
                                supported_namespaces: ["pg"], steps_in_flight: 0)
      expect(status[:database_pool_size]).to be_between(1, 3)
      expect(status[:database_pool_idle]).to be_a(Integer).and be_between(0, status[:database_pool_size])
    end
    own = TaskerCore::FFI.worker_status
    expect(own).to include(running: true, backend: "postgres", supported_namespaces: ["pg_client"])
    expect(own[:database_pool_size]).to be_between(1, 8)
    expect(own[:database_pool_idle]).to be_between(0, own[:database_pool_size])
    # The pool is real and bounded: each worker holds at most database_pool_size connections, plus
    # the one it LISTENs on.
    per_worker = psql_rows("SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = '#{db}' " \
                           "AND application_name LIKE 'tasker_spec_w%' GROUP BY 1 ORDER BY 1", db: "postgres")
    expect(per_worker.map(&:first)).to eq(%w[tasker_spec_w1 tasker_spec_w2])
    expect(per_worker.map { |_, n| Integer(n) }).to all(be_between(2, 4))
  end
end
