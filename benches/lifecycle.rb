# frozen_string_literal: true

# Bootstrap time (Bootstrap.start!: engine thread, templates, handler threads) and idle shutdown
# time (Bootstrap#shutdown! with nothing in flight).
#   rake bench:lifecycle

require_relative "bench_helper"

cycles = Bench.size(50, 3)
Bench.header("bootstrap and idle shutdown", "rake bench:lifecycle")
per_run = Array.new(Bench::RUNS) do
  boots = []
  stops = []
  cycles.times do
    started = Bench.now
    Bench.start_worker(concurrency: 4)
    boots << (Bench.now - started)
    started = Bench.now
    Bench.stop_worker
    stops << (Bench.now - started)
  end
  [Bench.median(boots), Bench.median(stops)]
end
puts format("   bootstrap: median %.2f ms   idle shutdown: median %.2f ms   (median of %d runs x %d cycles)",
            Bench.median(per_run.map(&:first)) * 1000, Bench.median(per_run.map(&:last)) * 1000,
            per_run.size, cycles)
