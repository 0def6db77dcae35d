# frozen_string_literal: true

# Soak: mixed tasks (successes, retries, timeouts, permanent failures, cancels)
# for DURATION seconds (default 3600), with Thread#raise into random handler threads and a
# bootstrap/stop cycle every few seconds. Checks that no task is lost or left unfinished and that
# every final status is the one its kind must end in; prints RSS and thread count per cycle (they
# must stay flat).
#   rake bench:soak                    DURATION=300 CONCURRENCY=4 SEED=
#   rake bench:soak BACKEND=postgres   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
# BACKEND=postgres runs on a fresh database it creates on that server (default 127.0.0.1:5432, user
# postgres; the URL's database is only used to connect) and drops afterwards, and adds the database's
# faults: pg_terminate_backend of the worker's sessions every 20-40 s, a session holding task rows
# locked past the worker's lock_timeout every 30-90 s, and with RESTARTS=1 a server restart every
# 2-4 minutes (pg_ctlcluster --skip-systemctl-redirect <PG_CLUSTER> restart, PG_CLUSTER default
# "<version> main"). RESTARTS=1 breaks whatever else uses that server: point it at a cluster of
# its own (e.g. pg_createcluster 15 soak -p 5544; PG_CLUSTER="15 soak" and DATABASE_URL on port 5544).
# Not part of CI (and not of bench:smoke): it runs for as long as it is told to.

require "open3"
require "securerandom"
require "uri"
require_relative "bench_helper"

module Soak
  # What a task's context asks of its step, and the status the task must end in.
  KINDS = {
    "success" => "complete",
    "retry" => "complete",         # RetryableError (retry_after 10 ms) on the first attempt
    "timeout_once" => "complete",  # outlives its 0.3 s timeout on the first attempt
    "permanent" => "error",        # PermanentError
    "timeout_always" => "error",   # outlives every attempt's timeout (5 attempts)
    "cancel" => "cancelled"        # 0.1 s, cancelled soon after its creation (`complete` if it finished first)
  }.freeze
  # How often each kind is created (timeout_always ties a thread up for 2.5 s: rare). cancel_task
  # exists on the memory backend only.
  WEIGHTS = { "success" => 10, "retry" => 4, "timeout_once" => 2, "permanent" => 2, "timeout_always" => 1,
              "cancel" => 2 }.freeze
  FINAL = %w[complete error cancelled].freeze

  def self.mix(cancels:)
    WEIGHTS.flat_map { |kind, weight| kind == "cancel" && !cancels ? [] : [kind] * weight }.freeze
  end

  class Poke < StandardError; end

  class Handler < TaskerCore::StepHandler::Base
    # How long the steps of these kinds run on their first attempt (a raise from the soak that lands
    # in it fails the attempt; later attempts are quick).
    FIRST_SLEEPS = { "timeout_once" => 0.5, "cancel" => 0.1 }.freeze

    def call(task, _sequence, step)
      case (kind = task.context.fetch("kind"))
      when "retry"
        raise TaskerCore::RetryableError.new("not yet", retry_after: 0.01) if step.attempts == 1
      when "timeout_once", "cancel"
        sleep FIRST_SLEEPS.fetch(kind) if step.attempts == 1
      when "permanent"
        raise TaskerCore::PermanentError, "never"
      when "timeout_always"
        sleep 0.5
      end
      { "attempt" => step.attempts }
    end
  end

  # BACKEND=postgres: the server, a database of the soak's own, and the faults injected into it.
  class Postgres
    attr_reader :counts

    def initialize(random, restarts:)
      server = URI(ENV.fetch("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"))
      @host = server.host || "127.0.0.1"
      @port = (server.port || 5432).to_s
      @user = server.user || "postgres"
      @db = "tasker_soak_#{SecureRandom.hex(4)}"
      @url = "postgres://#{@user}@#{@host}:#{@port}/#{@db}"
      @random = random
      @restarts = restarts
      @cluster = ENV.fetch("PG_CLUSTER") { "#{Dir.children("/etc/postgresql").max} main" }.split
      @counts = Hash.new(0)
    end

    def describe
      "database #{@db} on #{@host}:#{@port}" + (@restarts ? ", restarting cluster #{@cluster.join(" ")}" : "")
    end

    def config
      { backend: "postgres", database_url: @url }
    end

    def create_database
      psql("CREATE DATABASE #{@db}")
    end

    def drop_database
      psql("DROP DATABASE IF EXISTS #{@db} WITH (FORCE)")
    end

    # Tasks of the soak's database not in a final status (none may be left after the last cycle).
    def unfinished_tasks
      Integer(psql("SELECT count(*) FROM tasker_tasks WHERE status NOT IN ('complete', 'error', 'cancelled')",
                   db: @db))
    end

    def task_count
      Integer(psql("SELECT count(*) FROM tasker_tasks", db: @db))
    end

    # Injects the faults until `stop` is set; every fault (and every failure to inject one) is counted.
    def inject_faults(stop)
      due = { terminate: in_seconds(20..40), lock: in_seconds(30..90) }
      due[:restart] = in_seconds(120..240) if @restarts
      until stop.call
        sleep 0.2
        due.each do |fault, at|
          next if Bench.now < at

          due[fault] = in_seconds({ terminate: 20..40, lock: 30..90, restart: 120..240 }.fetch(fault))
          inject(fault)
        end
      end
    end

    private

    def inject(fault)
      case fault
      when :terminate
        @counts[:sessions_terminated] += Integer(psql(<<~SQL))
          SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
          WHERE datname = '#{@db}' AND application_name LIKE 'tasker %'
        SQL
        @counts[:terminations] += 1
      when :lock then hold_task_rows(@random.rand(2.5..4.0))
      when :restart
        _out, err, status = Open3.capture3("pg_ctlcluster", "--skip-systemctl-redirect", *@cluster, "restart")
        raise "pg_ctlcluster restart failed: #{err}" unless status.success?

        @counts[:restarts] += 1
      end
    rescue StandardError => e
      @counts[:"#{fault}_failed"] += 1
      warn "   fault #{fault} not injected: #{e.message.lines.first&.strip}"
    end

    # Another session locks up to 20 unfinished tasks' rows for `seconds` (the worker's writes to
    # them wait, then give up at its lock_timeout of 2 s, and are retried).
    def hold_task_rows(seconds)
      Open3.popen3(*psql_command(@db), "-At", "-v", "ON_ERROR_STOP=1") do |stdin, stdout, stderr, _wait|
        stdin.puts("BEGIN;", "SELECT count(*) FROM (SELECT 1 FROM tasker_tasks WHERE status NOT IN " \
                             "('complete', 'error', 'cancelled') LIMIT 20 FOR UPDATE) locked;")
        stdin.flush
        # psql echoes BEGIN first; the count follows once the rows are locked.
        line = stdout.gets || raise("psql could not lock: #{stderr.read}") until line&.match?(/\A\d+\Z/)
        sleep seconds
        stdin.puts("ROLLBACK;")
        stdin.close
        @counts[:lock_holds] += 1
        @counts[:rows_locked] += Integer(line)
      end
    end

    def in_seconds(range)
      Bench.now + @random.rand(range)
    end

    def psql_command(db)
      ["psql", "-h", @host, "-p", @port, "-U", @user, "-d", db, "-X"]
    end

    def psql(sql, db: "postgres")
      out, err, status = Open3.capture3(*psql_command(db), "-v", "ON_ERROR_STOP=1", "-Atc", sql)
      raise "psql failed (#{sql.strip}): #{err}" unless status.success?

      out.strip
    end
  end
end

duration = Float(ENV.fetch("DURATION", "3600"))
concurrency = Integer(ENV.fetch("CONCURRENCY", "4"))
backend = ENV.fetch("BACKEND", "memory")
raise ArgumentError, "BACKEND must be memory or postgres, not #{backend.inspect}" unless %w[memory postgres]
                                                                                         .include?(backend)

random = Random.new(Integer(ENV.fetch("SEED", Random.new_seed.to_s)))
postgres = Soak::Postgres.new(random, restarts: ENV["RESTARTS"] == "1") if backend == "postgres"
Bench.header("soak (#{backend}): mixed tasks, Thread#raise into handler threads, bootstrap/stop cycles" +
             (postgres ? ", sessions terminated, rows locked#{", server restarts" if ENV["RESTARTS"] == "1"}" : ""),
             "rake bench:soak BACKEND=#{backend} DURATION=#{duration.to_i}" +
             (ENV["RESTARTS"] == "1" ? " RESTARTS=1" : ""))
puts "   #{postgres.describe}" if postgres
config = { templates: File.expand_path("soak", __dir__), concurrency: concurrency, log_level: "error" }
config.merge!(postgres.config) if postgres
mix = Soak.mix(cancels: true)
worker = TaskerCore::Worker::Bootstrap.instance
totals = Hash.new(0)
samples = []
deadline = Bench.now + duration
# How long a task may take: on PostgreSQL a restart or a lock hold can delay it by seconds.
task_deadline = postgres ? 120 : 60
cycle = 0

# On PostgreSQL any call may meet a dead connection or a restarting server: it raises, and the soak
# tries again (counted) until `seconds` have passed.
with_retries = lambda do |what, seconds, &block|
  give_up = Bench.now + seconds
  begin
    block.call
  rescue TaskerCore::Error => e
    raise if postgres.nil? || Bench.now > give_up

    totals[:"#{what}_retried"] += 1
    # The first few are shown; the totals are printed at the end.
    if totals[:"#{what}_retried"] < 5
      warn "   #{what} failed (#{e.class}: #{e.message.lines.first&.strip}); trying again"
    end
    sleep 0.5
    retry
  end
end

postgres&.create_database
stop_faults = false
faults = postgres && Thread.new { postgres.inject_faults(-> { stop_faults }) }
begin
  while Bench.now < deadline
    cycle += 1
    with_retries.call(:start, 60) { worker.start!(config) }
    pokes = 0
    stop_poking = false
    # Raises into a random handler thread now and then: while it waits for a step, runs one, or sleeps.
    poker = Thread.new do
      until stop_poking
        sleep(random.rand(0.005..0.05))
        target = worker.pool&.threads&.sample(random: random)
        next unless target&.alive?

        target.raise(Soak::Poke, "soak")
        pokes += 1
      end
    end
    kinds = Array.new(random.rand(100..400)) { mix.sample(random: random) }
    uuids = kinds.map do |kind|
      with_retries.call(:create, 60) do
        TaskerCore.create_task(namespace: "soak", name: "mixed", context: { "kind" => kind })
      end
    end
    # Cancels each "cancel" task 0-80 ms after the previous one: some before their step starts, some
    # while it runs, some after it finished (cancel_task answers false then, and the task is complete).
    cancelled = {}
    canceller = Thread.new do
      uuids.zip(kinds).each do |uuid, kind|
        next unless kind == "cancel"

        sleep(random.rand(0.0..0.08))
        cancelled[uuid] = TaskerCore.cancel_task(uuid)
      end
    end
    wrong = 0
    lost = 0
    uuids.zip(kinds).each do |uuid, kind|
      give_up = Bench.now + task_deadline
      final = with_retries.call(:wait, task_deadline) do
        TaskerCore::FFI.wait_for_task(uuid, [give_up - Bench.now, 0].max)
      end
      canceller.join if kind == "cancel" && !cancelled.key?(uuid)
      expected = kind == "cancel" && cancelled[uuid] == false ? "complete" : Soak::KINDS.fetch(kind)
      if final.nil?
        lost += 1
        warn "task #{uuid} (#{kind}) did not finish within #{task_deadline}s"
      elsif final[:status] != expected
        wrong += 1
        warn "task #{uuid} (#{kind}, cancel answered #{cancelled[uuid].inspect}) ended #{final[:status]}: " \
             "#{final[:steps].map { |s| s[:error_message] }}"
      end
    end
    canceller.join
    stop_poking = true
    poker.join
    replacements = worker.pool.replacements
    worker.shutdown!
    totals[:tasks] += uuids.size
    totals[:lost] += lost
    totals[:wrong] += wrong
    totals[:pokes] += pokes
    totals[:replacements] += replacements
    totals[:cancels] += cancelled.size
    totals[:cancels_too_late] += cancelled.count { |_uuid, answer| answer == false }
    samples << [Bench.rss_mb, Dir.children("/proc/self/task").size]
    next unless cycle == 1 || (cycle % 10).zero? || Bench.now >= deadline

    faults_so_far = postgres ? ", faults #{postgres.counts.sort.to_h}" : ""
    puts format("   cycle %4d: %5d tasks so far, lost %d, wrong status %d, raises %d, threads replaced %d, " \
                "cancels %d; RSS %.1f MB, threads %d%s", cycle, totals[:tasks], totals[:lost], totals[:wrong],
                totals[:pokes], totals[:replacements], totals[:cancels], *samples.last, faults_so_far)
  end
ensure
  stop_faults = true
  faults&.join
end

if postgres
  # Nothing may be left unfinished in the database, whatever the calls saw.
  totals[:unfinished_in_database] = postgres.unfinished_tasks
  totals[:tasks_in_database] = postgres.task_count
  postgres.drop_database
end
first_rss, first_threads = samples.first
last_rss, last_threads = samples.last
peak_rss = samples.map(&:first).max
retried = totals.select { |key, _| key.end_with?("_retried") }
puts format("   %d cycles, %d tasks: lost %d, wrong final status %d; %d raises into handler threads, %d threads " \
            "replaced; %d cancels (%d after the task finished); RSS %.1f MB after cycle 1, %.1f MB at the end " \
            "(peak %.1f); threads %d after cycle 1, %d at the end", cycle, totals[:tasks], totals[:lost],
            totals[:wrong], totals[:pokes], totals[:replacements], totals[:cancels], totals[:cancels_too_late],
            first_rss, last_rss, peak_rss, first_threads, last_threads)
if postgres
  puts "   faults: #{postgres.counts.sort.to_h}; calls retried: #{retried}; in the database: " \
       "#{totals[:tasks_in_database]} tasks, #{totals[:unfinished_in_database]} unfinished"
end
exit(totals[:lost].zero? && totals[:wrong].zero? && totals[:unfinished_in_database].zero? ? 0 : 1)
