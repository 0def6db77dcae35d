# frozen_string_literal: true

require "time"

RSpec.describe "PostgreSQL backend: step records" do
  include_context "postgres database"

  let(:iso8601_ms) { /\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\z/ }
  # The timestamps are printed with milliseconds: a comparison with a finer clock allows that much.
  let(:printed) { 0.001 }

  def plan(plans)
    { "plan" => plans }
  end

  def time(iso)
    expect(iso).to match(iso8601_ms)
    Time.iso8601(iso)
  end

  describe "on tasks that run" do
    before do
      start_pg_worker(db, poll_interval: 0.1)
      start_client(db)
    end

    it "gives each step started_at, completed_at, duration_ms and its metadata; the task created_at and " \
       "completed_at" do
      metadata = { "region" => "eu", "tries" => 1, "nested" => { "list" => [1, "two"] } }
      uuid = create_pg_task("linear", plan("second" => { "sleep" => 0.05, "metadata" => metadata }))

      final = TaskerCore.wait_for_task(uuid, timeout: 15)

      expect(final[:status]).to eq("complete")
      created = time(final[:created_at])
      finished = time(final[:completed_at])
      steps = %w[first second third].map { |name| step_of(final, name) }
      steps.each do |step|
        started = time(step[:started_at])
        completed = time(step[:completed_at])
        expect(started).to be <= completed
        expect(step[:duration_ms]).to be_within(1).of((completed - started) * 1000)
        expect(created).to be <= started
        expect(finished).to be >= completed
      end
      # Steps run one after the other, and the sleeping one took its time.
      expect(time(steps[1][:started_at])).to be >= time(steps[0][:completed_at])
      expect(time(steps[2][:started_at])).to be >= time(steps[1][:completed_at])
      expect(steps[1][:duration_ms]).to be >= 50
      expect(steps[1][:metadata]).to eq(metadata)
      # A handler that returns a bare result has empty metadata.
      expect(steps[0][:metadata]).to eq({})
    end

    it "keeps a failed attempt's metadata (the backtrace) and its times" do
      log = File.join(Dir.tmpdir, "step_records_#{SecureRandom.hex(4)}.log")
      uuid = create_pg_task("retrying", plan("flaky" => { "raise" => "permanent" }).merge("log" => log))

      final = TaskerCore.wait_for_task(uuid, timeout: 15)

      expect(final[:status]).to eq("error")
      flaky = step_of(final, "flaky")
      expect(flaky).to include(status: "error", attempts: 1)
      backtrace = flaky[:metadata]["backtrace"]
      expect(backtrace).to be_an(Array).and(be_any)
      expect(backtrace.first).to include("worker.rb")
      ran = handler_log(log).first
      expect(time(flaky[:started_at]).to_f).to be <= ran[:at] + printed
      expect(time(flaky[:completed_at]).to_f).to be >= ran[:at] - printed
      expect(time(final[:completed_at])).to be >= time(flaky[:completed_at])
      # The dependent never ran: no times.
      expect(step_of(final, "after")).to include(status: "skipped", started_at: nil, completed_at: nil,
                                                 duration_ms: nil)
    ensure
      FileUtils.rm_f(log) if log
    end

    it "times the latest attempt of a retried step, whose successful completion replaces the failure's metadata" do
      log = File.join(Dir.tmpdir, "step_records_#{SecureRandom.hex(4)}.log")
      uuid = create_pg_task("retrying", plan("flaky" => { "raise" => "retryable", "until_attempt" => 2 })
                                          .merge("log" => log))

      final = TaskerCore.wait_for_task(uuid, timeout: 15)

      expect(final[:status]).to eq("complete")
      flaky = step_of(final, "flaky")
      expect(flaky).to include(status: "complete", attempts: 2, metadata: {})
      starts = handler_log(log).select { |l| l[:step_uuid] == flaky[:step_uuid] && l[:event] == "start" }
      expect(starts.map { |l| l[:attempt] }).to eq([1, 2])
      # Claimed after the first attempt ran (and its backoff passed), before the second one ran.
      started = time(flaky[:started_at]).to_f
      expect(started).to be >= starts[0][:at] + 0.3 - printed
      expect(started).to be <= starts[1][:at] + printed
      expect(time(flaky[:completed_at]).to_f).to be >= starts[1][:at] - printed
    ensure
      FileUtils.rm_f(log) if log
    end

    it "fails only the step whose metadata holds a NUL byte, naming where; other steps record theirs" do
      good = Array.new(10) { create_pg_task("single", plan("only" => { "metadata" => { "ok" => true } })) }
      bad = create_pg_task("linear", plan("second" => { "nul" => "metadata" }))
      good += Array.new(10) { create_pg_task("single", plan("only" => { "metadata" => { "ok" => true } })) }

      finals = good.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 15) }
      expect(finals.map { |f| [f[:status], step_of(f, "only")[:metadata]] }.uniq)
        .to eq([["complete", { "ok" => true }]])

      poisoned = TaskerCore.wait_for_task(bad, timeout: 15)
      expect(poisoned[:status]).to eq("error")
      second = step_of(poisoned, "second")
      expect(second).to include(status: "error", attempts: 1, metadata: {})
      expect(second[:error_message]).to include("metadata", "NUL", "$.note")
      expect(second[:completed_at]).not_to be_nil
      expect(step_of(poisoned, "third")[:status]).to eq("skipped")
    end
  end

  describe "the migration" do
    let(:old_step_statuses) { %w[pending enqueued in_progress complete error waiting_for_retry] }
    let(:old_task_statuses) { %w[pending in_progress complete error] }
    let(:migration) { "20261130000002" }

    def check_of(table, database)
      psql("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = '#{table}_status_check'",
           db: database)
    end

    def step_columns(database)
      psql_rows("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'tasker_steps' " \
                "AND column_name IN ('started_at', 'completed_at', 'metadata') ORDER BY 1", db: database)
    end

    def sql_list(values)
      values.map { |v| "'#{v}'" }.join(", ")
    end

    # Undo the step-records migration: the schema (and migration history) the previous release left.
    def downgrade(database)
      psql(<<~SQL, db: database)
        BEGIN;
        ALTER TABLE tasker_steps DROP COLUMN started_at, DROP COLUMN completed_at, DROP COLUMN metadata,
          DROP CONSTRAINT tasker_steps_status_check,
          ADD CONSTRAINT tasker_steps_status_check CHECK (status IN (#{sql_list(old_step_statuses)}));
        ALTER TABLE tasker_tasks DROP CONSTRAINT tasker_tasks_status_check,
          ADD CONSTRAINT tasker_tasks_status_check CHECK (status IN (#{sql_list(old_task_statuses)}));
        DELETE FROM _sqlx_migrations WHERE version = #{migration};
        COMMIT;
      SQL
    end

    # The schema the migrations before this one create, applied by hand to an empty database.
    def previous_schema(database)
      files = Dir[File.expand_path("../../ext/tasker_worker/migrations/*.sql", __dir__)]
      files.reject { |f| File.basename(f).start_with?(migration) }.each { |f| psql(File.read(f), db: database) }
    end

    def schema_of(database)
      psql("SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns " \
           "WHERE table_name LIKE 'tasker_%' ORDER BY 1, 2", db: database) +
        psql("SELECT conrelid::regclass, conname, pg_get_constraintdef(oid) FROM pg_constraint " \
             "WHERE conrelid::regclass::text LIKE 'tasker_%' ORDER BY 1, 2", db: database)
    end

    def rejects_status?(table, status, database)
      psql("BEGIN; UPDATE #{table} SET status = '#{status}'; ROLLBACK;", db: database)
      false
    rescue RuntimeError => e
      raise unless e.message.include?("#{table}_status_check")

      true
    end

    it "applies on a database the previous schema holds, keeping its tasks, and widens the status checks" do
      upgraded = create_spec_database
      reference = create_spec_database
      start_pg_worker(upgraded)
      start_client(upgraded)
      before = TaskerCore.wait_for_task(create_pg_task("linear", "value" => 1), timeout: 15)
      expect(before[:status]).to eq("complete")
      TaskerCore::Worker::Bootstrap.instance.shutdown!
      kill_pg_children

      downgrade(upgraded)
      previous_schema(reference)
      # The downgrade is the previous schema exactly, and its checks refuse the new statuses.
      expect(schema_of(upgraded)).to eq(schema_of(reference))
      expect(step_columns(upgraded)).to eq([])
      expect(rejects_status?("tasker_steps", "skipped", upgraded)).to be(true)
      expect(rejects_status?("tasker_tasks", "cancelled", upgraded)).to be(true)

      start_client(upgraded)

      expect(psql_rows("SELECT version, success FROM _sqlx_migrations WHERE version = #{migration}", db: upgraded))
        .to eq([[migration, "t"]])
      timestamptz = "timestamp with time zone"
      expect(step_columns(upgraded))
        .to eq([["completed_at", timestamptz], %w[metadata jsonb], ["started_at", timestamptz]])
      %w[skipped cancelled].each { |s| expect(rejects_status?("tasker_steps", s, upgraded)).to be(false) }
      expect(rejects_status?("tasker_tasks", "cancelled", upgraded)).to be(false)
      expect(rejects_status?("tasker_tasks", "skipped", upgraded)).to be(true)
      expect(rejects_status?("tasker_steps", "bogus", upgraded)).to be(true)
      expect(check_of("tasker_steps", upgraded)).to include("'skipped'::text", "'cancelled'::text")
      # The task recorded before the upgrade reads as it did, without the times it never stored.
      after = TaskerCore.task_status(before[:task_uuid])
      expect(after[:status]).to eq("complete")
      expect(after[:created_at]).to eq(before[:created_at])
      expect(after[:steps].map { |s| [s[:result], s[:started_at], s[:metadata]] })
        .to eq(before[:steps].map { |s| [s[:result], nil, {}] })
      # New work on the upgraded schema records its times.
      start_pg_worker(upgraded)
      fresh = TaskerCore.wait_for_task(create_pg_task("single"), timeout: 15)
      expect(step_of(fresh, "only")[:started_at]).to match(iso8601_ms)
    ensure
      TaskerCore::Worker::Bootstrap.instance.shutdown!
      kill_pg_children
      [upgraded, reference].compact.each { |d| drop_spec_database(d) }
    end
  end
end
