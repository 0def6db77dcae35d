# frozen_string_literal: true

# The Ruby half of the polyglot workflow (python/tests/test_polyglot.py starts it):
#   ruby -I <repo>/lib ruby_worker.rb '<bootstrap config as JSON>'
# Runs the steps of namespace `polyglot`, prints "READY <pid>", and stops gracefully when its
# stdin closes or on SIGTERM.

require "json"
require "tasker_core"

module PolyglotSteps
  # The order's items, from the task's context.
  class Fetch < TaskerCore::StepHandler::Base
    def call(task, _sequence, _step)
      { "items" => task.context.fetch("items"), "language" => "ruby", "pid" => Process.pid }
    end
  end

  # A tenth of the order's value.
  class Tax < TaskerCore::StepHandler::Base
    def call(_task, sequence, _step)
      items = sequence.dependency_results.fetch("fetch").fetch("items")
      { "tax" => items.sum / 10.0, "language" => "ruby", "pid" => Process.pid }
    end
  end

  # Adds what Python scored and what Ruby taxed.
  class Total < TaskerCore::StepHandler::Base
    def call(_task, sequence, _step)
      score = sequence.dependency_results.fetch("score")
      { "total" => score.fetch("score") + sequence.dependency_results.fetch("tax").fetch("tax"),
        "score_from" => score.fetch("language"), "language" => "ruby", "pid" => Process.pid }
    end
  end
end

TaskerCore::Worker::Bootstrap.start!(JSON.parse(ARGV.fetch(0), symbolize_names: true))
$stdout.puts("READY #{Process.pid}")
$stdout.flush
$stdin.read
TaskerCore::Worker::Bootstrap.instance.shutdown!
