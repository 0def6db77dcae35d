# frozen_string_literal: true

RSpec.describe "PostgreSQL backend: resilience" do
  include_context "postgres database"

  describe "an unreachable database" do
    let(:url) { "postgres://u:secretpw@127.0.0.1:1/x" }

    it "fails bootstrap_worker within 5 s with WorkerBootstrapError naming the URL, password masked" do
      started = pg_monotonic
      expect do
        TaskerCore::FFI.bootstrap_worker(backend: "postgres", database_url: url,
                                         templates: PostgresHelpers::PG_TEMPLATES)
      end.to raise_error(TaskerCore::WorkerBootstrapError) { |error|
        expect(error.message).to include("postgres://u:****@127.0.0.1:1/x")
        expect(error.message).not_to include("secretpw")
      }
      expect(pg_monotonic - started).to be < 5
      expect(TaskerCore::FFI.worker_status).to include(running: false)
    end

    it "fails Bootstrap.start! the same way, and leaves nothing running: a good database works next" do
      expect { start_client("x", database_url: url) }.to raise_error(TaskerCore::WorkerBootstrapError, /u:\*\*\*\*@/)
      expect(TaskerCore::Worker::Bootstrap.instance.running?).to be(false)
      expect(TaskerCore::FFI.worker_status).to include(running: false)

      start_client(db)
      expect(TaskerCore::FFI.worker_status).to include(running: true, backend: "postgres")
    end

    it "names a missing database (server reachable), password masked" do
      missing = "postgres://#{PostgresHelpers::PG_USER}:secretpw@#{PostgresHelpers::PG_HOST}:" \
                "#{PostgresHelpers::PG_PORT}/tasker_spec_no_such_db"
      expect { start_client(db, database_url: missing) }.to raise_error(TaskerCore::WorkerBootstrapError) { |error|
        expect(error.message).to include(":****@", "tasker_spec_no_such_db")
        expect(error.message).not_to include("secretpw")
      }
    end
  end

  describe "PostgreSQL restarting mid-run" do
    def restart_postgres
      version = Dir.children("/etc/postgresql").min
      out, status = Open3.capture2e("pg_ctlcluster", "--skip-systemctl-redirect", version,
                                    PostgresHelpers::PG_CLUSTER, "restart")
      raise "restarting PostgreSQL failed: #{out}" unless status.success?

      eventually(timeout: 30, interval: 0.1) do
        system("pg_isready", "-q", "-h", PostgresHelpers::PG_HOST, "-p", PostgresHelpers::PG_PORT)
      end
    end

    def complete_tasks
      psql_count("SELECT count(*) FROM tasker_tasks WHERE status = 'complete'", db: db)
    end

    it "loses no task: workers and clients reconnect (LISTEN included) and every task completes" do
      # EventDriven: nothing polls, so work after the restart proves the LISTEN connection came back.
      workers = start_pg_workers(db, 2, deployment_mode: "EventDriven")
      start_client(db, deployment_mode: "EventDriven")
      before = complete_tasks
      context = { "plan" => { "*" => { "sleep" => 0.05 } }, "value" => 0 }
      uuids = Array.new(200) { create_pg_task("linear", context) }
      eventually(timeout: 20) { complete_tasks - before >= 20 }

      done_at_restart = complete_tasks - before
      restart_postgres
      results = uuids.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 60) }

      expect(done_at_restart).to be < 150 # the restart did cut through the run
      expect(results.map { |r| r[:status] }.tally).to eq("complete" => 200)
      expect(results.map { |r| r[:steps].map { |s| s[:result]["value"] } }.uniq).to eq([[1, 2, 3]])
      expect(psql_count("SELECT count(*) FROM tasker_steps WHERE status <> 'complete'", db: db)).to eq(0)
      expect(psql_count("SELECT count(*) FROM tasker_ready_steps", db: db)).to eq(0)
      expect(workers.map { |w| w.status[:running] }).to eq([true, true])

      # New work after the restart: created here, announced by NOTIFY, run there.
      started = pg_monotonic
      after = Array.new(5) { create_pg_task("linear", "value" => 0) }
      expect(after.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 10)[:status] }).to eq(["complete"] * 5)
      expect(pg_monotonic - started).to be < 5
    end
  end
end
