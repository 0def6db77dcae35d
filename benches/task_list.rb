# frozen_string_literal: true

# Task lists and scrapes against a big PostgreSQL table: TASKS (default 1,000,000) finished and
# pending tasks are inserted straight into a fresh database with SQL (creating them through the
# engine would take the benchmark's whole budget), then each request shape is timed:
# `TaskerCore.tasks` pages (first page, 20 pages deep by cursor, by status, by namespace and name,
# created_after), `GET /api/tasks`, `GET /api/tasks/:uuid` and `GET /metrics`.
#   rake bench:task_list      TASKS=1000000 REQUESTS=50
# PGHOST/PGPORT/PGUSER (default 127.0.0.1:5432, postgres). BENCH_SMOKE=1: 20,000 tasks, 5 requests.

require "json"
require "net/http"
require "open3"
require "securerandom"
require_relative "bench_helper"

module TaskListBench
  HOST = ENV.fetch("PGHOST", "127.0.0.1")
  PORT = ENV.fetch("PGPORT", "5432")
  USER = ENV.fetch("PGUSER", "postgres")
  TASKS = Integer(ENV.fetch("TASKS", Bench.size(1_000_000, 20_000).to_s))
  REQUESTS = Integer(ENV.fetch("REQUESTS", Bench.size(50, 5).to_s))

  module_function

  def psql(sql, db: "postgres")
    out, err, status = Open3.capture3("psql", "-h", HOST, "-p", PORT, "-U", USER, "-d", db, "-X",
                                      "-v", "ON_ERROR_STOP=1", "-Atc", sql)
    raise "psql failed (#{sql[0, 80]}): #{err}" unless status.success?

    out.strip
  end

  # 10 namespaces x 10 templates; 1 in 20 errored, 1 in 50 pending, the rest complete; one a second
  # apart going back from now (created_at), as a busy system's history looks.
  def fill(db)
    psql(<<~SQL, db: db)
      INSERT INTO tasker_tasks (task_uuid, namespace, name, version, context, status, incomplete_steps,
                                created_at, finished_at)
      SELECT gen_random_uuid(), 'ns' || (i % 10), 'template' || (i % 100 / 10), '1.0.0', '{}'::jsonb,
             CASE WHEN i % 20 = 0 THEN 'error' WHEN i % 50 = 1 THEN 'pending' ELSE 'complete' END,
             CASE WHEN i % 50 = 1 THEN 1 ELSE 0 END,
             now() - make_interval(secs => i), CASE WHEN i % 50 = 1 THEN NULL ELSE now() - make_interval(secs => i - 1) END
      FROM generate_series(1, #{TASKS}) AS i;
    SQL
    # As autovacuum leaves a settled table: statistics, and a visibility map for index-only scans.
    psql("VACUUM ANALYZE tasker_tasks", db: db)
  end

  def time_ms(count = REQUESTS)
    Array.new(count) do
      started = Bench.now
      yield
      (Bench.now - started) * 1000
    end
  end

  def report(name, times)
    puts format("   %-44s median %7.2f ms  p99 %7.2f ms  max %7.2f ms", name, Bench.median(times),
                Bench.percentile(times, 99), times.max)
  end

  def deep_cursor(pages)
    cursor = nil
    pages.times { cursor = TaskerCore.tasks(limit: 50, cursor: cursor)[:next_cursor] }
    cursor
  end

  def run
    Bench.header("task lists over #{TASKS} PostgreSQL tasks", "rake bench:task_list")
    db = "tasker_bench_#{SecureRandom.hex(4)}"
    psql("CREATE DATABASE #{db}")
    url = "postgres://#{USER}@#{HOST}:#{PORT}/#{db}"
    # A namespace nobody has tasks in: this process runs no step, it only reads.
    Bench.start_worker(backend: "postgres", database_url: url, namespaces: ["bench_reader"],
                       enable_web_api: true, web_api_bind: "127.0.0.1:0")
    started = Bench.now
    fill(db)
    puts format("   filled in %.1f s", Bench.now - started)
    measure(TaskerCore::FFI.worker_status.fetch(:web_api_bind))
  ensure
    Bench.stop_worker
    psql("DROP DATABASE IF EXISTS #{db} WITH (FORCE)") if db
  end

  def measure(address)
    host, port = address.split(":")
    http = Net::HTTP.start(host, Integer(port))
    shapes(http).each { |name, request| report(name, time_ms(&request)) }
  ensure
    http&.finish
  end

  # name => the request it times
  def shapes(http)
    cursor = deep_cursor(20)
    some_uuid = TaskerCore.tasks(status: "error", limit: 1)[:tasks].first[:task_uuid]
    an_hour_ago = Time.now - 3600
    { "TaskerCore.tasks first page (50)" => -> { TaskerCore.tasks },
      "TaskerCore.tasks page 21 by cursor" => -> { TaskerCore.tasks(cursor: cursor) },
      "TaskerCore.tasks status: error" => -> { TaskerCore.tasks(status: "error") },
      "TaskerCore.tasks namespace + name" => -> { TaskerCore.tasks(namespace: "ns3", name: "template7") },
      "TaskerCore.tasks created_after: 1 h ago" => -> { TaskerCore.tasks(created_after: an_hour_ago) },
      "GET /api/tasks?status=pending" => -> { http.get("/api/tasks?status=pending").body },
      "GET /api/tasks?cursor=(page 21)" => -> { http.get("/api/tasks?cursor=#{cursor}").body },
      "GET /api/tasks/:uuid" => -> { http.get("/api/tasks/#{some_uuid}").body },
      "GET /metrics (first one counts every task)" => -> { http.get("/metrics").body } }
  end
end

TaskListBench.run
