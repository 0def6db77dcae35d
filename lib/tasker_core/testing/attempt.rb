# frozen_string_literal: true

module TaskerCore
  module Testing
    # Runs one attempt of one step the way a worker's handler thread does: the same
    # Worker::StepExecutionSubscriber (handler resolution, handler middleware, error
    # classification), the same event Hash, and the completion read by the engine's own code
    # (FFI.testing_completion: a result that is not JSON-able fails the step as on a worker).
    class Attempt
      # Takes the completion the subscriber hands over, where a worker hands it to the engine.
      class CompletionSink
        attr_reader :completion

        # Raises ArgumentError for what the engine refuses (the subscriber then fails the step).
        def publish_step_completion(completion)
          @completion = completion.merge(TaskerCore::FFI.testing_completion(completion))
          true
        end
      end

      # Stands in for Worker::StepInterrupter: raises StepTimeoutError inside the handler once its
      # attempt has run `timeout_seconds` (unless the step says `on_timeout: "wait"`).
      class TimeoutGuard
        def initialize(definition, attempt, task_uuid)
          @seconds = definition[:timeout_seconds]
          @wait = definition[:on_timeout] == "wait"
          @message = "step #{definition[:name]} (attempt #{attempt}, task #{task_uuid}) timed out after " \
                     "#{format("%g", @seconds)}s"
        end

        def guard(_event_id, &)
          return yield if @wait

          Timeout.timeout(@seconds, TaskerCore::StepTimeoutError, @message, &)
        end
      end

      # Resolves every callable to one class (run_step given a class, maybe anonymous).
      class FixedResolver
        def initialize(klass)
          @klass = klass
        end

        def resolve(_callable)
          @klass
        end
      end

      # The step definition run_step gives a handler when no template names it: the template
      # defaults (see the contract's "Task template").
      STEP_DEFAULTS = {
        max_attempts: 3, retryable: true, timeout_seconds: 30, on_timeout: "raise", namespace: "test",
        task_name: "run_step", version: "1.0.0", step_name: nil
      }.freeze

      class << self
        # See Testing.run_step.
        def run_step(handler, context:, dependency_results:, config:, attempt:, **step) # rubocop:disable Metrics/ParameterLists
          unknown = step.keys - STEP_DEFAULTS.keys
          raise ArgumentError, "run_step: unknown option(s) #{unknown.join(", ")}" unless unknown.empty?

          step = STEP_DEFAULTS.merge(step)
          callable = handler.is_a?(String) ? handler : handler.name.to_s
          definition = step_definition(callable, step, config, dependency_results)
          task = { task_uuid: SecureRandom.uuid, namespace: step[:namespace], name: step[:task_name],
                   version: step[:version], context: TaskerCore::FFI.testing_json(context, "context") }
          registry = handler.is_a?(String) ? Registry::HandlerRegistry.instance : FixedResolver.new(handler)
          kind, value = new(registry: registry).run(
            task, definition, SecureRandom.uuid, attempt,
            TaskerCore::FFI.testing_json(dependency_results, "dependency_results")
          )
          return value.except(:failure_message) if kind == :completed

          { task_uuid: task[:task_uuid], success: false, timed_out: true, retryable: true, result: nil, metadata: {},
            error_class: "TaskerCore::StepTimeoutError", error_message: value, retry_after: nil }
        end

        private

        def step_definition(callable, step, config, dependency_results)
          {
            name: (step[:step_name] || default_step_name(callable)).to_s,
            handler: { callable: callable, initialization: TaskerCore::FFI.testing_json(config, "config") },
            dependencies: dependency_results.keys.map(&:to_s),
            retry: { retryable: step[:retryable], max_attempts: step[:max_attempts], backoff: "exponential",
                     backoff_base_ms: 100, max_backoff_ms: 30_000 },
            timeout_seconds: step[:timeout_seconds].to_f, on_timeout: step[:on_timeout].to_s
          }
        end

        # Shop::ChargeCard → "charge_card"
        def default_step_name(callable)
          return "step" if callable.empty?

          callable.split("::").last.gsub(/([a-z\d])([A-Z])/, '\1_\2').downcase
        end
      end

      def initialize(registry: Registry::HandlerRegistry.instance, logger: TaskerCore::Logger.new)
        @registry = registry
        @logger = logger
      end

      # Runs the current attempt of `step` (a Task::Step already claimed).
      # @return [Array] [:completed, completion] or [:timed_out, the engine's message]
      def call(task, step)
        definition = step.definition
        dependency_results = task.dependencies_of(step).to_h { |d| [d.name, Testing.deep_copy(d.result)] }
        run(task_data(task), definition, step.uuid, step.attempts, dependency_results)
      end

      # One attempt from parts (Testing.run_step).
      # @return [Array] as #call
      def run(task, definition, step_uuid, attempt, dependency_results)
        event = {
          event_id: SecureRandom.uuid, task_uuid: task[:task_uuid], step_uuid: step_uuid,
          task_sequence_step: Models::TaskSequenceStepWrapper.new(
            task: task, dependency_results: dependency_results, step_definition: definition,
            workflow_step: { step_uuid: step_uuid, name: definition[:name], attempts: attempt,
                             max_attempts: definition[:retry][:max_attempts],
                             retryable: definition[:retry][:retryable] }
          ),
          ready_at_ns: (Time.now.to_r * 1_000_000_000).to_i
        }
        sink = CompletionSink.new
        subscriber = Worker::StepExecutionSubscriber.new(
          handler_registry: @registry, event_bridge: sink, logger: @logger,
          interrupter: TimeoutGuard.new(definition, attempt, task[:task_uuid])
        )
        started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        subscriber.call(event)
        # As on a worker, an attempt that returns past its deadline counts as timed out, whatever
        # it returned (the engine discards a late completion).
        if Process.clock_gettime(Process::CLOCK_MONOTONIC) - started >= definition[:timeout_seconds]
          return [:timed_out, timeout_message(definition, attempt)]
        end

        [:completed, sink.completion]
      end

      private

      # A fresh copy of the task's data for each attempt, as each event carries its own.
      def task_data(task)
        { task_uuid: task.task_uuid, namespace: task.namespace, name: task.name, version: task.version,
          context: Testing.deep_copy(task.context) }
      end

      # The engine's words for a timed-out attempt (InFlight::timeout_message).
      def timeout_message(definition, attempt)
        seconds = definition[:timeout_seconds]
        shown = (seconds % 1).zero? ? seconds.to_i.to_s : format("%.3f", seconds)
        "TaskerCore::StepTimeoutError: attempt #{attempt} of step #{definition[:name]} timed out after #{shown}s"
      end
    end
  end
end
