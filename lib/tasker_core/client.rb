# frozen_string_literal: true

# Creating tasks and following them.
module TaskerCore
  class << self
    # @return [String] the new task's uuid
    def create_task(namespace:, name:, version: "1.0.0", context: {})
      FFI.create_task(namespace: namespace, name: name, version: version, context: context)
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
