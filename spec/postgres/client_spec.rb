# frozen_string_literal: true

# TaskerCore::Client.connect: a process that creates and follows tasks while worker processes run
# them, with no handler thread and no template file of its own.
RSpec.describe "PostgreSQL backend: a client-only process (Client.connect)" do
  include_context "postgres database"

  after { @client&.close }

  def handler_threads
    Thread.list.count { |t| t.name.to_s.start_with?("tasker-handler") }
  end

  it "creates tasks that a worker process runs, answers for them, and starts no handler thread" do
    worker = start_pg_worker(db)
    @client = TaskerCore::Client.connect(database_url: pg_url(db), log_level: "error")
    expect(@client).to be_connected
    expect(handler_threads).to eq(0)
    expect(TaskerCore::FFI.worker_status).to include(running: true, backend: "postgres", supported_namespaces: [])

    uuid = @client.create_task(namespace: PostgresHelpers::PG_NAMESPACE, name: "linear", context: { "value" => 1 })
    final = @client.wait_for_task(uuid, timeout: 30)
    expect(final[:status]).to eq("complete")
    expect(final[:steps].map { |s| s[:result]["value"] }).to eq([2, 3, 4])
    expect(final[:steps].map { |s| s[:result]["pid"] }.uniq).to eq([worker.pid])

    batch = @client.create_tasks(namespace: PostgresHelpers::PG_NAMESPACE, name: "linear",
                                 contexts: [{ "value" => 10 }, { "value" => 20 }])
    expect(@client.wait_for_tasks(batch, timeout: 30).map { |t| t[:status] }).to eq(%w[complete complete])
    expect(@client.task_status(batch.first)[:steps].last[:result]["value"]).to eq(13)
    expect(@client.tasks(namespace: PostgresHelpers::PG_NAMESPACE, limit: 10)[:tasks].size).to eq(3)
    expect(handler_threads).to eq(0)
  end

  it "raises as a worker does for an unknown template, and for an unknown uuid" do
    start_pg_worker(db) # stores the templates
    @client = TaskerCore::Client.connect(database_url: pg_url(db), log_level: "error")
    expect { @client.create_task(namespace: PostgresHelpers::PG_NAMESPACE, name: "no_such_template") }
      .to raise_error(TaskerCore::ConfigurationError, %r{pg/no_such_template})
    expect { @client.task_status(SecureRandom.uuid) }.to raise_error(TaskerCore::TaskNotFoundError)
    expect(@client).to be_connected
  end

  it "cancels a task a worker process is running" do
    start_pg_worker(db)
    @client = TaskerCore::Client.connect(database_url: pg_url(db), log_level: "error")
    uuid = @client.create_task(namespace: PostgresHelpers::PG_NAMESPACE, name: "linear",
                               context: { "value" => 1, "plan" => { "*" => { "sleep" => 5 } } })
    eventually(timeout: 10) { @client.task_status(uuid)[:status] == "in_progress" }
    expect(@client.cancel_task(uuid)).to be(true)
    expect(@client.wait_for_task(uuid, timeout: 30)[:status]).to eq("cancelled")
  end

  it "refuses what a client cannot do, naming it" do
    expect { TaskerCore::Client.connect(database_url: nil) }
      .to raise_error(TaskerCore::ConfigurationError, /needs database_url.*memory backend.*TaskerCore.create_task/m)
    expect { TaskerCore::Client.connect(database_url: pg_url(db), namespaces: ["pg"], concurrency: 2) }
      .to raise_error(TaskerCore::ConfigurationError, /namespaces, concurrency: not a client setting/)
    expect(TaskerCore::FFI.worker_status[:running]).to be(false)

    @client = TaskerCore::Client.connect(database_url: pg_url(db), log_level: "error")
    expect { TaskerCore::Client.connect(database_url: pg_url(db)) }
      .to raise_error(TaskerCore::WorkerBootstrapError, /already runs a worker or a client/)

    @client.close
    expect(@client).not_to be_connected
    expect(TaskerCore::FFI.worker_status[:running]).to be(false)
    expect { @client.task_status(SecureRandom.uuid) }
      .to raise_error(TaskerCore::WorkerNotInitializedError, "this client was closed")
    expect(@client.close).to be_nil
  end
end
