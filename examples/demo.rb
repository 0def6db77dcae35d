# frozen_string_literal: true

# The main job: many order-fulfillment workflows on the embedded engine, a progress bar while
# they run, then throughput and per-step latency.
#
#   rake demo                      # 10,000 orders (50,000 steps), concurrency 4
#   TASKS=50000 CONCURRENCY=2 rake demo

# Run from a checkout (`rake demo` or `ruby examples/demo.rb`): load this tree's lib, with the
# extension `rake compile` built there, whether or not the gem is installed.
$LOAD_PATH.unshift(File.expand_path("../lib", __dir__))
require "tasker_core"

# The handlers: small, real computations over the order in the task's context.
module Fulfillment
  class ValidateOrder < TaskerCore::StepHandler::Base
    def call(task, _sequence, _step)
      items = task.context.fetch("items")
      raise TaskerCore::PermanentError, "too many items" if items.size > config.fetch("max_items")

      total = items.sum { |item| item["price_cents"] * item["quantity"] }
      { "total_cents" => total, "item_count" => items.size }
    end
  end

  class ReserveInventory < TaskerCore::StepHandler::Base
    def call(task, _sequence, _step)
      { "reserved" => task.context.fetch("items").map { |item| item["sku"] } }
    end
  end

  class ChargePayment < TaskerCore::StepHandler::Base
    def call(task, sequence, _step)
      total = sequence.dependency_result(:validate_order).fetch("total_cents")
      { "charge_id" => "ch_#{task.task_uuid[0, 8]}", "amount_cents" => total }
    end
  end

  class ShipOrder < TaskerCore::StepHandler::Base
    def call(_task, sequence, _step)
      charge = sequence.dependency_result(:charge_payment)
      skus = sequence.dependency_result(:reserve_inventory).fetch("reserved")
      success(result: { "tracking" => "TRK#{charge["charge_id"][3..]}", "parcels" => skus.size },
              metadata: { "carrier" => "demo" })
    end
  end

  class SendConfirmation < TaskerCore::StepHandler::Base
    def call(_task, sequence, _step)
      { "sent" => true, "tracking" => sequence.dependency_result(:ship_order).fetch("tracking") }
    end
  end
end

# Draws a one-line bar from worker_status, on its own thread. Redrawn in place on a terminal; in a
# log (CI, a pipe) only the final state is written, once.
class ProgressBar
  WIDTH = 40

  def initialize(total_steps, out: $stdout)
    @total = total_steps
    @out = out
    @started = now
  end

  def start
    return unless @out.tty?

    @thread = Thread.new do
      loop do
        draw(TaskerCore::FFI.worker_status[:steps_processed])
        sleep 0.1
      end
    end
  end

  def finish(done)
    @thread&.kill
    draw(done)
    @out.puts
  end

  private

  def draw(done)
    fraction = [done.to_f / @total, 1.0].min
    filled = (fraction * WIDTH).round
    rate = done / [now - @started, 1e-9].max
    @out.print "\r" if @out.tty?
    @out.print format("[%-#{WIDTH}s] %3d%%  %d/%d steps  %d steps/s", "#" * filled, fraction * 100, done, @total,
                      rate)
    @out.flush
  end

  def now
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end
end

def percentile(sorted, pct)
  return 0 if sorted.empty?

  sorted[((sorted.size - 1) * pct / 100.0).round]
end

def order_context(index)
  items = Array.new(1 + (index % 4)) do |i|
    { "sku" => "SKU-#{((index * 7) + i) % 1000}", "price_cents" => 499 + (i * 250), "quantity" => 1 + (i % 3) }
  end
  { "order_id" => index, "customer" => "customer-#{index % 500}", "items" => items }
end

tasks = Integer(ENV.fetch("TASKS", "10000"))
concurrency = Integer(ENV.fetch("CONCURRENCY", "4"))
steps_per_task = 5

TaskerCore::Worker::Bootstrap.start!(
  templates: File.expand_path("templates", __dir__), concurrency: concurrency,
  log_level: ENV.fetch("LOG_LEVEL", "warn"), task_retention: tasks
)

# Hand-off latency: engine marks a step ready → Ruby subscriber sees it. One list per thread.
latencies = Queue.new
TaskerCore::Worker::EventBridge.instance.subscribe("step.execution.received") do |event|
  list = (Thread.current[:tasker_demo_latencies] ||= [].tap { |l| latencies << l })
  list << (Process.clock_gettime(Process::CLOCK_REALTIME, :nanosecond) - event[:ready_at_ns])
end

puts "tasker_core #{TaskerCore::VERSION} demo: #{tasks} order workflows x #{steps_per_task} steps, " \
     "concurrency #{concurrency}, Ruby #{RUBY_VERSION}"
bar = ProgressBar.new(tasks * steps_per_task)
started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
bar.start
uuids = Array.new(tasks) do |i|
  TaskerCore.create_task(namespace: "fulfillment", name: "order_fulfillment", context: order_context(i))
end
finals = uuids.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 600) }
elapsed = Process.clock_gettime(Process::CLOCK_MONOTONIC) - started
status = TaskerCore::FFI.worker_status
bar.finish(status[:steps_processed])

complete = finals.count { |t| t[:status] == "complete" }
samples = []
samples.concat(latencies.pop) until latencies.empty?
samples.sort!
duration = ->(ns) { ns < 1_000_000 ? format("%.1f µs", ns / 1000.0) : format("%.2f ms", ns / 1_000_000.0) }

puts format("tasks:       %d complete, %d error", complete, finals.size - complete)
puts format("steps:       %d processed, %d failed", status[:steps_processed], status[:steps_failed])
puts format("wall time:   %.3f s", elapsed)
puts format("throughput:  %d steps/s, %d tasks/s", status[:steps_processed] / elapsed, tasks / elapsed)
puts "step latency (ready in engine -> handler thread; includes queueing), #{samples.size} steps: " \
     "p50 #{duration.call(percentile(samples, 50))}, p99 #{duration.call(percentile(samples, 99))}"
puts "example result: #{finals.first[:steps].last[:result]}"

TaskerCore::Worker::Bootstrap.instance.shutdown!
exit(complete == tasks ? 0 : 1)
