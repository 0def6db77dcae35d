# frozen_string_literal: true

module TaskerCore
  module Worker
    # Publishes task.completed, task.failed and task.cancelled on the EventBridge. The engine hands
    # finished tasks over (`FFI.next_task_end`, waited for with the GVL released) only while
    # something subscribes to one of those events, so an unobserved task end costs nothing. One
    # Ruby thread delivers them, in the order the tasks finished; it leaves once the worker has
    # stopped and every task end announced before the stop was delivered.
    class TaskEndRelay
      def initialize(logger:, bridge: EventBridge.instance)
        @logger = logger
        @bridge = bridge
        @relay = RelayThread.new("tasker-task-ends", take: -> { TaskerCore::FFI.next_task_end(nil) }) do |status|
          deliver(status) if status # false: the wait was cut short
        end
      end

      # The thread that delivers task ends (nil when not started).
      def thread = @relay.thread

      def start
        @relay.start
        self
      end

      # Waits for the thread to leave (it does once the engine has stopped). Never raises.
      def stop(timeout = 2)
        @relay.stop(timeout)
      end

      private

      def deliver(status)
        @bridge.publish_task_end(status)
      rescue SignalException, SystemExit
        raise
      rescue Exception => e # rubocop:disable Lint/RescueException
        # A subscriber raised: report it and keep delivering the next task ends.
        @logger.error("task event subscriber raised", error: e.class.name, message: e.message.to_s,
                                                      task_uuid: status[:task_uuid])
        @bridge.publish_bridge_error(e, event_id: status[:task_uuid])
      end
    end
  end
end
