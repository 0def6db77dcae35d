# frozen_string_literal: true

# Creating tasks and following them.
module TaskerCore
  class << self
    # @return [String] the new task's uuid
    def create_task(namespace:, name:, version: "1.0.0", context: {})
      FFI.create_task(namespace: namespace, name: name, version: version, context: context)
    end

    # Many tasks of one template at once, like Sidekiq's push_bulk: one hand-off to the engine
    # and, on PostgreSQL, one transaction (all are created or none).
    # @param contexts [Array<Hash>] one task per context
    # @return [Array<String>] the new tasks' uuids, in the order of `contexts`
    def create_tasks(namespace:, name:, contexts:, version: "1.0.0")
      FFI.create_tasks(namespace: namespace, name: name, version: version, contexts: contexts)
    end

    # @return [Hash] {task_uuid:, namespace:, name:, version:, status:, steps: [...]}
    def task_status(task_uuid)
      FFI.task_status(task_uuid)
    end

    # Wait (with the GVL released) until the task completes or errors.
    # @raise [Timeout::Error] past `timeout` seconds (nil waits forever)
    def wait_for_task(task_uuid, timeout: 30)
      FFI.wait_for_task(task_uuid, timeout) ||
        raise(Timeout::Error, "task #{task_uuid} did not finish within #{timeout}s")
    end
  end
end
