# frozen_string_literal: true

require "tmpdir"

# Issue F2, defects 1, 2 and 10: recording outcomes and claiming when the database refuses writes.
RSpec.describe "PostgreSQL backend (adversarial): recording and claiming under failures" do
  include_context "postgres database"
  include PostgresFaults

  around do |example|
    Dir.mktmpdir("tasker-f2-recording") do |dir|
      @dir = dir
      example.run
    end
  end

  # a (each attempt allowed 2 s) -> b
  def write_short_timeout_template
    File.write(File.join(@dir, "short.yml"), <<~YAML)
      namespace: pg
      name: short_timeout
      version: 1.0.0
      steps:
        - { name: a, handler: { callable: PgSpec::Step }, timeout_seconds: 2, retry: { max_attempts: 5 } }
        - { name: b, dependencies: [a], handler: { callable: PgSpec::Step } }
    YAML
    [PostgresHelpers::PG_TEMPLATES, @dir]
  end

  it "counts a completion toward its successors once per attempt: a kept write of attempt 1 and attempt 2 " \
     "recorded together leave the successor waiting on 0, not -1 (defect 1)" do
    templates = write_short_timeout_template
    start_pg_worker(db, templates: templates, poll_interval: 0.2, claim_lease: 2)
    start_client(db)
    # Every write that completes a step fails (as a lock timeout or a restart makes it fail) while armed;
    # so does every renewal of a claim lease (a claim, of a row already visible, does not).
    install_fault("complete", table: "tasker_steps", status: "complete", sqlstate: "57014")
    install_renewal_fault("renewal", sqlstate: "57014")
    arm_fault("complete")
    arm_fault("renewal")
    log = File.join(@dir, "handler.log")
    uuids = TaskerCore.create_tasks(namespace: "pg", name: "short_timeout", contexts: Array.new(4) { { "log" => log } })

    # Attempt 1's outcome is kept (its write fails); its lease is not renewed and expires after 2 s;
    # attempt 2 runs and its outcome joins attempt 1's in the batch that is retried.
    eventually(timeout: 15, interval: 0.05) do
      handler_log(log).count { |line| line[:attempt] == 2 && line[:event] == "done" } >= 4
    end
    sleep 1
    disarm_fault("complete")
    disarm_fault("renewal")

    results = uuids.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 10) }
    expect(results.map { |r| r && r[:status] }).to eq(["complete"] * 4)
    expect(results.map { |r| step_of(r, "b")[:result]["value"] }).to eq([2] * 4)
    expect(psql_count("SELECT min(waiting_on) FROM tasker_steps WHERE task_uuid = ANY(#{uuid_array(uuids)})",
                      db: db)).to eq(0)
  end

  it "fails only the step whose result or error holds a NUL byte, with a clear error; every other step runs " \
     "once and the workers keep recording (defect 2)" do
    workers = start_pg_workers(db, 2, poll_interval: 0.1)
    start_client(db)
    good = Array.new(40) { create_pg_task("linear", "value" => 0) }
    bad_result = create_pg_task("linear", "plan" => { "second" => { "nul" => "result" } })
    bad_error = create_pg_task("linear", "plan" => { "first" => { "nul" => "error" } })
    good += Array.new(40) { create_pg_task("linear", "value" => 0) }

    results = good.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 20) }
    expect(results.map { |r| r && r[:status] }.tally).to eq("complete" => 80)
    expect(results.flat_map { |r| r[:steps].map { |s| s[:attempts] } }.uniq).to eq([1])

    poisoned = TaskerCore.wait_for_task(bad_result, timeout: 10)
    expect(poisoned[:status]).to eq("error")
    expect(step_of(poisoned, "second")[:error_message]).to include("NUL", "$.text")
    expect(step_of(poisoned, "second")[:attempts]).to eq(1)
    expect(step_of(poisoned, "third")[:status]).to eq("skipped")

    errored = TaskerCore.wait_for_task(bad_error, timeout: 10)
    expect(errored[:status]).to eq("error")
    expect(step_of(errored, "first")[:error_message]).to include("bad\\u0000byte")

    # Nothing is left behind: new work is recorded at once.
    after = Array.new(5) { create_pg_task("linear", "value" => 0) }
    expect(after.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 10)&.fetch(:status) }).to eq(["complete"] * 5)
    expect(workers.map { |w| w.status[:running] }).to eq([true, true])
  end

  it "claims again shortly after a failed claim, in EventDriven mode too (defect 10)" do
    start_pg_worker(db, deployment_mode: "EventDriven")
    start_client(db, deployment_mode: "EventDriven")
    # Every claim (it marks steps in_progress) fails while armed.
    install_fault("claim", table: "tasker_steps", status: "in_progress", sqlstate: "57014")
    arm_fault("claim")
    uuid = create_pg_task("single")
    # The NOTIFY arrived and the claim failed: the step is still enqueued.
    sleep 1
    expect(psql("SELECT status FROM tasker_steps WHERE task_uuid = '#{uuid}'", db: db)).to eq("enqueued")

    disarm_fault("claim") # no NOTIFY: only the worker's own retry finds the step
    started = pg_monotonic
    expect(TaskerCore.wait_for_task(uuid, timeout: 10)&.fetch(:status)).to eq("complete")
    expect(pg_monotonic - started).to be < 3
  end
end
