# frozen_string_literal: true

module TaskerCore
  module Worker
    # The in-process event bus between the engine and Ruby handlers (dry-events' Publisher API).
    #
    #   step.execution.received  a step to run: {event_id:, task_uuid:, step_uuid:, task_sequence_step:,
    #                            ready_at_ns: (when the engine made it ready; CLOCK_REALTIME ns)}
    #   step.completion.sent     a completion handed to the engine: the completion plus `accepted:`
    #   bridge.error             a subscriber raised while handling an event: {error:, event_id:}
    #   task.completed           a task finished: its final status, as `TaskerCore.task_status` gives it
    #   task.failed              a task ended in error: its final status
    #   task.cancelled           a task was cancelled (and none of its handlers runs any more): its final status
    #
    # Task events are delivered on one thread of the worker (`TaskEndRelay`), in the order the tasks
    # finished. The engine builds them only while something subscribes to one of them. Memory backend.
    class EventBridge
      include Singleton
      include TaskerCore::Events::Publisher

      STEP_EXECUTION = "step.execution.received"
      STEP_COMPLETION = "step.completion.sent"
      BRIDGE_ERROR = "bridge.error"
      TASK_COMPLETED = "task.completed"
      TASK_FAILED = "task.failed"
      TASK_CANCELLED = "task.cancelled"
      # A final task status => the event that announces it.
      TASK_EVENTS = { "complete" => TASK_COMPLETED, "error" => TASK_FAILED, "cancelled" => TASK_CANCELLED }.freeze
      REQUIRED_COMPLETION_FIELDS = %i[event_id task_uuid step_uuid success].freeze

      def initialize
        @active = true
        [STEP_EXECUTION, STEP_COMPLETION, BRIDGE_ERROR, *TASK_EVENTS.values].each { |id| register_event(id) }
      end

      # Publisher#subscribe; the engine is told when task events gain their first subscriber.
      def subscribe(event_id_or_listener, filter = Events::EMPTY_HASH, &)
        super
        announce_task_ends
        self
      end

      # Publisher#unsubscribe; the engine stops building task events once nobody subscribes.
      def unsubscribe(listener)
        super
        announce_task_ends
        self
      end

      # Whether anything subscribes to task.completed, task.failed or task.cancelled.
      def task_events_observed?
        TASK_EVENTS.each_value.any? { |id| subscribers?(id) }
      end

      # @api private Tells the running worker (if any) whether to announce finished tasks.
      # @return [Boolean] whether a running worker announces them now
      def announce_task_ends
        TaskerCore::FFI.announce_task_ends(task_events_observed?)
      end

      # @api private Publishes the task event of a final task status (from TaskEndRelay).
      # @return [String, nil] the event published, nil when the bridge is stopped
      def publish_task_end(status)
        return unless @active

        event = TASK_EVENTS[status[:status]]
        publish(event, status) if event
        event
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
