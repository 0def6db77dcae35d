# frozen_string_literal: true

# The task API, per call and per task, on the memory backend, beside Sidekiq's no-op jobs/s in
# the same run:
# - create_task, task_status (finished task), wait_for_task (finished task): p50/p99 per call;
# - single-step no-op tasks/s, concurrency 4, tasks created one by one with create_task from
#   several client threads and awaited with wait_for_task;
# - the same in bulk: create_tasks + wait_for_tasks;
# - Sidekiq (Debian's ruby-sidekiq, local Redis, concurrency 10): no-op jobs/s, when installed.
#   rake bench:api            (CLIENTS= client threads, default 4; CONCURRENCY= handler threads,
#                              default 4; SIDEKIQ=0 skips Sidekiq)

require_relative "bench_helper"

module ApiBench
  CONCURRENCY = Integer(ENV.fetch("CONCURRENCY", "4"))
  CLIENTS = Integer(ENV.fetch("CLIENTS", "4"))
  TASK = { namespace: "bench", name: "single" }.freeze

  module_function

  # Per-call latency of `call`, in ns, over `calls` calls.
  def latencies(calls)
    Array.new(calls) do
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC, :nanosecond)
      yield
      Process.clock_gettime(Process::CLOCK_MONOTONIC, :nanosecond) - started
    end
  end

  def per_call(calls)
    finished = TaskerCore.create_task(**TASK)
    TaskerCore.wait_for_task(finished, timeout: 60)
    figures = {
      # While the worker runs the tasks created: the caller's cost, not the task's.
      "create_task" => latencies(calls) { TaskerCore.create_task(**TASK) },
      "task_status (finished task)" => latencies(calls) { TaskerCore.task_status(finished) },
      "wait_for_task (finished task)" => latencies(calls) { TaskerCore.wait_for_task(finished, timeout: 60) }
    }
    drain
    figures
  end

  # Wait until every task created so far has finished (the per-call run leaves some running).
  def drain
    deadline = Bench.now + 120
    sleep 0.01 until TaskerCore::FFI.worker_status[:steps_in_flight].zero? || Bench.now > deadline
  end

  # Tasks created one at a time by CLIENTS threads, each then waiting for its own: tasks/s from the
  # first creation to the last task's end.
  def one_by_one(tasks)
    share = tasks / CLIENTS
    started = Bench.now
    CLIENTS.times.map do
      Thread.new do
        uuids = Array.new(share) { TaskerCore.create_task(**TASK) }
        uuids.each { |uuid| TaskerCore.wait_for_task(uuid, timeout: 600) }
      end
    end.each(&:join)
    share * CLIENTS / (Bench.now - started)
  end

  # Each of CLIENTS threads creates a task and waits for it before creating the next: tasks/s.
  def closed_loop(tasks)
    share = tasks / CLIENTS
    started = Bench.now
    CLIENTS.times.map do
      Thread.new { share.times { TaskerCore.wait_for_task(TaskerCore.create_task(**TASK), timeout: 600) } }
    end.each(&:join)
    share * CLIENTS / (Bench.now - started)
  end

  # create_tasks in batches of `batch`, then one wait for them all: tasks/s.
  def bulk(tasks, batch)
    started = Bench.now
    uuids = (tasks / batch).times.flat_map do
      TaskerCore.create_tasks(**TASK, contexts: Array.new(batch) { {} })
    end
    if TaskerCore.respond_to?(:wait_for_tasks)
      TaskerCore.wait_for_tasks(uuids, timeout: 600)
    else
      uuids.each { |uuid| TaskerCore.wait_for_task(uuid, timeout: 600) }
    end
    uuids.size / (Bench.now - started)
  end

  def report_rates(label, rates, unit = "tasks/s")
    puts format("   %-58s median %8d %s  runs: %s", label, Bench.median(rates), unit, rates.map(&:round).join(", "))
    Bench.median(rates)
  end
end

# Sidekiq's no-op jobs/s: jobs pushed in bulk into an empty queue of a dedicated Redis database, then
# a Sidekiq server (concurrency 10) started; timed from the first job taken to the queue's end.
module SidekiqBaseline
  REDIS_URL = ENV.fetch("SIDEKIQ_REDIS_URL", "redis://127.0.0.1:6379/15")
  QUEUE = "tasker_bench"

  module_function

  # @return [String, nil] why Sidekiq cannot run here, or nil
  def unavailable
    return "skipped (SIDEKIQ=0)" if ENV["SIDEKIQ"] == "0"

    begin
      require "sidekiq"
      require "sidekiq/api"
    rescue LoadError
      return "not installed (apt-get install ruby-sidekiq)"
    end
    return "no sidekiq executable on PATH" unless system("command -v sidekiq >/dev/null 2>&1")

    ENV["REDIS_URL"] = REDIS_URL
    # redis-rb 4.8 warns about a Redis 5 change on every bulk push.
    Redis.silence_deprecations = true if Redis.respond_to?(:silence_deprecations=)
    Sidekiq.configure_client { |config| config.redis = { url: REDIS_URL } }
    Sidekiq.redis(&:ping)
    nil
  rescue StandardError => e
    "Redis unreachable at #{REDIS_URL} (#{e.class}: #{e.message})"
  end

  def queue_length
    Sidekiq.redis { |redis| redis.llen("queue:#{QUEUE}") }
  end

  def jobs_per_second(jobs)
    Sidekiq.redis { |redis| redis.del("queue:#{QUEUE}") }
    (jobs / 1000.0).ceil.times do
      Sidekiq::Client.push_bulk("class" => "TaskerBenchNoopJob", "queue" => QUEUE, "args" => Array.new(1000) { [] })
    end
    pushed = queue_length
    server = Process.spawn({ "REDIS_URL" => REDIS_URL }, "sidekiq", "-c", "10", "-q", QUEUE,
                           "-r", File.expand_path("sidekiq_noop.rb", __dir__), %i[out err] => File::NULL)
    sleep 0.001 while queue_length == pushed
    started = Bench.now
    taken_at_start = pushed - queue_length
    sleep 0.001 while queue_length.positive?
    (pushed - taken_at_start) / (Bench.now - started)
  ensure
    if server
      Process.kill("TERM", server)
      Process.wait(server)
    end
  end
end

if $PROGRAM_NAME == __FILE__
  Bench.header("task API: per call, and single-step tasks/s beside Sidekiq", "rake bench:api")
  calls = Bench.size(20_000, 200)
  tasks = Bench.size(40_000, 400)
  Bench.start_worker(concurrency: ApiBench::CONCURRENCY, task_retention: 100_000)
  ApiBench.one_by_one([tasks / 10, ApiBench::CLIENTS].max) # warm-up

  puts "   per call (memory backend, concurrency #{ApiBench::CONCURRENCY}, one caller):"
  per_call = Array.new(Bench::RUNS) { ApiBench.per_call(calls) }
  per_call.first.each_key do |name|
    p50s = per_call.map { |run| Bench.percentile(run[name], 50) }
    p99s = per_call.map { |run| Bench.percentile(run[name], 99) }
    puts format("   %-32s p50 %s  p99 %s  (medians of %d runs of %d calls)", name, Bench.fmt_us(Bench.median(p50s)),
                Bench.fmt_us(Bench.median(p99s)), Bench::RUNS, calls)
  end

  puts "   single-step no-op tasks, concurrency #{ApiBench::CONCURRENCY}, #{ApiBench::CLIENTS} client threads:"
  single = ApiBench.report_rates("create_task one by one, then wait_for_task each",
                                 Array.new(Bench::RUNS) { ApiBench.one_by_one(tasks) })
  ApiBench.report_rates("create_task + wait_for_task, one task at a time per client",
                        Array.new(Bench::RUNS) { ApiBench.closed_loop(tasks / 4) })
  ApiBench.report_rates("create_tasks (batches of 1,000) + wait_for_tasks",
                        Array.new(Bench::RUNS) { ApiBench.bulk(tasks * 2, Bench.size(1000, 100)) })
  Bench.stop_worker

  why_not = SidekiqBaseline.unavailable
  if why_not
    puts "   Sidekiq: #{why_not}; no ratio"
  else
    jobs = Bench.size(50_000, 1_000)
    sidekiq = Array.new(Bench::RUNS) { SidekiqBaseline.jobs_per_second(jobs) }
    median = ApiBench.report_rates("Sidekiq #{Sidekiq::VERSION}, no-op jobs, concurrency 10, local Redis", sidekiq,
                                   "jobs/s")
    puts format("   ratio: single-step tasks/s (one by one) / Sidekiq jobs/s = %.2fx", single / median)
  end
end
