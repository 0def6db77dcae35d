# frozen_string_literal: true

module TaskerCore
  module Testing
    # Test mode's tasks and templates, and what TaskerCore's client methods do in test mode: the
    # same checks, Hashes and errors (classes and messages) as the engine's (bootstrap.rs,
    # backend/memory/ and the Ruby bridge's tasks.rs).
    class Store
      attr_reader :clock

      def initialize
        @lock = Monitor.new
        @tasks = []
        @by_uuid = {}
        @config = nil
        @catalog = nil
        @clock = Clock.new
      end

      # The config given, else the application's (TaskerCore.configuration.worker_config: the
      # Railtie's, or {}).
      def config
        @lock.synchronize { @config || TaskerCore.configuration.worker_config }
      end

      # nil: back to the application's config.
      def config=(config)
        @lock.synchronize do
          @config = config&.to_h&.dup&.freeze
          @catalog = nil
        end
      end

      def reload_templates!
        @lock.synchronize { @catalog = nil }
      end

      def tasks
        @lock.synchronize { @tasks.dup }
      end

      def clear
        @lock.synchronize do
          @tasks = []
          @by_uuid = {}
        end
      end

      # @param request [Hash] namespace:, name:, version:
      # @param run [Boolean] run the new tasks now (inline!) or only record them (fake!)
      # @param what [String, nil] how the engine names the context in errors ("context" for
      #   create_task; contexts[i] for create_tasks)
      # @return [Array<String>] the new tasks' uuids
      def create_tasks(request, contexts, run:, what: nil)
        template, converted = validate_request(request, contexts, what)
        run_at = TaskerCore::FFI.testing_run_at(request)
        run_at &&= Time.at(run_at).utc
        created = converted.map do |context|
          remember(Task.new(template: template, context: context, created_at: @clock.time, run_at: run_at))
        end
        created.each { |task| run(task) } if run
        created.map(&:task_uuid)
      end

      def find(task_uuid)
        raise ArgumentError, "task uuid must be a String" unless task_uuid.is_a?(String)

        @lock.synchronize { @by_uuid[task_uuid] } || raise(TaskNotFoundError, unknown_task_message(task_uuid))
      end

      def wait_for_task(task_uuid, timeout)
        task = find(task_uuid)
        return task.snapshot if task.finished?

        raise Timeout::Error, "task #{task_uuid} did not finish within #{timeout}s: it was recorded by " \
                              "TaskerCore::Testing.fake! and has not run (call TaskerCore::Testing.drain)"
      end

      # A task that has not finished (recorded by fake!) is cancelled at once: none of its steps runs.
      def cancel_task(task_uuid)
        task = find(task_uuid)
        return false if task.finished?

        task.ending = "cancelled"
        task.settle_unstarted("cancelled")
        task.status = "cancelled"
        task.completed_at = @clock.time
        true
      end

      def retry_task(task_uuid, run:)
        task = find(task_uuid)
        unless %w[error cancelled].include?(task.status)
          state = task.finished? ? task.status : "still running"
          raise ConfigurationError, "task #{task_uuid} is #{state}: only a task that ended in error or was " \
                                    "cancelled can be retried"
        end
        reset_for_retry(task)
        run(task) if run
        true
      end

      def run(task)
        Runner.new(task, clock: @clock, concurrency: concurrency, attempt: Attempt.new).run
      end

      private

      # The engine's checks, in its order: contexts as JSON, the template's name, contexts being
      # Hashes, the template. Returns the template and the contexts as stored.
      def validate_request(request, contexts, what)
        raise ConfigurationError, "contexts: must be an Array of Hashes" unless contexts.is_a?(Array)

        converted = contexts.each_with_index.map { |c, i| context_json(c, what || "contexts[#{i}]") }
        key = %i[namespace name version].map { |field| request_field(field, request[field]) }
        if (bad = converted.index { |c| !c.is_a?(Hash) })
          raise ConfigurationError, "contexts[#{bad}]: must be a Hash"
        end

        [template_for(*key), converted]
      end

      def concurrency
        config.fetch(:concurrency) { config.fetch("concurrency", DEFAULT_CONCURRENCY) }
      end

      def remember(task)
        @lock.synchronize do
          @tasks << task
          @by_uuid[task.task_uuid] = task
        end
        task
      end

      def unknown_task_message(task_uuid)
        unless task_uuid.match?(/\A\h{8}-?\h{4}-?\h{4}-?\h{4}-?\h{12}\z/)
          return "unknown task #{task_uuid.inspect}: not a UUID"
        end

        "unknown task #{task_uuid}: never created on this worker, or finished so long ago that it is no longer " \
          "remembered (see task_retention and task_index_retention)"
      end

      # As the memory backend's retry_task: completed steps keep their results, the others run
      # again, each with its retry budget counted from now.
      def reset_for_retry(task)
        task.status = "in_progress"
        task.ending = nil
        task.completed_at = nil
        task.steps.each do |step|
          next if step.status == "complete"

          step.waiting_on = task.dependencies_of(step).count { |d| d.status != "complete" }
          step.attempts_base = step.attempts
          step.status = step.waiting_on.zero? ? "enqueued" : "pending"
        end
      end

      # The templates as the engine loads them (FFI.testing_templates), loaded once per config; and,
      # as Worker::Bootstrap.start! does unless `validate_handlers: false`, every handler class they
      # name checked first (a worker that would refuse to start fails test mode the same way).
      def catalog
        @lock.synchronize do
          config = @config || TaskerCore.configuration.worker_config
          # Loaded again when the application's config was replaced since (config Hashes are frozen).
          @catalog = nil unless @catalog_config.equal?(config)
          @catalog ||= begin
            catalog = TaskerCore::FFI.testing_templates(config)
            Worker::HandlerValidation.validate!(config)
            @catalog_config = config
            catalog
          end
        end
      end

      def template_for(namespace, name, version)
        catalog = self.catalog
        template = catalog[:templates].find do |t|
          t[:namespace] == namespace && t[:name] == name && t[:version] == version
        end
        unless template
          raise ConfigurationError, "unknown template #{namespace}/#{name}@#{version} (known: #{catalog[:known]})"
        end

        unless catalog[:namespaces].include?(namespace)
          raise ConfigurationError, "namespace #{namespace.inspect} is not handled by this worker " \
                                    "(namespaces: #{catalog[:namespaces].inspect})"
        end
        template
      end

      def request_field(key, value)
        return value if value.is_a?(String) && !value.empty?

        raise ConfigurationError, "#{key}: must be a non-empty String"
      end

      def context_json(value, what)
        TaskerCore::FFI.testing_json(value, what)
      rescue ArgumentError => e
        raise ConfigurationError, e.message
      end
    end
  end
end
