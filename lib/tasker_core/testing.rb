# frozen_string_literal: true

require "monitor"
require "tasker_core"
require_relative "testing/task"
require_relative "testing/runner"
require_relative "testing/attempt"
require_relative "testing/store"

module TaskerCore
  # Test mode: tasks run in the calling thread, with no engine thread and no database, by the
  # engine's own rules (templates loaded and validated by the engine's code, the same handler
  # resolution, middleware, error classification, retry limits and backoff). See docs/testing.md.
  #
  #   require "tasker_core/testing"
  #   TaskerCore::Testing.inline!        # create_task runs the whole task before it returns
  #   TaskerCore::Testing.fake!          # create_task only records the task (see .tasks, .drain)
  #   TaskerCore::Testing.disable!       # back to the engine (the default after require)
  #   TaskerCore::Testing.inline! { ... } # for the block only
  #
  # In test mode `TaskerCore.create_task`, `create_tasks`, `task_status`, `wait_for_task`,
  # `wait_for_tasks`, `cancel_task` and `retry_task` answer from test mode's own tasks, with the Hashes and errors
  # a worker gives.
  module Testing
    MODES = %i[disabled inline fake].freeze
    # The handler threads a worker starts by default: as many ready steps start together.
    DEFAULT_CONCURRENCY = 4

    @mode = :disabled
    @store = Store.new

    class << self
      # :disabled, :inline or :fake
      attr_reader :mode

      # Run each task as it is created. With a block: for the block only (the previous mode is
      # restored after it); returns the block's value.
      def inline!(&)
        switch(:inline, &)
      end

      # Record each task as it is created, without running it (see .tasks, .drain).
      def fake!(&)
        switch(:fake, &)
      end

      # Tasks go to the engine again.
      def disable!(&)
        switch(:disabled, &)
      end

      def inline?
        @mode == :inline
      end

      def fake?
        @mode == :fake
      end

      def enabled?
        @mode != :disabled
      end

      # The worker config the templates are taken from, as you would pass it to
      # `Worker::Bootstrap.start!` and validated the same way (`templates`, `namespaces` and
      # `validate_handlers` matter here; `concurrency` is how many ready steps start together,
      # default 4). Default (or after `config = nil`): TaskerCore.configuration.worker_config, which
      # in a Rails app is config.tasker_core (templates in config/tasker), and `{}` elsewhere (the
      # templates under ENV["TASKER_TEMPLATE_PATH"]).
      def config=(config)
        @store.config = config
      end

      def config
        @store.config
      end

      # Shorthand for `config = config.merge(templates: paths)`.
      def templates=(paths)
        @store.config = config.merge(templates: paths)
      end

      # Load the templates again on next use (after editing a template file).
      def reload_templates!
        @store.reload_templates!
      end

      # The virtual clock backoff is skipped on (see Clock).
      def clock
        @store.clock
      end

      # Every task created in test mode since the last .clear, oldest first.
      # @return [Array<Testing::Task>]
      def tasks
        @store.tasks
      end

      # Tasks created in test mode that have not run (fake!), or were retried and have not run again.
      def pending_tasks
        tasks.select(&:pending?)
      end

      # Run every pending task (and the tasks their handlers create) to its end, in creation
      # order. @return [Array<Hash>] the final statuses of the tasks it ran
      def drain
        ran = []
        while (task = pending_tasks.first)
          @store.run(task)
          ran << task.snapshot
        end
        ran
      end

      # Forget every task.
      def clear
        @store.clear
        self
      end

      # Run one handler as a worker would, for a unit test of one step, and return its completion
      # as the engine reads it: {success:, result:, metadata:, error_class:, error_message:,
      # retryable:, retry_after:, ...} (`result` as JSON keeps it: String keys). Middleware runs
      # around it; the step's `timeout_seconds` (default 30) and `on_timeout` apply as on a worker
      # (a timed-out attempt gives {success: false, timed_out: true, ...}).
      # @param handler [Class, String] a handler class, or a callable name resolved as a worker does
      # @param step [Hash] optional: step_name, max_attempts, retryable, timeout_seconds, on_timeout,
      #   namespace, task_name, version
      # The contract names these keywords; the rest are optional step settings.
      def run_step(handler, context: {}, dependency_results: {}, config: {}, attempt: 1, **step) # rubocop:disable Metrics/ParameterLists
        Attempt.run_step(handler, context: context, dependency_results: dependency_results, config: config,
                                  attempt: attempt, **step)
      end

      # --- what TaskerCore's client methods do while test mode is on (see ClientHook) ---

      # @api private
      # A `run_at` is checked as the engine checks it and kept (Testing::Task#run_at), but does not
      # delay anything: inline! runs the task at once, and drain runs it whatever its time (as
      # Sidekiq::Testing does with perform_in). To test what happens before the time, use fake!
      # and look at Testing.tasks.
      def create_task(namespace:, name:, version:, context:, run_at: nil)
        @store.create_tasks({ namespace: namespace, name: name, version: version, run_at: run_at }, [context],
                            what: "context", run: inline?).first
      end

      # @api private
      def create_tasks(namespace:, name:, version:, contexts:, run_at: nil)
        @store.create_tasks({ namespace:, name:, version:, run_at: }, contexts, run: inline?)
      end

      # @api private
      def task_status(task_uuid)
        @store.find(task_uuid).snapshot
      end

      # @api private
      def wait_for_task(task_uuid, timeout:)
        @store.wait_for_task(task_uuid, timeout)
      end

      # @api private
      def cancel_task(task_uuid)
        @store.cancel_task(task_uuid)
      end

      # @api private
      def retry_task(task_uuid)
        @store.retry_task(task_uuid, run: inline?)
      end

      # @api private JSON data as the engine stores it (String keys), a fresh copy.
      def deep_copy(value)
        TaskerCore::FFI.testing_json(value, "value")
      end

      # @api private ISO 8601 UTC with milliseconds, as the engine writes times.
      def iso8601(time)
        time&.utc&.iso8601(3)
      end

      private

      def switch(mode, &block)
        raise ArgumentError, "unknown test mode #{mode.inspect}" unless MODES.include?(mode)

        previous = @mode
        @mode = mode
        return self unless block

        begin
          block.call
        ensure
          @mode = previous
        end
      end
    end

    # Sends TaskerCore's client calls to test mode while it is on.
    module ClientHook
      def create_task(namespace:, name:, version: "1.0.0", context: {}, run_at: nil)
        return super unless Testing.enabled?

        Testing.create_task(namespace: namespace, name: name, version: version, context: context,
                            run_at: run_at.nil? ? nil : schedule_time(run_at))
      end

      def create_tasks(namespace:, name:, contexts:, version: "1.0.0", run_at: nil)
        return super unless Testing.enabled?

        Testing.create_tasks(namespace: namespace, name: name, version: version, contexts: contexts,
                             run_at: run_at.nil? ? nil : schedule_time(run_at))
      end

      def task_status(task_uuid)
        Testing.enabled? ? Testing.task_status(task_uuid) : super
      end

      def wait_for_task(task_uuid, timeout: 30)
        Testing.enabled? ? Testing.wait_for_task(task_uuid, timeout: timeout) : super
      end

      # In test mode a task has finished (inline!) or will not finish by waiting (fake!).
      def wait_for_tasks(task_uuids, timeout: 30)
        return super unless Testing.enabled?

        Array(task_uuids).map { |uuid| Testing.wait_for_task(uuid, timeout: timeout) }
      end

      def cancel_task(task_uuid)
        Testing.enabled? ? Testing.cancel_task(task_uuid) : super
      end

      def retry_task(task_uuid)
        Testing.enabled? ? Testing.retry_task(task_uuid) : super
      end
    end
    TaskerCore.singleton_class.prepend(ClientHook)
  end
end
