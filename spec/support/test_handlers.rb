# frozen_string_literal: true

# Handlers named by the fixture templates.
module TestHandlers
  # Adds 1 to the sum of its dependencies' "value" (or the context's "value" at the root).
  class Increment < TaskerCore::StepHandler::Base
    def call(task, sequence, _step)
      inputs = sequence.dependency_results.values.map { |r| r["value"] }
      base = inputs.empty? ? task.context.fetch("value", 0) : inputs.sum
      { "value" => base + 1 }
    end
  end

  # Returns nothing of interest: the cheapest possible step.
  class Noop < TaskerCore::StepHandler::Base
    def call(_task, _sequence, _step)
      {}
    end
  end
end
