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

  # Raised inside a running handler by the worker, never by handlers: the attempt is over
  # (StepTimeoutError: it outlived `timeout_seconds`; StepCancelledError: its task was cancelled).
  # Clean up and return (`ensure` blocks run); whatever the handler returns next is discarded.
  # Handler threads defer these outside the handler itself (`Thread.handle_interrupt`).
  module StepInterruption
  end

  # TaskerCore::StepTimeoutError < TaskerCore::Error is defined by the extension.
  class StepTimeoutError
    include StepInterruption
  end

  # Raised inside a running handler whose task was cancelled (`TaskerCore.cancel_task`).
  class StepCancelledError < Error
    include StepInterruption
  end
end

module TaskerCore
  # Raised into a handler still running when a shutdown passes its deadline, after its step was
  # handed back (see Worker::HandlerPool#stop); Sidekiq's Sidekiq::Shutdown. An Interrupt, not a
  # StandardError: `rescue => e` does not swallow it, and a database transaction open in the
  # handler rolls back. Let it propagate; `ensure` blocks run.
  class Shutdown < Interrupt
  end
end
