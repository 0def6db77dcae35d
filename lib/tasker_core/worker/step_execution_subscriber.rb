# frozen_string_literal: true

module TaskerCore
  module Worker
    # Runs one step: resolves the handler, calls it, turns its return value or exception into a
    # completion and publishes that completion. Never lets a handler's failure escape.
    class StepExecutionSubscriber
      # @param interrupter [StepInterrupter, nil] lets the engine interrupt a handler whose attempt
      #   timed out or whose task was cancelled (Bootstrap passes its own)
      # @param middleware [Middleware::Chain, nil] around each handler call; nil: the configured one
      #   (TaskerCore.configuration.handler_middleware), read at each step
      def initialize(handler_registry: Registry::HandlerRegistry.instance, event_bridge: EventBridge.instance,
                     logger: TaskerCore::Logger.new, interrupter: nil, middleware: nil)
        @registry = handler_registry
        @bridge = event_bridge
        @logger = logger
        @interrupter = interrupter
        @middleware = middleware
      end

      # Subscriber entry point: `event` is the published Event (or its payload Hash).
      def call(event)
        data = event.respond_to?(:payload) ? event.payload : event
        @bridge.publish_step_completion(execute(data))
      rescue ArgumentError => e
        # The completion itself was refused (e.g. a result that is not JSON-able): fail the step.
        @bridge.publish_step_completion(failure(data, e, retryable: false))
      end

      private

      def execute(data)
        chain = @middleware || TaskerCore.configuration.handler_middleware
        # The class is resolved inside the middleware, so one that reloads code runs the new class.
        chain.invoke(data) { run_handler(data) }
      rescue StandardError => e
        # RetryableError (with its retry_after) and any other StandardError retry; PermanentError does not.
        retry_after = e.retry_after if e.is_a?(TaskerCore::RetryableError)
        failure(data, e, retryable: !e.is_a?(TaskerCore::PermanentError), retry_after: retry_after)
      rescue SignalException, SystemExit
        raise
      rescue Exception => e # rubocop:disable Lint/RescueException
        # NotImplementedError, SystemStackError, NoMemoryError...: fail the step, keep the thread.
        failure(data, e, retryable: false)
      end

      def run_handler(data)
        sequence = data[:task_sequence_step]
        callable = sequence.step_definition.callable
        klass = @registry.resolve(callable)
        return missing_handler(data, callable) unless klass

        handler = klass.new(config: sequence.step_definition.initialization)
        # Pool threads defer interrupts (see HandlerPool); the handler itself takes them, so that
        # Thread#raise reaches it. StepInterrupter#guard (outside that window) makes sure a timeout or
        # cancel raised into this thread lands in this handler or nowhere.
        task = sequence.task
        step = sequence.workflow_step
        run = proc { Thread.handle_interrupt(Object => :immediate) { handler.call(task, sequence, step) } }
        returned = @interrupter ? @interrupter.guard(data[:event_id], &run) : run.call
        success(data, returned)
      end

      def success(data, returned)
        metadata = {}
        if returned.is_a?(StepHandler::StepResult)
          metadata = returned.metadata || metadata
          returned = returned.result
        end
        # One Hash literal: this runs once per step.
        { event_id: data[:event_id], task_uuid: data[:task_uuid], step_uuid: data[:step_uuid], success: true,
          result: returned, metadata: metadata }
      end

      def failure(data, error, retryable:, retry_after: nil)
        log_failure(data, error, retryable)
        completion = base(data).merge!(
          success: false, retryable: retryable, error_class: error.class.name, error_message: error.message.to_s,
          metadata: { "backtrace" => Array(error.backtrace).first(10) }
        )
        completion[:retry_after] = retry_after if retry_after
        completion
      end

      def missing_handler(data, callable)
        error = NameError.new("handler class #{callable} not found: define it, or register it with " \
                              "TaskerCore::Registry::HandlerRegistry.instance.register")
        failure(data, error, retryable: false)
      end

      def base(data)
        { event_id: data[:event_id], task_uuid: data[:task_uuid], step_uuid: data[:step_uuid] }
      end

      # Names the step as the engine's own log lines do (task_uuid, step, attempt), so one grep
      # follows a step through both. Only on failure: the success path logs nothing.
      def log_failure(data, error, retryable)
        step = data[:task_sequence_step]&.workflow_step
        fields = { task_uuid: data[:task_uuid], step: step&.name, attempt: step&.attempts, error: error.class.name,
                   message: error.message.to_s }
        # The engine ended this attempt and logged why; the handler only confirms it stopped.
        return @logger.info("step handler interrupted", **fields) if error.is_a?(StepInterruption)

        @logger.warn("step failed", **fields, retryable: retryable)
      end
    end
  end
end
