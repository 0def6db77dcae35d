# frozen_string_literal: true

# The classes themselves are defined by the native extension (so Rust can raise them as soon as
# it loads); this file adds what handlers need on top.
module TaskerCore
  # Raised by a handler: the attempt failed and may be retried, optionally not before `retry_after` seconds.
  class RetryableError
    attr_reader :retry_after

    def initialize(message = nil, retry_after: nil)
      super(message)
      @retry_after = retry_after
    end
  end
  # TaskerCore::PermanentError, raised by a handler, fails the step now whatever attempts remain.
  # TaskerCore::TaskNotFoundError (an FFIError): a task uuid that was never created here, or is no
  # longer known (see task_retention / finished_task_ttl).
  # TaskerCore::StepTimeoutError: raised inside a handler whose attempt ran past timeout_seconds.
end
