# frozen_string_literal: true

RSpec.describe "PostgreSQL backend: deployment modes" do
  include_context "postgres database"

  def new_log
    path = File.join(Dir.tmpdir, "tasker_pg_modes_#{Process.pid}_#{rand(1 << 30)}.log")
    logs << path
    path
  end

  def logs
    @logs ||= []
  end

  after { logs.each { |path| FileUtils.rm_f(path) } }

  # Seconds from just before create_task (this process) to the handler's start (the worker process).
  def pickup_delay(log)
    created_at = Time.now.to_f
    final = TaskerCore.wait_for_task(create_pg_task("single", "log" => log), timeout: 10)
    step_uuid = final[:steps].first[:step_uuid]
    started = handler_log(log).find { |l| l[:step_uuid] == step_uuid && l[:event] == "start" }
    [started.fetch(:at) - created_at, started.fetch(:at)]
  end

  def median(values)
    values.sort[values.size / 2]
  end

  { "EventDriven" => {}, "Polling" => { poll_interval: 0.2 }, "Hybrid" => {} }.each do |mode, extra|
    it "#{mode}: runs tasks created before and after the workers started, retries included" do
      start_client(db)
      early = Array.new(5) { create_pg_task("diamond") } # ready before any worker runs
      workers = start_pg_workers(db, 2, deployment_mode: mode, **extra)
      # Nothing but the workers' start makes them look for these.
      results = early.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 5) }
      late = Array.new(15) { create_pg_task("diamond") }
      retried = create_pg_task("retrying", "plan" => { "flaky" => { "raise" => "retryable", "until_attempt" => 2 } })

      results += (late + [retried]).map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 15) }

      expect(results.map { |r| r[:status] }.tally).to eq("complete" => 21)
      expect(step_of(results.last, "flaky")).to include(status: "complete", attempts: 2)
      statuses = workers.map(&:status)
      expect(statuses.map { |s| s[:deployment_mode] }).to eq([mode, mode])
      expect(statuses.map { |s| s[:steps_processed] }.sum).to eq((20 * 4) + 3)
    end
  end

  %w[EventDriven Hybrid].each do |mode|
    it "#{mode}: a task created in another process starts within ~100 ms (a notification, not a poll)" do
      # A poll every 5 s could not explain a fast pickup.
      start_pg_worker(db, deployment_mode: mode, poll_interval: 5.0)
      start_client(db)
      log = new_log
      pickup_delay(log) # warm-up: first connection use, handler autoload

      delays = Array.new(5) do
        sleep(rand(0.05..0.3))
        pickup_delay(log).first
      end

      expect(median(delays)).to be < 0.1
      expect(delays.max).to be < 0.4
      expect(delays.min).to be >= 0
    end
  end

  it "Polling: a task waits for the next poll" do
    worker = start_pg_worker(db, deployment_mode: "Polling", poll_interval: 1.0)
    start_client(db)
    log = new_log
    first_delay, first_start = pickup_delay(log)
    # The worker claimed that step when it polled; the next poll is ~1 s after that one.
    sleep([first_start + 0.1 - Time.now.to_f, 0].max)

    second_delay, = pickup_delay(log)

    expect(first_delay).to be_between(0, 1.4)
    expect(second_delay).to be_between(0.5, 1.3)
    expect(worker.status).to include(deployment_mode: "Polling", steps_processed: 2)
  end

  it "sends one steps-ready NOTIFY per transaction, and only for steps the sender did not claim itself" do
    # 4 handler threads: a worker holds at most 8 claimed steps.
    start_pg_worker(db, deployment_mode: "EventDriven", concurrency: 4)
    start_client(db)
    listener = PostgresHelpers::NotificationListener.new(db, "tasker_steps_ready", "tasker_tasks_finished")

    task = TaskerCore.wait_for_task(create_pg_task("fanout"), timeout: 10)
    sleep 0.2 # let the last notification reach the listener
    received = listener.notifications

    expect(task[:status]).to eq("complete")
    # Creation (the root is ready: one NOTIFY). The root's completion readies ten children: the
    # worker claims 8 in that same transaction and announces the rest (one NOTIFY, not ten). The
    # last child's completion readies the join, which that transaction claims: nothing to announce.
    expect(received.count { |channel, _| channel == "tasker_steps_ready" }).to eq(2)
    expect(received.select { |channel, _| channel == "tasker_tasks_finished" })
      .to eq([["tasker_tasks_finished", task[:task_uuid]]])
  end

  it "batches NOTIFYs under load: far fewer than the steps made ready" do
    start_pg_worker(db, deployment_mode: "EventDriven", concurrency: 8)
    start_client(db)
    listener = PostgresHelpers::NotificationListener.new(db, "tasker_steps_ready", "tasker_tasks_finished")

    uuids = Array.new(20) { create_pg_task("fanout") }
    results = uuids.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 20) }
    sleep 0.2
    received = listener.notifications

    expect(results.map { |r| r[:status] }.uniq).to eq(["complete"])
    ready = received.count { |channel, _| channel == "tasker_steps_ready" }
    # 240 steps became ready (20 roots at creation, 200 children, 20 joins): at most 20 + 20 + 20
    # notifications, one per creation and one per completion batch that readied something (fewer:
    # a batch whose new steps its worker claimed at once announces nothing).
    expect(ready).to be_between(20, 60)
    finished = received.select { |channel, _| channel == "tasker_tasks_finished" }.flat_map { |_, p| p.split(",") }
    expect(finished).to match_array(uuids)
  end
end
