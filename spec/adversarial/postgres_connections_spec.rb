# frozen_string_literal: true

# Issue F2, defects 4, 6 and 11: connections that die silently, the smallest pool, and URLs in
# messages and logs; and client calls that meet a connection the server closed.
RSpec.describe "PostgreSQL backend (adversarial): connections" do
  include_context "postgres database"

  describe "a LISTEN connection that dies silently (no FIN, no RST: a NAT or firewall dropped it)" do
    let(:proxy) { SilenceableTcpProxy.new(PostgresHelpers::PG_HOST, PostgresHelpers::PG_PORT) }

    after { proxy.close }

    it "is noticed by its heartbeat and replaced: an EventDriven worker still hears of new tasks (defect 4)" do
      proxied = "postgres://#{PostgresHelpers::PG_USER}@127.0.0.1:#{proxy.port}/#{db}"
      worker = start_pg_worker(db, database_url: proxied, deployment_mode: "EventDriven")
      start_client(db, deployment_mode: "EventDriven")
      expect(TaskerCore.wait_for_task(create_pg_task("single"), timeout: 10)&.fetch(:status)).to eq("complete")

      proxy.silence!
      started = pg_monotonic
      uuid = create_pg_task("single")
      result = TaskerCore.wait_for_task(uuid, timeout: 30)

      expect(result && result[:status]).to eq("complete")
      expect(pg_monotonic - started).to be < 25
      expect(proxy.live_connections).to be >= 1 # it came back through new connections
      expect(worker.status[:running]).to be(true)
    end
  end

  describe "database_pool_size: 1 (defect 6)" do
    %w[Hybrid EventDriven Polling].each do |mode|
      it "runs tasks in #{mode} mode: the LISTEN connection is not taken from the pool" do
        start_pg_worker(db, database_pool_size: 1, deployment_mode: mode, poll_interval: 0.1)
        start_client(db, database_pool_size: 1, deployment_mode: mode)
        uuids = Array.new(10) { create_pg_task("diamond") }
        statuses = uuids.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 15)&.fetch(:status) }
        expect(statuses).to eq(["complete"] * 10)
      end
    end
  end

  describe "passwords in database_url (defect 11)" do
    {
      "userinfo" => "postgres://app:s3cretpw@127.0.0.1:1/x",
      "userinfo with a raw @" => "postgres://app:s3cr@tpw@127.0.0.1:1/x",
      "userinfo with a raw / and ?" => "postgres://app:s3/cr?tpw@127.0.0.1:1/x",
      "query parameter" => "postgres://app@127.0.0.1:1/x?sslmode=disable&password=s3cretpw"
    }.each do |form, url|
      it "are masked in the bootstrap error (#{form})" do
        expect do
          TaskerCore::FFI.bootstrap_worker(backend: "postgres", database_url: url,
                                           templates: PostgresHelpers::PG_TEMPLATES)
        end.to raise_error(TaskerCore::WorkerBootstrapError) { |error|
          expect(error.message).to include("****")
          %w[s3cretpw s3cr tpw cr?tpw].each { |part| expect(error.message).not_to include(part) }
        }
      end
    end

    it "never reach the log, and the URL is not logged at info on every boot" do
      url = "postgres://#{PostgresHelpers::PG_USER}:t0psecret@#{PostgresHelpers::PG_HOST}:" \
            "#{PostgresHelpers::PG_PORT}/#{db}?application_name=f2spec"
      worker = start_pg_worker(db, database_url: url, log_level: "info")
      worker.stop
      expect(worker.stderr).to include("postgres backend ready")
      expect(worker.stderr).not_to include("t0psecret")
      expect(worker.stderr).not_to include("#{PostgresHelpers::PG_PORT}/#{db}")
    end
  end

  describe "client calls on connections the server closes (pg_terminate_backend while they run)" do
    # A cancel or retry whose connection is cut at COMMIT cannot know whether it committed, and says
    # so ("... is unknown ..."), adding that calling again is safe: do as it says, a few times.
    def until_known(tries = 5)
      yield
    rescue TaskerCore::FFIError => e
      raise unless e.message.include?("is unknown") && (tries -= 1).positive?

      retry
    end

    # Every 50 ms the client's sessions are terminated, some while a call uses them: each call must
    # get a new connection and answer, never raise FFIError for a connection that a retry cures.
    it "create_task, task_status, wait_for_task, cancel_task and retry_task answer, and no task is created twice" do
      start_pg_worker(db)
      start_client(db, worker_id: "terminated-client")
      before = psql_count("SELECT count(*) FROM tasker_tasks", db: db)
      stop = false
      terminated = 0
      terminator = Thread.new do
        until stop
          terminated += Integer(psql(<<~SQL))
            SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
            WHERE datname = '#{db}' AND application_name = 'tasker terminated-client'
          SQL
          sleep 0.05
        end
      end
      errors = []
      uuids = []
      retried = []
      deadline = pg_monotonic + 6
      while pg_monotonic < deadline
        begin
          # Every fifth task sleeps a moment, is cancelled while it runs, then retried.
          cancel = (uuids.size % 5).zero?
          uuid = create_pg_task("single", cancel ? { "plan" => { "only" => { "sleep" => 0.2 } } } : {})
          uuids << uuid
          TaskerCore.task_status(uuid)
          until_known { TaskerCore.cancel_task(uuid) } if cancel
          final = TaskerCore.wait_for_task(uuid, timeout: 10)
          if final[:status] == "cancelled"
            until_known do
              # A retry whose COMMIT went through before the cut: the task runs again already.
              TaskerCore.retry_task(uuid) if %w[error cancelled].include?(TaskerCore.task_status(uuid)[:status])
            end
            retried << uuid
            TaskerCore.wait_for_task(uuid, timeout: 10)
          end
        rescue TaskerCore::Error => e
          errors << "#{e.class}: #{e.message}"
        end
      end
      stop = true
      terminator.join

      expect(terminated).to be > 20
      expect(errors).to eq([])
      expect(uuids.size).to be > 20
      expect(psql_count("SELECT count(*) FROM tasker_tasks", db: db) - before).to eq(uuids.size) # each created once
      finished = psql_count("SELECT count(*) FROM tasker_tasks WHERE task_uuid = ANY(#{uuid_array(uuids)}) " \
                            "AND status IN ('complete', 'cancelled')", db: db)
      expect(finished).to eq(uuids.size)
      expect(retried).not_to be_empty
      expect(retried.map { |retried_uuid| TaskerCore.task_status(retried_uuid)[:status] }.uniq).to eq(["complete"])
    end
  end

  it "logs no routine notice at boot (the schema exists: CREATE ... IF NOT EXISTS answers with a NOTICE)" do
    start_pg_worker(db).stop # creates the schema
    worker = start_pg_worker(db, log_level: "info")
    worker.stop
    expect(worker.stderr).to include("postgres backend ready")
    expect(worker.stderr).not_to match(/already exists|NOTICE/i)
  end
end
