# frozen_string_literal: true

module TaskerCore
  module Models
    # The task a step belongs to.
    class TaskWrapper
      attr_reader :task_uuid, :namespace, :name, :version, :context

      def initialize(data)
        @task_uuid = data[:task_uuid]
        @namespace = data[:namespace]
        @name = data[:name]
        @version = data[:version]
        @context = data[:context]
      end

      def to_h
        { task_uuid: task_uuid, namespace: namespace, name: name, version: version, context: context }
      end
    end

    # The step being executed; `attempts` is this attempt's number (1 on the first run).
    class WorkflowStepWrapper
      attr_reader :step_uuid, :name, :attempts, :max_attempts, :retryable

      def initialize(data)
        @step_uuid = data[:step_uuid]
        @name = data[:name]
        @attempts = data[:attempts]
        @max_attempts = data[:max_attempts]
        @retryable = data[:retryable]
      end

      def retryable?
        retryable
      end

      def last_attempt?
        attempts >= max_attempts
      end

      def to_h
        { step_uuid: step_uuid, name: name, attempts: attempts, max_attempts: max_attempts, retryable: retryable }
      end
    end

    # The template's definition of the step.
    class StepDefinitionWrapper
      attr_reader :name, :handler, :dependencies, :retry, :timeout_seconds

      def initialize(data)
        @name = data[:name]
        @handler = data[:handler]
        @dependencies = data[:dependencies]
        @retry = data[:retry]
        @timeout_seconds = data[:timeout_seconds]
      end

      def callable
        handler[:callable]
      end

      def initialization
        handler[:initialization]
      end

      def to_h
        { name: name, handler: handler, dependencies: dependencies, retry: self.retry,
          timeout_seconds: timeout_seconds }
      end
    end

    # Everything a handler knows about one step execution: `task`, `workflow_step`,
    # `dependency_results` (dependency step name => its result) and `step_definition`.
    class TaskSequenceStepWrapper
      attr_reader :task, :workflow_step, :dependency_results, :step_definition

      def initialize(data)
        @task = TaskWrapper.new(data[:task])
        @workflow_step = WorkflowStepWrapper.new(data[:workflow_step])
        @dependency_results = data[:dependency_results]
        @step_definition = StepDefinitionWrapper.new(data[:step_definition])
      end

      # The result of dependency `name` (String or Symbol); KeyError names the known ones.
      def dependency_result(name)
        key = name.to_s
        dependency_results.fetch(key) do
          raise KeyError, "step #{workflow_step.name} has no dependency #{key.inspect} " \
                          "(dependencies: #{dependency_results.keys.join(", ")})"
        end
      end
      alias get_dependency_result dependency_result

      def to_h
        {
          task: task.to_h, workflow_step: workflow_step.to_h,
          dependency_results: dependency_results, step_definition: step_definition.to_h
        }
      end
    end
  end
end
