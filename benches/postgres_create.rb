# frozen_string_literal: true

# create_task on PostgreSQL as an app calls it: single-step tasks created one at a time, from
# THREADS (default "1,8") client threads of one process, each call returning once its task is
# committed. `rake bench:postgres_create`, or:
#   SECONDS_PER_RUN=3 RUNS=5 THREADS=1,8 ruby benches/postgres_create.rb
# PGHOST/PGPORT/PGUSER (default 127.0.0.1:5432, postgres) name the server; the benchmark uses a fresh
# database and drops it. The process's worker runs a namespace without tasks, so nothing claims the
# tasks: the figure is creation alone. After the runs, the database must hold exactly the tasks the
# calls returned (a uuid returned is a task committed).
require "open3"
require "securerandom"
require_relative "bench_helper"

host = ENV.fetch("PGHOST", "127.0.0.1")
port = ENV.fetch("PGPORT", "5432")
user = ENV.fetch("PGUSER", "postgres")
seconds = Float(ENV.fetch("SECONDS_PER_RUN", Bench.size(3, 0.3).to_s))
thread_counts = ENV.fetch("THREADS", "1,8").split(",").map { |t| Integer(t) }
db = "tasker_bench_create_#{SecureRandom.hex(4)}"
psql = lambda do |sql, database = "postgres"|
  out, err, status = Open3.capture3("psql", "-h", host, "-p", port, "-U", user, "-d", database, "-X", "-v",
                                    "ON_ERROR_STOP=1", "-Atc", sql)
  raise "psql failed (#{sql}): #{err}" unless status.success?

  out.strip
end

Bench.header("create_task on PostgreSQL, single-step tasks one call at a time (#{thread_counts.join(", ")} threads)",
             "rake bench:postgres_create SECONDS_PER_RUN=#{seconds} RUNS=#{Bench::RUNS}")
psql.call("CREATE DATABASE #{db}")
created = 0
begin
  TaskerCore::Worker::Bootstrap.start!(backend: "postgres", database_url: "postgres://#{user}@#{host}:#{port}/#{db}",
                                       templates: File.expand_path("templates", __dir__), namespaces: ["nobody"],
                                       log_level: "error", install_signal_handlers: false)
  thread_counts.each do |threads|
    rates = Array.new(Bench::RUNS) do
      deadline = Bench.now + seconds
      started = Bench.now
      counts = Array.new(threads) do
        Thread.new do
          n = 0
          while Bench.now < deadline
            TaskerCore.create_task(namespace: "bench", name: "single", context: { "n" => n })
            n += 1
          end
          n
        end
      end.map(&:value)
      created += counts.sum
      counts.sum / (Bench.now - started)
    end
    runs = rates.map { |rate| rate.round.to_s }.join(", ")
    puts format("   %<t>2d thread%<s>s: median %<m>8.0f tasks/s (runs: %<r>s)",
                t: threads, s: threads == 1 ? " " : "s", m: Bench.median(rates), r: runs)
  end
ensure
  TaskerCore::Worker::Bootstrap.instance.shutdown!
  in_database = Integer(psql.call("SELECT count(*) FROM tasker_tasks", db))
  psql.call("DROP DATABASE IF EXISTS #{db} WITH (FORCE)")
end
puts "   #{created} tasks created, #{in_database} in the database"
exit(created == in_database ? 0 : 1)
