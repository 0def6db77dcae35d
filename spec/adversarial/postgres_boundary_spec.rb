# frozen_string_literal: true

# Issue F, last point: the boundary's adversarial cases (interrupt races at the hand-off, huge
# durations, abandoned waiters) against a worker on the real PostgreSQL backend.
RSpec.describe "PostgreSQL backend (adversarial): interrupt races, huge durations, waiter leaks" do
  include_context "postgres database"
  include AdversarialHelpers
  include_context "workflow worker"

  # This process's worker on the spec database, running spec/fixtures/adversarial.
  def pg_adversarial_config(**config)
    adversarial_config(backend: "postgres", database_url: pg_url(db), log_level: "error", **config)
  end

  def commits
    psql_count("SELECT xact_commit FROM pg_stat_database WHERE datname = '#{db}'", db: "postgres")
  end

  # Transactions per second in the spec database over `seconds`. An idle session reports its
  # statistics up to 10 s late: the window starts after that.
  def commit_rate(seconds)
    sleep 10.5
    before = commits
    sleep seconds
    (commits - before) / seconds.to_f
  end

  # Seconds until the task's step waiting for its retry may be claimed again.
  def retry_ahead(uuid)
    Float(psql("SELECT extract(epoch FROM max(visible_at) - now()) FROM tasker_ready_steps " \
               "WHERE task_uuid = '#{uuid}'", db: db))
  end

  def rss_kb
    File.read("/proc/self/status")[/VmRSS:\s+(\d+)/, 1].to_i
  end

  it "loses no step when a raw handler thread is Thread#raise'd each time it sleeps in next_step_event " \
     "(200 tasks, one attempt each)" do
    TaskerCore::FFI.bootstrap_worker(pg_adversarial_config(concurrency: 1))
    stop = false
    taken = 0
    handler = Thread.new do
      until stop
        begin
          event = TaskerCore::FFI.next_step_event(0.5)
          next unless event

          taken += 1
          TaskerCore::FFI.send_step_completion_event(success_for(event))
        rescue AdversarialHelpers::Poke
          next
        end
      end
    rescue Exception => e # rubocop:disable Lint/RescueException
      e # the thread's value: how it ended, if not at `stop`
    end
    handler.report_on_exception = false

    pokes = 0
    poker = Thread.new do
      until stop || !handler.alive?
        next unless until_asleep(handler, timeout: 0.2) && !stop

        handler.raise(AdversarialHelpers::Poke, "stray interrupt")
        pokes += 1
        # Not at once again: on PostgreSQL an event handed back reaches the queue through the engine,
        # so a thread raised into every time it sleeps would never take one (it livelocks, losing nothing).
        sleep(rand(0.0..0.002))
      end
    end
    uuids = Array.new(200) { create_adversarial_task }
    # A lost step fails its task within its 1 s timeout: 30 s is plenty for all of them.
    deadline = monotonic + 30
    finals = uuids.map { |uuid| TaskerCore::FFI.wait_for_task(uuid, [deadline - monotonic, 0].max) }
    stop = true
    poker.join(5)
    expect(handler.join(5)&.value).to be_nil

    statuses = finals.map { |final| final && final[:status] }.tally
    expect(pokes).to be > 10
    # A step lost in the hand-off sits in flight until its 1 s timeout and fails its task.
    expect(statuses).to eq("complete" => 200), "lost steps fail as timed out: #{statuses}"
    expect(taken).to eq(200)
    expect(psql_count("SELECT count(*) FROM tasker_steps WHERE status = 'complete' AND attempts = 1", db: db))
      .to eq(200)
  ensure
    # Whatever failed above, neither thread may outlive the example.
    stop = true
  end

  describe "huge durations" do
    [1e19, Float::INFINITY].each do |huge|
      it "keeps running and answering when a handler asks for retry_after: #{huge}" do
        TaskerCore::Worker::Bootstrap.start!(pg_adversarial_config(concurrency: 2))
        AdversarialHelpers::RetryAfterHandler.retry_after = huge
        uuid = create_adversarial_task("retry_after")
        eventually(timeout: 10) { TaskerCore.task_status(uuid)[:steps].first[:status] == "waiting_for_retry" }

        expect(TaskerCore::FFI.worker_status[:state]).to eq("running")
        expect(TaskerCore.wait_for_task(create_adversarial_task("once"), timeout: 10)[:status]).to eq("complete")
        expect(TaskerCore.task_status(uuid)[:steps].first[:status]).to eq("waiting_for_retry")
        # The database holds a capped retry time in the future, not an overflowed or negative one.
        expect(retry_ahead(uuid)).to be_between(86_400, 367 * 86_400)
      end
    end

    it "waits the retry_after a handler asks for, up to the cap of a year (200 days here; int4 ms held 24.8)" do
      TaskerCore::Worker::Bootstrap.start!(pg_adversarial_config(concurrency: 2))
      AdversarialHelpers::RetryAfterHandler.retry_after = 200 * 86_400
      uuid = create_adversarial_task("retry_after")
      eventually(timeout: 10) { TaskerCore.task_status(uuid)[:steps].first[:status] == "waiting_for_retry" }

      expect(retry_ahead(uuid)).to be_within(3600).of(200 * 86_400)
    end

    it "hands out a step with next_step_event(1e300) and waits with wait_for_task(uuid, 1e19)" do
      TaskerCore::FFI.bootstrap_worker(pg_adversarial_config(concurrency: 1))
      uuid = create_adversarial_task
      event = TaskerCore::FFI.next_step_event(1e300)
      expect(event[:task_uuid]).to eq(uuid)
      completer = Thread.new do
        sleep 0.2
        TaskerCore::FFI.send_step_completion_event(success_for(event))
      end
      expect(TaskerCore::FFI.wait_for_task(uuid, 1e19)[:status]).to eq("complete")
      completer.join(5)

      expect(TaskerCore::FFI.worker_status[:state]).to eq("running")
      second = create_adversarial_task
      expect(TaskerCore::FFI.next_step_event(Float::INFINITY)[:task_uuid]).to eq(second)
    end
  end

  it "forgets abandoned waiters: 30,000 wait_for_task(uuid, 0) on an unfinished task leave RSS and the " \
     "database's transaction rate flat" do
    # Nobody runs namespace pg here: the task stays pending and every wait times out at once.
    start_client(db)
    uuid = create_pg_task("single")
    2_000.times { expect(TaskerCore::FFI.wait_for_task(uuid, 0)).to be_nil }
    sleep 2 # let the engine catch up with the warm-up
    GC.start
    rss_before = rss_kb
    rate_before = commit_rate(3)

    30_000.times { TaskerCore::FFI.wait_for_task(uuid, 0) }
    # The engine is not backed up with work for waiters that left.
    started = monotonic
    expect(TaskerCore.task_status(uuid)[:status]).to eq("pending")
    expect(monotonic - started).to be < 1
    GC.start
    # A reply kept per abandoned wait costs ~1.5 KB: 30,000 of them ~45 MB. Allocator noise on a
    # loaded machine has reached ~11 MB, so the bound sits well between the two.
    expect(rss_kb - rss_before).to be < 20_000
    rate_after = commit_rate(3)
    expect(rate_after).to be < rate_before + 5
    expect(TaskerCore::FFI.worker_status[:state]).to eq("running")
    expect(TaskerCore.task_status(uuid)[:status]).to eq("pending")
  end
end
