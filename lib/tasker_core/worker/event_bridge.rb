# frozen_string_literal: true

module TaskerCore
  module Worker
    # The in-process event bus between the engine and Ruby handlers (dry-events' Publisher API).
    #
    #   step.execution.received  a step to run: {event_id:, task_uuid:, step_uuid:, task_sequence_step:,
    #                            ready_at_ns: (when the engine made it ready; CLOCK_REALTIME ns)}
    #   step.completion.sent     a completion handed to the engine: the completion plus `accepted:`
    #   bridge.error             a subscriber raised while handling an event: {error:, event_id:}
    class EventBridge
      include Singleton
      include TaskerCore::Events::Publisher

      STEP_EXECUTION = "step.execution.received"
      STEP_COMPLETION = "step.completion.sent"
      BRIDGE_ERROR = "bridge.error"
      REQUIRED_COMPLETION_FIELDS = %i[event_id task_uuid step_uuid success].freeze

      def initialize
        @active = true
        register_event(STEP_EXECUTION)
        register_event(STEP_COMPLETION)
        register_event(BRIDGE_ERROR)
      end

      def active?
        @active
      end

      def start!
        @active = true
      end

      def stop!
        @active = false
      end

      # Entry point for events taken from the engine: wrap and publish to subscribers.
      # @return [Hash, nil] the published event data, nil when the bridge is stopped
      def publish_step_execution(event_data)
        return unless @active

        wrapped = {
          event_id: event_data[:event_id],
          task_uuid: event_data[:task_uuid],
          step_uuid: event_data[:step_uuid],
          task_sequence_step: wrap_sequence_step(event_data[:task_sequence_step]),
          ready_at_ns: event_data[:ready_at_ns]
        }
        publish(STEP_EXECUTION, wrapped)
        wrapped
      end

      # @api private The worker's own path: `event_data` is the Hash the engine just built for this
      # step and nobody else holds, so it is wrapped in place rather than copied.
      # @return [Hash, nil] the published event data, nil when the bridge is stopped
      def dispatch_step_execution(event_data)
        return unless @active

        event_data[:task_sequence_step] = Models::TaskSequenceStepWrapper.new(event_data[:task_sequence_step])
        publish(STEP_EXECUTION, event_data)
        event_data
      end

      def subscribe_to_step_execution(&)
        subscribe(STEP_EXECUTION, &)
      end

      # Validate, hand to the engine, then publish step.completion.sent.
      # Rust validates (ArgumentError naming missing or ill-typed fields) before anything changes.
      # @return [Boolean] whether the engine accepted it (false: unknown, late or already completed)
      def publish_step_completion(completion)
        raise ArgumentError, "completion must be a Hash, got #{completion.class}" unless completion.is_a?(Hash)
        # The symbol-keyed copy with defaults is only built when someone listens for it.
        return TaskerCore::FFI.send_step_completion_event(completion) unless subscribers?(STEP_COMPLETION)

        completion = normalize_completion(completion)
        accepted = TaskerCore::FFI.send_step_completion_event(completion)
        publish(STEP_COMPLETION, completion.merge(accepted: accepted))
        accepted
      end

      # Report a failure inside a subscriber without losing the worker thread.
      def publish_bridge_error(error, event_id: nil)
        publish(BRIDGE_ERROR, error: error, event_id: event_id)
      end

      private

      def wrap_sequence_step(data)
        return data if data.is_a?(Models::TaskSequenceStepWrapper)

        Models::TaskSequenceStepWrapper.new(data)
      end

      def normalize_completion(data)
        completion = data.transform_keys(&:to_sym)
        missing = REQUIRED_COMPLETION_FIELDS.reject { |k| completion.key?(k) }
        raise ArgumentError, "Missing required fields in completion: #{missing.join(", ")}" unless missing.empty?

        completion[:metadata] ||= {}
        completion[:completed_at] ||= Time.now.utc.iso8601(6)
        completion
      end
    end
  end
end
