# frozen_string_literal: true

module TaskerCore
  module StepHandler
    # What a handler may return to attach metadata to its result.
    StepResult = Struct.new(:result, :metadata, keyword_init: true)

    # Subclass and define `call(task, sequence, step)`:
    #   - return a Hash (the step's result) or `success(result:, metadata:)`;
    #   - raise TaskerCore::RetryableError (optionally `retry_after:`) or any StandardError to retry;
    #   - raise TaskerCore::PermanentError to fail the step at once.
    # `config` is the template's `handler.initialization`.
    class Base
      attr_reader :config

      def initialize(config: {})
        @config = config
      end

      def call(_task, _sequence, _step)
        raise NotImplementedError, "#{self.class} must define call(task, sequence, step)"
      end

      def success(result:, metadata: {})
        StepResult.new(result: result, metadata: metadata)
      end
    end
  end
end
