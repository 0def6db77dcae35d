# frozen_string_literal: true

WEB_TEMPLATES = File.join(FIXTURES, "web")

# Handlers of spec/fixtures/web.
module WebSpecHandlers
  # Fails for good when the context says "fail", fails once (then succeeds) when it says "flaky";
  # "decline_once" fails its first attempt for good (the task errors), and a retry succeeds.
  class Charge < TaskerCore::StepHandler::Base
    def call(task, _sequence, step)
      raise TaskerCore::PermanentError, "card declined" if task.context["fail"]
      if task.context["decline_once"] && step.attempts == 1
        raise TaskerCore::PermanentError, "card declined <once> & \"retry\""
      end

      raise TaskerCore::RetryableError, "gateway busy" if task.context["flaky"] && step.attempts == 1

      { "charged" => true }
    end
  end

  class Ship < TaskerCore::StepHandler::Base
    def call(_task, _sequence, _step)
      { "shipped" => true }
    end
  end

  # Defined for the template's handler check; the busy-process examples run their own copy.
  class Spin < TaskerCore::StepHandler::Base
    def call(_task, _sequence, _step)
      {}
    end
  end
end
