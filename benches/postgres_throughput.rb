# frozen_string_literal: true

# Steps/s of the PostgreSQL backend: WORKERS worker processes with no-op handlers run TASKS pre-created
# diamond tasks (4 steps each). `rake bench:postgres`, or:
#   TASKS=5000 RUNS=5 WORKERS=2 CONCURRENCY=32 MODE=Hybrid ruby benches/postgres_throughput.rb
# CONCURRENCY (handler threads per worker) also sets how many steps a worker holds claimed at once
# (2x): the batch size of its claim and record transactions, which is what bounds throughput here.
# PGHOST/PGPORT/PGUSER (default 127.0.0.1:5432, postgres) name the server; every run uses a fresh database.
# BENCH_SMOKE=1: 200 tasks, one run.
#
# A run: CREATORS processes (bootstrapped on a namespace nobody runs, so they claim nothing) create the
# tasks with TaskerCore.create_task, or with create_tasks CREATE_BATCH at a time (CREATE_BATCH=500);
# then the workers start. The clock runs from the first handler call
# (any worker) to the last task's finished_at in the database, so process and bootstrap start-up are
# not counted. Prints each run and the median.

require "json"
require "open3"
require "rbconfig"
require "securerandom"
require "tmpdir"
require_relative "bench_helper"

module PostgresThroughput
  LIB = File.expand_path("../lib", __dir__)
  HOST = ENV.fetch("PGHOST", "127.0.0.1")
  PORT = ENV.fetch("PGPORT", "5432")
  USER = ENV.fetch("PGUSER", "postgres")
  TASKS = Integer(ENV.fetch("TASKS", Bench.size(5000, 200).to_s))
  RUNS = Bench::RUNS
  WORKERS = Integer(ENV.fetch("WORKERS", "2"))
  CONCURRENCY = Integer(ENV.fetch("CONCURRENCY", "32"))
  CREATORS = Integer(ENV.fetch("CREATORS", "4"))
  # Tasks per create_tasks call in the creator processes (1: one create_task call per task).
  CREATE_BATCH = Integer(ENV.fetch("CREATE_BATCH", "1"))
  MODE = ENV.fetch("MODE", "Hybrid")
  STEPS_PER_TASK = 4

  TEMPLATE = <<~YAML
    namespace: bench
    name: diamond
    version: 1.0.0
    steps:
      - { name: start, handler: { callable: BenchNoop } }
      - { name: left, dependencies: [start], handler: { callable: BenchNoop } }
      - { name: right, dependencies: [start], handler: { callable: BenchNoop } }
      - { name: join, dependencies: [left, right], handler: { callable: BenchNoop } }
  YAML

  # Creates ARGV[0] tasks, then exits. Bootstrapped on a namespace with no tasks: it claims nothing.
  CREATOR = <<~RUBY
    require "tasker_core"
    TaskerCore::Worker::Bootstrap.start!(backend: "postgres", database_url: ENV.fetch("BENCH_URL"),
                                         templates: ENV.fetch("BENCH_TEMPLATES"), namespaces: ["bench_creator"],
                                         log_level: "error")
    count = Integer(ARGV[0])
    batch = Integer(ENV.fetch("BENCH_BATCH"))
    if batch <= 1
      count.times { TaskerCore.create_task(namespace: "bench", name: "diamond", context: {}) }
    else
      count.times.each_slice(batch) do |slice|
        TaskerCore.create_tasks(namespace: "bench", name: "diamond", contexts: Array.new(slice.size) { {} })
      end
    end
  RUBY

  # Runs steps until its stdin closes; then prints {first_call:, steps:} (first_call in epoch seconds).
  WORKER = <<~RUBY
    require "tasker_core"
    require "json"
    class BenchNoop < TaskerCore::StepHandler::Base
      FIRST = []
      def call(_task, _sequence, _step)
        FIRST << Time.now.to_f if FIRST.empty?
        {}
      end
    end
    TaskerCore::Worker::Bootstrap.start!(backend: "postgres", database_url: ENV.fetch("BENCH_URL"),
                                         templates: ENV.fetch("BENCH_TEMPLATES"), namespaces: ["bench"],
                                         concurrency: Integer(ENV.fetch("BENCH_CONCURRENCY")),
                                         deployment_mode: ENV.fetch("BENCH_MODE"), log_level: "error")
    $stdout.puts "ready"
    $stdout.flush
    $stdin.read
    status = TaskerCore::Worker::Bootstrap.instance.status
    TaskerCore::Worker::Bootstrap.instance.shutdown!
    $stdout.puts JSON.generate(first_call: BenchNoop::FIRST.first, steps: status[:steps_processed])
  RUBY

  module_function

  def psql(sql, db: "postgres")
    out, err, status = Open3.capture3("psql", "-h", HOST, "-p", PORT, "-U", USER, "-d", db, "-v", "ON_ERROR_STOP=1",
                                      "-Atc", sql)
    raise "psql failed (#{sql}): #{err}" unless status.success?

    out.strip
  end

  def url(db)
    "postgres://#{USER}@#{HOST}:#{PORT}/#{db}"
  end

  def now
    Bench.now
  end

  def ruby_child(code, env, *args)
    Open3.popen3(env, RbConfig.ruby, "-I", LIB, "-e", code, *args.map(&:to_s))
  end

  # @return [Float] seconds to create TASKS tasks with CREATORS processes
  def create_tasks(env)
    started = now
    per = Array.new(CREATORS) { |i| (TASKS / CREATORS) + (i < TASKS % CREATORS ? 1 : 0) }
    children = per.map { |n| ruby_child(CREATOR, env, n) }
    children.each do |stdin, stdout, stderr, wait|
      stdin.close
      stdout.read
      err = stderr.read
      raise "task creator failed: #{err}" unless wait.value.success?
    end
    now - started
  end

  def start_workers(env)
    workers = Array.new(WORKERS) { ruby_child(WORKER, env) }
    workers.each do |_stdin, stdout, stderr, _wait|
      line = stdout.gets
      raise "worker did not start: #{stderr.read}" unless line&.strip == "ready"
    end
    workers
  end

  def stop_workers(workers)
    workers.map do |stdin, stdout, stderr, wait|
      stdin.close
      out = stdout.read
      raise "worker failed: #{stderr.read}" unless wait.value.success?

      JSON.parse(out.lines.last)
    end
  end

  def wait_until_done(db, workers, timeout: 300)
    deadline = now + timeout
    loop do
      left = Integer(psql("SELECT count(*) FROM tasker_tasks WHERE status <> 'complete'", db: db))
      return if left.zero?
      raise "#{left} tasks still unfinished after #{timeout}s" if now > deadline

      dead = workers.map(&:last).reject(&:alive?)
      raise "a worker exited early: #{dead.map(&:value).inspect}" unless dead.empty?

      sleep 0.2
    end
  end

  def run_once(index, templates)
    db = "tasker_bench_#{SecureRandom.hex(4)}"
    psql("CREATE DATABASE #{db}")
    env = { "BENCH_URL" => url(db), "BENCH_TEMPLATES" => templates, "BENCH_CONCURRENCY" => CONCURRENCY.to_s,
            "BENCH_BATCH" => CREATE_BATCH.to_s,
            "BENCH_MODE" => MODE, "TASKER_LOG_LEVEL" => "error" }
    create_seconds = create_tasks(env)
    workers = start_workers(env)
    wait_until_done(db, workers)
    last_finish = Float(psql("SELECT extract(epoch FROM max(finished_at)) FROM tasker_tasks", db: db))
    reports = stop_workers(workers)
    measure(index, db, create_seconds, last_finish, reports)
  ensure
    psql("DROP DATABASE IF EXISTS #{db} WITH (FORCE)") if db
  end

  def measure(index, db, create_seconds, last_finish, reports)
    steps = TASKS * STEPS_PER_TASK
    complete = Integer(psql("SELECT count(*) FROM tasker_steps WHERE status = 'complete' AND attempts = 1", db: db))
    raise "only #{complete} of #{steps} steps complete at their first attempt" unless complete == steps

    elapsed = last_finish - reports.map { |r| r.fetch("first_call") }.compact.min
    rate = steps / elapsed
    split = reports.map { |r| r.fetch("steps") }.join("/")
    puts format("run %<i>d: %<s>d steps in %<e>.2fs = %<r>.0f steps/s (per worker %<w>s; created %<n>d tasks in " \
                "%<c>.1fs)", i: index + 1, s: steps, e: elapsed, r: rate, w: split, n: TASKS, c: create_seconds)
    $stdout.flush
    rate
  end

  def main
    Bench.header("postgres throughput", "rake bench:postgres")
    puts "   #{TASKS} diamond tasks (#{TASKS * STEPS_PER_TASK} steps), #{WORKERS} worker processes x " \
         "#{CONCURRENCY} handler threads, #{MODE}, no-op handlers, #{RUNS} runs"
    Dir.mktmpdir("tasker_bench") do |dir|
      File.write(File.join(dir, "diamond.yml"), TEMPLATE)
      rates = Array.new(RUNS) { |i| run_once(i, dir) }
      puts format("median: %<m>.0f steps/s (runs: %<r>s)", m: Bench.median(rates), r: rates.map(&:round).join(", "))
    end
  end
end

PostgresThroughput.main if $PROGRAM_NAME == __FILE__
