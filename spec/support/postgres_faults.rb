# frozen_string_literal: true

# Faults injected into the real PostgreSQL for spec/adversarial: errors raised by a trigger while
# a fault is armed, and a second session holding row locks.
module PostgresFaults
  # A trigger on `table` raising SQLSTATE `sqlstate` for every UPDATE that sets `status` to
  # `status`, while the fault `name` is armed (see #arm_fault). Needs the schema (a worker started).
  def install_fault(name, table:, status:, sqlstate:)
    psql(<<~SQL, db: db)
      CREATE TABLE IF NOT EXISTS spec_faults (name text PRIMARY KEY);
      CREATE OR REPLACE FUNCTION spec_fault_#{name}() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF NEW.status = '#{status}' AND EXISTS (SELECT 1 FROM spec_faults WHERE name = '#{name}') THEN
          RAISE EXCEPTION 'injected fault #{name}' USING ERRCODE = '#{sqlstate}';
        END IF;
        RETURN NEW;
      END $$;
      DROP TRIGGER IF EXISTS spec_fault_#{name} ON #{table};
      CREATE TRIGGER spec_fault_#{name} BEFORE UPDATE ON #{table}
        FOR EACH ROW EXECUTE FUNCTION spec_fault_#{name}();
    SQL
  end

  # A trigger on tasker_ready_steps raising SQLSTATE `sqlstate` for every renewal of a claim lease
  # (an UPDATE pushing forward the `visible_at` of a row still hidden; a claim takes a visible row)
  # while the fault `name` is armed.
  def install_renewal_fault(name, sqlstate:)
    psql(<<~SQL, db: db)
      CREATE TABLE IF NOT EXISTS spec_faults (name text PRIMARY KEY);
      CREATE OR REPLACE FUNCTION spec_fault_#{name}() RETURNS trigger LANGUAGE plpgsql AS $$
      BEGIN
        IF OLD.visible_at > now() AND NEW.visible_at > OLD.visible_at
           AND EXISTS (SELECT 1 FROM spec_faults WHERE name = '#{name}') THEN
          RAISE EXCEPTION 'injected fault #{name}' USING ERRCODE = '#{sqlstate}';
        END IF;
        RETURN NEW;
      END $$;
      DROP TRIGGER IF EXISTS spec_fault_#{name} ON tasker_ready_steps;
      CREATE TRIGGER spec_fault_#{name} BEFORE UPDATE ON tasker_ready_steps
        FOR EACH ROW EXECUTE FUNCTION spec_fault_#{name}();
    SQL
  end

  def arm_fault(name)
    psql("INSERT INTO spec_faults VALUES ('#{name}') ON CONFLICT DO NOTHING", db: db)
  end

  def disarm_fault(name)
    psql("DELETE FROM spec_faults WHERE name = '#{name}'", db: db)
  end

  # A psql session that runs `sql` in an open transaction and holds it (and its locks) until #release.
  class LockHolder
    attr_reader :backend_pid

    def initialize(db, sql)
      @stdin, @stdout, @stderr, @wait = Open3.popen3("psql", "-h", PostgresHelpers::PG_HOST, "-p",
                                                     PostgresHelpers::PG_PORT, "-U", PostgresHelpers::PG_USER,
                                                     "-d", db, "-X", "-At", "-v", "ON_ERROR_STOP=1")
      @stdin.puts("BEGIN;", "#{sql};", "SELECT 'held ' || pg_backend_pid();")
      @stdin.flush
      loop do
        line = @stdout.gets || raise("psql could not take the lock: #{@stderr.read}")
        break @backend_pid = Integer(line.split.last) if line.start_with?("held ")
      end
    end

    def release
      @stdin.puts("ROLLBACK;")
      @stdin.close
      @wait.join(5)
    rescue IOError
      nil
    ensure
      Process.kill("KILL", @wait.pid) if @wait.alive?
    end
  end

  # Sessions of database `db` (other than psql's own) waiting for a lock.
  def sessions_waiting_for_locks
    psql_count("SELECT count(*) FROM pg_stat_activity WHERE datname = '#{db}' AND wait_event_type = 'Lock'",
               db: "postgres")
  end

  # [pid, state] of the worker's sessions (application_name "tasker <worker_id>").
  def worker_sessions(worker_id)
    psql_rows("SELECT pid, state FROM pg_stat_activity WHERE datname = '#{db}' AND " \
              "application_name = 'tasker #{worker_id}'", db: "postgres")
  end
end
