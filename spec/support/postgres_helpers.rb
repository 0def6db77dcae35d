# frozen_string_literal: true

require "json"
require "open3"
require "rbconfig"
require "securerandom"
require "tmpdir"

# Helpers for spec/postgres: a fresh database per spec file, psql for direct checks, and worker
# processes (spec/fixtures/postgres/worker.rb) driven over stdin/stdout.
module PostgresHelpers
  PG_HOST = ENV.fetch("TASKER_SPEC_PGHOST", "127.0.0.1")
  PG_PORT = ENV.fetch("TASKER_SPEC_PGPORT", "5432")
  PG_USER = ENV.fetch("TASKER_SPEC_PGUSER", "postgres")
  PG_FIXTURES = File.join(FIXTURES, "postgres")
  PG_TEMPLATES = File.join(PG_FIXTURES, "templates")
  PG_WORKER = File.join(PG_FIXTURES, "worker.rb")
  # The namespace of PG_TEMPLATES; only worker processes (which define the handlers) run it.
  PG_NAMESPACE = "pg"
  # The spec process's own worker runs this namespace, which has no tasks: it creates and waits, never claims.
  CLIENT_NAMESPACE = "pg_client"
  TABLES = %w[tasker_templates tasker_tasks tasker_steps tasker_ready_steps].freeze

  # A worker process running spec/fixtures/postgres/worker.rb.
  class WorkerProcess
    attr_reader :pid

    def initialize(config, env: {})
      @stdin, @stdout, @stderr, @wait = Open3.popen3(
        { "TASKER_LOG_LEVEL" => "error" }.merge(env), RbConfig.ruby, "-I", SpecHelpers::LIB, PG_WORKER,
        JSON.generate(config), chdir: Dir.tmpdir
      )
      @pid = @wait.pid
      @lines = []
      @mutex = Mutex.new
      @arrived = ConditionVariable.new
      @err = +""
      @readers = [Thread.new { read_lines }, Thread.new { @stderr.each_line { |l| @err << l } }]
    end

    # Wait for "READY"; raises with the child's stderr when it died or took longer than `timeout`.
    def wait_ready(timeout: 20)
      expect_line("READY", timeout)
      self
    end

    # @return [Hash] the child's Bootstrap#status (symbol keys)
    def status
      command("status")
      JSON.parse(expect_line("STATUS", 10), symbolize_names: true)
    end

    # Create a task from the child process. @return [String] its uuid
    def create_task(name, context = {}, namespace: PG_NAMESPACE)
      command("create #{namespace} #{name} #{JSON.generate(context)}")
      expect_line("CREATED", 10)
    end

    # Cancel a task from the child. @return [String] "true", "false" or "!<error class>: <message>"
    def cancel_task(uuid)
      command("cancel #{uuid}")
      expect_line("CANCELLED", 10)
    end

    # Retry a task from the child. @return [String] "true" or "!<error class>: <message>"
    def retry_task(uuid)
      command("retry #{uuid}")
      expect_line("RETRIED", 10)
    end

    # Graceful stop over stdin. @return [Hash] the status just before the shutdown
    def stop(timeout: 30)
      command("stop")
      status = JSON.parse(expect_line("STOPPED", timeout), symbolize_names: true)
      raise "worker #{pid} exited with #{exit_status.inspect}: #{stderr}" unless exit_status(timeout)&.success?

      status
    end

    def signal(name)
      Process.kill(name, pid)
    end

    def alive?
      @wait.alive?
    end

    # @return [Process::Status, nil] nil if it is still running after `timeout`
    def exit_status(timeout = 0)
      @wait.join(timeout)&.value
    end

    def stderr
      @readers.last.join(1)
      @err
    end

    # Never leave a child behind.
    def kill
      return unless alive?

      Process.kill("KILL", pid)
      @wait.join(5)
    rescue Errno::ESRCH
      nil
    end

    private

    def command(line)
      @stdin.puts(line)
      @stdin.flush
    rescue Errno::EPIPE, IOError
      raise "worker #{pid} is gone (#{exit_status.inspect}): #{stderr}"
    end

    def read_lines
      @stdout.each_line do |line|
        @mutex.synchronize do
          @lines << line.chomp
          @arrived.broadcast
        end
      end
    ensure
      @mutex.synchronize do
        @closed = true
        @arrived.broadcast
      end
    end

    # The next line starting with `prefix` (earlier lines are skipped), without the prefix.
    def expect_line(prefix, timeout)
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
      @mutex.synchronize do
        loop do
          while (line = @lines.shift)
            return line.delete_prefix("#{prefix} ") if line.start_with?(prefix)
          end
          left = deadline - Process.clock_gettime(Process::CLOCK_MONOTONIC)
          break if left <= 0 || @closed

          @arrived.wait(@mutex, left)
        end
      end
      raise "worker #{pid} sent no #{prefix} within #{timeout}s (exit: #{exit_status(1).inspect}): #{stderr}"
    end
  end

  # A psql session LISTENing on channels; #notifications ends it and returns what it received.
  class NotificationListener
    NOTIFICATION = /\AAsynchronous notification "(?<channel>[^"]+)"(?: with payload "(?<payload>[^"]*)")? received/

    def initialize(db, *channels)
      @stdin, @stdout, @stderr, @wait = Open3.popen3("psql", "-h", PG_HOST, "-p", PG_PORT, "-U", PG_USER, "-d", db,
                                                     "-X", "-At")
      channels.each { |channel| @stdin.puts("LISTEN #{channel};") }
      @stdin.puts("SELECT 'listening';")
      @stdin.flush
      # Once psql answers, the LISTENs are in effect.
      nil until (@stdout.gets || raise("psql LISTEN failed: #{@stderr.read}")).start_with?("listening")
    end

    # psql prints what arrived after its next command: [[channel, payload], ...] in arrival order.
    def notifications
      @stdin.puts("SELECT 'done';")
      @stdin.close
      lines = @stdout.read.lines
      @wait.join
      lines.filter_map { |line| (m = NOTIFICATION.match(line)) && [m[:channel], m[:payload].to_s] }
    end
  end

  # psql as the superuser: returns stdout (unaligned, tuples only), raises on any error.
  def psql(sql, db: "postgres")
    out, err, status = Open3.capture3("psql", "-h", PG_HOST, "-p", PG_PORT, "-U", PG_USER, "-d", db, "-X",
                                      "-v", "ON_ERROR_STOP=1", "-Atc", sql)
    raise "psql failed (#{sql}): #{err}" unless status.success?

    out.strip
  end

  def psql_rows(sql, db:)
    psql(sql, db: db).lines.map { |l| l.chomp.split("|") }
  end

  def psql_count(sql, db:)
    Integer(psql(sql, db: db))
  end

  # SQL for an array of task uuids: `WHERE task_uuid = ANY(#{uuid_array(uuids)})`
  def uuid_array(uuids)
    "ARRAY[#{uuids.map { |u| "'#{u}'::uuid" }.join(",")}]::uuid[]"
  end

  def pg_url(db)
    "postgres://#{PG_USER}@#{PG_HOST}:#{PG_PORT}/#{db}"
  end

  def create_spec_database
    name = "tasker_spec_#{SecureRandom.hex(6)}"
    psql("CREATE DATABASE #{name}")
    name
  end

  def drop_spec_database(name)
    psql("DROP DATABASE IF EXISTS #{name} WITH (FORCE)")
  end

  def pg_tables(db)
    psql("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename", db: db).lines.map(&:chomp)
  end

  def pg_worker_config(db, **config)
    { backend: "postgres", database_url: pg_url(db), templates: PG_TEMPLATES, namespaces: [PG_NAMESPACE],
      log_level: "error" }.merge(config)
  end

  # Start worker processes (in parallel) and wait until each is running.
  def start_pg_workers(db, count = 1, env: {}, **config)
    workers = Array.new(count) { WorkerProcess.new(pg_worker_config(db, **config), env: env) }
    pg_children.concat(workers)
    workers.each(&:wait_ready)
  end

  def start_pg_worker(db, **config)
    start_pg_workers(db, 1, **config).first
  end

  # This process's own worker: same database, a namespace without tasks (it never runs a step).
  def start_client(db, **config)
    TaskerCore::Worker::Bootstrap.start!(
      { backend: "postgres", database_url: pg_url(db), templates: PG_TEMPLATES, namespaces: [CLIENT_NAMESPACE],
        log_level: "error" }.merge(config)
    )
  end

  def create_pg_task(name, context = {})
    TaskerCore.create_task(namespace: PG_NAMESPACE, name: name, context: context)
  end

  def pg_children
    @pg_children ||= []
  end

  def kill_pg_children
    pg_children.each(&:kill)
    pg_children.clear
  end

  def step_of(task_status, name)
    task_status.fetch(:steps).find { |s| s[:name] == name } || raise("no step #{name} in #{task_status.inspect}")
  end

  # Lines the PgSpec::Step handler logged: [{step_uuid:, attempt:, pid:, event:, at:}]
  def handler_log(path)
    return [] unless File.exist?(path)

    File.readlines(path).map do |line|
      uuid, attempt, pid, event, at = line.split
      { step_uuid: uuid, attempt: Integer(attempt), pid: Integer(pid), event: event, at: Float(at) }
    end
  end

  def pg_monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end
end

# Each spec/postgres file gets its own database, dropped afterwards; no worker process outlives
# its example.
RSpec.shared_context "postgres database" do
  include PostgresHelpers

  before(:all) { @db = create_spec_database }
  after(:all) { drop_spec_database(@db) if @db }

  let(:db) { @db }

  after { kill_pg_children }
end
