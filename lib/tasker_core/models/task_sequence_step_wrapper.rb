# frozen_string_literal: true

module TaskerCore
  module Models
    # The task a step belongs to. Reads the event's Hash on demand (built once per step).
    class TaskWrapper
      def initialize(data)
        @data = data
      end

      def task_uuid = @data[:task_uuid]
      def namespace = @data[:namespace]
      def name = @data[:name]
      def version = @data[:version]
      def context = @data[:context]

      def to_h
        { task_uuid: task_uuid, namespace: namespace, name: name, version: version, context: context }
      end
    end

    # The step being executed; `attempts` is this attempt's number (1 on the first run).
    class WorkflowStepWrapper
      def initialize(data)
        @data = data
      end

      def step_uuid = @data[:step_uuid]
      def name = @data[:name]
      def attempts = @data[:attempts]
      def max_attempts = @data[:max_attempts]
      def retryable = @data[:retryable]

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

    # The template's definition of the step. From the engine it is a deeply frozen Hash, shared
    # by every execution of the step: the template is the same each time.
    class StepDefinitionWrapper
      def initialize(data)
        @data = data
      end

      def name = @data[:name]
      def handler = @data[:handler]
      def dependencies = @data[:dependencies]
      def retry = @data[:retry]
      def timeout_seconds = @data[:timeout_seconds]

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
    # The parts are wrapped when first asked for: most handlers never read some of them.
    class TaskSequenceStepWrapper
      def initialize(data)
        raise ArgumentError, "task_sequence_step must be a Hash, got #{data.class}" unless data.is_a?(Hash)

        @data = data
      end

      def task
        @task ||= TaskWrapper.new(@data[:task])
      end

      def workflow_step
        @workflow_step ||= WorkflowStepWrapper.new(@data[:workflow_step])
      end

      def dependency_results
        @data[:dependency_results]
      end

      def step_definition
        @step_definition ||= StepDefinitionWrapper.new(@data[:step_definition])
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
