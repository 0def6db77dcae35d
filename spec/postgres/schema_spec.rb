# frozen_string_literal: true

RSpec.describe "PostgreSQL backend: schema and templates" do
  include_context "postgres database"

  def migrations(database)
    psql_rows("SELECT version, success FROM _sqlx_migrations ORDER BY version", db: database)
  end

  # Every migration in ext/tasker_worker/migrations, applied once and successfully.
  let(:all_applied) do
    Dir[File.expand_path("../../ext/tasker_worker/migrations/*.sql", __dir__)]
      .map { |f| [File.basename(f)[/\A\d+/], "t"] }
  end

  it "creates its tables on the first bootstrap" do
    expect(pg_tables(db)).not_to include(*PostgresHelpers::TABLES)

    start_client(db)

    expect(pg_tables(db)).to include(*PostgresHelpers::TABLES)
    expect(migrations(db)).to eq(all_applied)
    expect(psql_rows("SELECT indexname FROM pg_indexes WHERE tablename = 'tasker_ready_steps' ORDER BY 1", db: db))
      .to include(["tasker_ready_steps_claim"])
  end

  it "bootstraps again on the same database without changing the schema, templates or tasks" do
    start_client(db)
    task = create_pg_task("linear", "value" => 1) # nobody runs the pg namespace yet: it stays pending
    schema = -> { psql("SELECT table_name, column_name, data_type FROM information_schema.columns ORDER BY 1, 2", db:) }
    templates = -> { psql_rows("SELECT namespace, name, version, updated_at FROM tasker_templates ORDER BY 1, 2", db:) }
    before_schema = schema.call
    before_templates = templates.call
    TaskerCore::Worker::Bootstrap.instance.shutdown!

    2.times do
      start_client(db)
      expect(TaskerCore::FFI.worker_status).to include(running: true, backend: "postgres")
      TaskerCore::Worker::Bootstrap.instance.shutdown!
    end
    start_client(db)

    expect(schema.call).to eq(before_schema)
    expect(migrations(db)).to eq(all_applied)
    # Same rows, not even rewritten (a template's row changes only when its YAML does).
    expect(templates.call).to eq(before_templates)
    expect(TaskerCore.task_status(task)).to include(status: "pending", name: "linear")
  end

  it "lets processes that bootstrap at the same instant on a fresh database all succeed" do
    fresh = create_spec_database
    start_at = Time.now.to_f + 1.5 # after every child has loaded the gem
    racers = Array.new(3) do
      PostgresHelpers::WorkerProcess.new(pg_worker_config(fresh), env: { "PG_SPEC_START_AT" => start_at.to_s })
    end
    pg_children.concat(racers)

    racers.each(&:wait_ready)
    expect(racers.map { |r| r.status[:running] }).to eq([true, true, true])
    expect(pg_tables(fresh)).to include(*PostgresHelpers::TABLES)
    expect(migrations(fresh)).to eq(all_applied)
    # They did start together: the migrator's lock was contended, yet nobody failed.
    expect(racers.map { |r| r.status[:uptime_seconds] }.minmax.reduce(:-).abs).to be < 1.0
    expect(racers.map(&:stop)).to all(include(running: true, backend: "postgres"))
  ensure
    kill_pg_children
    drop_spec_database(fresh) if fresh
  end

  it "stores templates, so that a process without the files creates tasks another process runs" do
    storer = start_pg_worker(db, namespaces: ["storer_only"])
    storer.stop
    stored = psql_rows("SELECT namespace, name, version FROM tasker_templates ORDER BY name", db: db)
    files = Dir[File.join(PostgresHelpers::PG_TEMPLATES, "*.yml")]
    expect(stored).to eq(files.map { |f| ["pg", File.basename(f, ".yml"), "1.0.0"] })
    expect(psql("SELECT yaml FROM tasker_templates WHERE name = 'linear'", db: db))
      .to eq(File.read(File.join(PostgresHelpers::PG_TEMPLATES, "linear.yml")).strip)

    Dir.mktmpdir("no_templates") do |empty|
      # No template files at all; it runs the "test" namespace (no tasks there), so it claims nothing here.
      creator = start_pg_worker(db, templates: empty, namespaces: ["test"])
      expect(creator.status).to include(supported_namespaces: ["test"], running: true)
      unknown = creator.create_task("no_such_template")
      expect(unknown).to start_with("!TaskerCore::ConfigurationError")
      expect(unknown).to include("pg/no_such_template")
      task = creator.create_task("linear", { "value" => 10 })
      expect(task).to match(/\A\h{8}-\h{4}-\h{4}-\h{4}-\h{12}\z/)

      runner = start_pg_worker(db)
      start_client(db)
      final = TaskerCore.wait_for_task(task, timeout: 15)

      expect(final[:status]).to eq("complete")
      expect(final[:steps].map { |s| s[:result]["value"] }).to eq([11, 12, 13])
      expect(final[:steps].map { |s| s[:result]["pid"] }.uniq).to eq([runner.pid])
      expect(creator.status[:steps_processed]).to eq(0)
    end
  end
end
