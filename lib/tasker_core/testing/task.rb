# frozen_string_literal: true

module TaskerCore
  module Testing
    # A task created in test mode: its template, context and steps, and the same status Hash the
    # engine's `task_status` gives (see #snapshot). The fields and rules mirror the engine's
    # memory backend (ext/tasker_worker/src/backend/memory.rs).
    class Task
      # One step's record, as the engine keeps it.
      Step = Struct.new(:uuid, :name, :index, :definition, :status, :attempts, :attempts_base, :waiting_on,
                        :result, :metadata, :error_message, :started_at, :completed_at, keyword_init: true)

      # run_at: when create_task was asked to start it (nil: at once). Test mode records it only.
      attr_reader :task_uuid, :namespace, :name, :version, :context, :template, :steps, :created_at, :run_at
      attr_accessor :status, :ending, :completed_at

      # @param template [Hash] from FFI.testing_templates
      # @param context [Hash] as the engine stores it (JSON: String keys)
      def initialize(template:, context:, created_at:, run_at: nil)
        @task_uuid = SecureRandom.uuid
        @run_at = run_at
        @template = template
        @namespace = template[:namespace]
        @name = template[:name]
        @version = template[:version]
        @context = context
        @created_at = created_at
        @status = "pending"
        @ending = nil
        @completed_at = nil
        # As on a worker, a task scheduled for later has every step pending until it runs.
        scheduled = run_at && run_at > Time.now
        @steps = template[:steps].each_with_index.map do |definition, index|
          dependencies = definition[:dependencies]
          Step.new(uuid: SecureRandom.uuid, name: definition[:name], index: index, definition: definition,
                   status: dependencies.empty? && !scheduled ? "enqueued" : "pending", attempts: 0, attempts_base: 0,
                   waiting_on: dependencies.size, result: nil, metadata: nil, error_message: nil,
                   started_at: nil, completed_at: nil)
        end
      end

      def finished?
        %w[complete error cancelled].include?(@status)
      end

      # Recorded by `fake!` and not run (or retried and not run again) yet.
      def pending?
        !finished?
      end

      def step(name)
        @steps.find { |s| s.name == name.to_s }
      end

      def dependencies_of(step)
        step.definition[:dependencies].map { |dependency| self.step(dependency) }
      end

      def dependents_of(step)
        @steps.select { |s| s.definition[:dependencies].include?(step.name) }
      end

      # Steps that have not started and now never will become `status` (skipped or cancelled).
      def settle_unstarted(status)
        @steps.each do |step|
          step.status = status if %w[pending enqueued waiting_for_retry].include?(step.status)
        end
      end

      # The Hash `TaskerCore.task_status` gives on a worker (a fresh copy each call).
      def snapshot
        {
          task_uuid: @task_uuid, namespace: @namespace.dup, name: @name.dup, version: @version.dup,
          status: @status.dup, created_at: Testing.iso8601(@created_at), completed_at: Testing.iso8601(@completed_at),
          steps: @steps.map { |step| step_snapshot(step) }, steps_retained: true
        }
      end

      # For `TaskerCore::Testing.tasks` listings and matcher messages.
      def to_h
        { task_uuid: @task_uuid, namespace: @namespace, name: @name, version: @version, context: @context,
          status: @status, run_at: @run_at }
      end

      def inspect
        "#<TaskerCore::Testing::Task #{@namespace}/#{@name}@#{@version} #{@status} context=#{@context.inspect}>"
      end

      private

      def step_snapshot(step)
        duration = (step.completed_at - step.started_at) * 1000.0 if step.started_at && step.completed_at
        {
          step_uuid: step.uuid, name: step.name.dup, status: step.status.dup, attempts: step.attempts,
          result: Testing.deep_copy(step.result), metadata: Testing.deep_copy(step.metadata || {}),
          error_message: step.error_message&.dup, started_at: Testing.iso8601(step.started_at),
          completed_at: Testing.iso8601(step.completed_at), duration_ms: duration
        }
      end
    end
  end
end
