# frozen_string_literal: true

# On the postgres backend, start! checks the handlers of the local template files in the
# namespaces it runs, before it connects: a refused worker creates no schema and claims nothing.
RSpec.describe "PostgreSQL backend: handler validation at start!" do
  include_context "postgres database"

  it "refuses a worker whose namespace names an undefined handler, before touching the database" do
    # PgSpec::Step is defined in the worker processes (spec/fixtures/postgres/worker.rb), not here.
    expect(defined?(PgSpec::Step)).to be_nil
    expect { start_client(db, namespaces: [PostgresHelpers::PG_NAMESPACE]) }
      .to raise_error(TaskerCore::ConfigurationError) { |error|
        expect(error.message).to start_with("1 of the 1 handler classes named by the templates cannot run:")
        expect(error.message).to include("PgSpec::Step is not defined",
                                         "used by pg/diamond@1.0.0 steps start, left, right and 1 more; " \
                                         "pg/fanout@1.0.0 steps root, child1, child2 and 9 more; " \
                                         "pg/linear@1.0.0 steps first, second, third; and 3 more templates")
      }
    expect(TaskerCore::FFI.worker_status).to include(running: false)
    expect(pg_tables(db)).to be_empty

    # The namespace this process runs has no local templates: nothing to check, and it starts.
    start_client(db)
    expect(TaskerCore::FFI.worker_status).to include(running: true, backend: "postgres")
    expect(pg_tables(db)).to include("tasker_tasks")
  end

  it "starts a worker process whose handlers are defined, and runs a task through it" do
    start_pg_worker(db)
    start_client(db)

    uuid = create_pg_task("single")
    expect(TaskerCore.wait_for_task(uuid, timeout: 20)[:status]).to eq("complete")
  end

  it "lets validate_handlers: false start a worker whose handlers are not loaded yet" do
    start_client(db, namespaces: [PostgresHelpers::PG_NAMESPACE], validate_handlers: false)
    expect(TaskerCore::FFI.worker_status).to include(running: true, supported_namespaces: ["pg"])
  end
end
