# frozen_string_literal: true

# Shared by the benchmarks: statistics, machine facts, the no-op handlers.
# Benchmarks are not tests: they print numbers; nothing here asserts a time.

$LOAD_PATH.unshift(File.expand_path("../lib", __dir__))
require "tasker_core"
require "etc"

module Bench
  TEMPLATES = File.expand_path("templates", __dir__)
  # BENCH_SMOKE=1: tiny sizes, so CI can check the benchmarks still run.
  SMOKE = ENV["BENCH_SMOKE"] == "1"
  RUNS = Integer(ENV.fetch("RUNS", SMOKE ? "1" : "5"))

  class Noop < TaskerCore::StepHandler::Base
    def call(_task, _sequence, _step)
      {}
    end
  end

  # Notes when it is entered (dispatch_latency.rb). Defined here with Noop so that every handler the
  # bench templates name exists in every benchmark: Bootstrap.start! checks them all.
  class Probe < TaskerCore::StepHandler::Base
    @entered = {} # step_uuid => CLOCK_REALTIME ns
    class << self
      attr_reader :entered
    end

    def call(_task, _sequence, step)
      Probe.entered[step.step_uuid] = Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond)
      {}
    end
  end

  module_function

  def size(full, smoke)
    SMOKE ? smoke : full
  end

  def now
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  def median(values)
    sorted = values.sort
    mid = sorted.size / 2
    sorted.size.odd? ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2.0
  end

  def percentile(values, pct)
    sorted = values.sort
    sorted[((sorted.size - 1) * pct / 100.0).round]
  end

  def rss_mb
    File.read("/proc/self/status")[/VmRSS:\s+(\d+)/, 1].to_i / 1024.0
  end

  def machine
    rustc = `rustc --version 2>/dev/null`.strip
    rustc = "rustc ?" if rustc.empty?
    "#{Etc.nprocessors} cores, Ruby #{RUBY_VERSION}, #{rustc}, #{Time.now.utc.strftime("%F")}"
  end

  def header(name, command)
    puts "== #{name}  (#{machine})"
    puts "   command: #{command}#{"  [smoke run: sizes reduced]" if SMOKE}"
  end

  def start_worker(**config)
    TaskerCore::Worker::Bootstrap.start!({ templates: TEMPLATES, log_level: "error" }.merge(config))
  end

  def stop_worker
    TaskerCore::Worker::Bootstrap.instance.shutdown!
  end

  def fmt_us(nanos)
    format("%.1f µs", nanos / 1000.0)
  end
end
