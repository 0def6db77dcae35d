# frozen_string_literal: true

# Soak: mixed tasks (successes, retries, timeouts, permanent failures) for DURATION seconds (default
# 3600) on the memory backend, with Thread#raise into random handler threads and a bootstrap/stop
# cycle every few seconds. Checks that no task is lost or left unfinished and that every final
# status is the one its kind must end in; prints RSS and thread count per cycle (they must stay flat).
#   rake bench:soak            DURATION=300 CONCURRENCY=4
# Not part of CI (and not of bench:smoke): it runs for as long as it is told to.

require_relative "bench_helper"

module Soak
  # What a task's context asks of its step, and the status the task must end in.
  KINDS = {
    "success" => "complete",
    "retry" => "complete",         # RetryableError (retry_after 10 ms) on the first attempt
    "timeout_once" => "complete",  # outlives its 0.3 s timeout on the first attempt
    "permanent" => "error",        # PermanentError
    "timeout_always" => "error"    # outlives every attempt's timeout (5 attempts)
  }.freeze
  # How often each kind is created (timeout_always ties a thread up for 2.5 s: rare).
  MIX = { "success" => 10, "retry" => 4, "timeout_once" => 2, "permanent" => 2, "timeout_always" => 1 }
        .flat_map { |kind, weight| [kind] * weight }.freeze

  class Poke < StandardError; end

  class Handler < TaskerCore::StepHandler::Base
    def call(task, _sequence, step)
      case task.context.fetch("kind")
      when "retry"
        raise TaskerCore::RetryableError.new("not yet", retry_after: 0.01) if step.attempts == 1
      when "timeout_once"
        sleep 0.5 if step.attempts == 1
      when "permanent"
        raise TaskerCore::PermanentError, "never"
      when "timeout_always"
        sleep 0.5
      end
      { "attempt" => step.attempts }
    end
  end
end

duration = Float(ENV.fetch("DURATION", "3600"))
concurrency = Integer(ENV.fetch("CONCURRENCY", "4"))
Bench.header("soak: mixed tasks, Thread#raise into handler threads, bootstrap/stop cycles",
             "rake bench:soak DURATION=#{duration.to_i}")
config = { templates: File.expand_path("soak", __dir__), concurrency: concurrency, log_level: "error" }
worker = TaskerCore::Worker::Bootstrap.instance
random = Random.new(Integer(ENV.fetch("SEED", Random.new_seed.to_s)))
totals = Hash.new(0)
samples = []
deadline = Bench.now + duration
cycle = 0

while Bench.now < deadline
  cycle += 1
  worker.start!(config)
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
  kinds = Array.new(random.rand(100..400)) { Soak::MIX.sample(random: random) }
  uuids = kinds.map { |kind| TaskerCore.create_task(namespace: "soak", name: "mixed", context: { "kind" => kind }) }
  wrong = 0
  lost = 0
  uuids.zip(kinds).each do |uuid, kind|
    final = TaskerCore::FFI.wait_for_task(uuid, 60)
    if final.nil?
      lost += 1
    elsif final[:status] != Soak::KINDS.fetch(kind)
      wrong += 1
      warn "task #{uuid} (#{kind}) ended #{final[:status]}: #{final[:steps].map { |s| s[:error_message] }}"
    end
  end
  stop_poking = true
  poker.join
  replacements = worker.pool.replacements
  worker.shutdown!
  totals[:tasks] += uuids.size
  totals[:lost] += lost
  totals[:wrong] += wrong
  totals[:pokes] += pokes
  totals[:replacements] += replacements
  samples << [Bench.rss_mb, Dir.children("/proc/self/task").size]
  next unless cycle == 1 || (cycle % 10).zero? || Bench.now >= deadline

  puts format("   cycle %4d: %5d tasks so far, lost %d, wrong status %d, raises %d, threads replaced %d; " \
              "RSS %.1f MB, threads %d", cycle, totals[:tasks], totals[:lost], totals[:wrong], totals[:pokes],
              totals[:replacements], *samples.last)
end

first_rss, first_threads = samples.first
last_rss, last_threads = samples.last
peak_rss = samples.map(&:first).max
puts format("   %d cycles, %d tasks: lost %d, wrong final status %d; %d raises into handler threads, %d threads " \
            "replaced; RSS %.1f MB after cycle 1, %.1f MB at the end (peak %.1f); threads %d after cycle 1, %d at " \
            "the end", cycle, totals[:tasks], totals[:lost], totals[:wrong], totals[:pokes], totals[:replacements],
            first_rss, last_rss, peak_rss, first_threads, last_threads)
exit(totals[:lost].zero? && totals[:wrong].zero? ? 0 : 1)
