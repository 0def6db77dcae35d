# frozen_string_literal: true

# Issue F2, defect 12: a rolling deploy, where a newer release migrated the schema first.
RSpec.describe "PostgreSQL backend (adversarial): a schema newer than the build" do
  include_context "postgres database"

  let(:future) { 20_991_231_000_001 }

  it "runs against a newer additive migration it does not know, and refuses clearly once a migration " \
     "declares older builds incompatible (defect 12)" do
    start_client(db)
    TaskerCore::Worker::Bootstrap.instance.shutdown!

    # What a newer release's additive migration does: a defaulted column, and its row in sqlx's table.
    psql(<<~SQL, db: db)
      ALTER TABLE tasker_tasks ADD COLUMN priority integer NOT NULL DEFAULT 0;
      INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
      VALUES (#{future}, 'future additive change', true, '\\x00'::bytea, 1);
    SQL
    start_pg_worker(db)
    start_client(db)
    expect(TaskerCore.wait_for_task(create_pg_task("linear"), timeout: 10)&.fetch(:status)).to eq("complete")
    TaskerCore::Worker::Bootstrap.instance.shutdown!
    kill_pg_children

    # A newer release whose migration older builds cannot run against says so.
    psql("UPDATE tasker_schema_compat SET min_migration = #{future}", db: db)
    expect { start_client(db) }.to raise_error(TaskerCore::WorkerBootstrapError) { |error|
      expect(error.message).to include("needs a build that knows migration #{future}", "this build knows up to")
      expect(error.message).not_to include("previously applied but is missing")
    }
  end
end
