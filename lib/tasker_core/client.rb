# frozen_string_literal: true

# Creating tasks and following them.
module TaskerCore
  class << self
    # @param run_at [Time, nil] schedule the task: its first steps become ready at that time, not
    #   before (nil, or a time already past: now). Until then the task is `pending` (and can be
    #   cancelled). At most 10 years ahead and a year back.
    # @return [String] the new task's uuid
    # @raise [ArgumentError] naming run_at when it is not a Time, not finite or too far off
    def create_task(namespace:, name:, version: "1.0.0", context: {}, run_at: nil)
      request = { namespace: namespace, name: name, version: version, context: context }
      request[:run_at] = schedule_time(run_at) unless run_at.nil?
      FFI.create_task(request)
    end

    # Many tasks of one template at once, like Sidekiq's push_bulk: one hand-off to the engine
    # and, on PostgreSQL, one transaction (all are created or none).
    # @param contexts [Array<Hash>] one task per context
    # @param run_at [Time, nil] as for create_task, for every one of them
    # @return [Array<String>] the new tasks' uuids, in the order of `contexts`
    def create_tasks(namespace:, name:, contexts:, version: "1.0.0", run_at: nil)
      request = { namespace: namespace, name: name, version: version, contexts: contexts }
      request[:run_at] = schedule_time(run_at) unless run_at.nil?
      FFI.create_tasks(request)
    end

    # @api private A `run_at` as the engine takes it: a Time (a DateTime or Date becomes one);
    # anything else goes on unchanged and the engine refuses it, naming run_at.
    def schedule_time(run_at)
      return run_at if run_at.is_a?(Time)
      return run_at.to_time if defined?(::Date) && run_at.is_a?(::Date) # DateTime is a Date

      run_at
    end

    # @return [Hash] {task_uuid:, namespace:, name:, version:, status:, steps: [...]}
    def task_status(task_uuid)
      FFI.task_status(task_uuid)
    end

    # Find tasks, newest first, a page at a time. Filters left nil match everything; pass the
    # `next_cursor` of a page as `cursor:` for the next (older) one (nil on the last page).
    # @param status [String, Symbol, nil] pending, in_progress, complete, error or cancelled
    # @param created_after [Time, Numeric, String, nil] only tasks created after it (a Time, seconds
    #   since the epoch, or an ISO 8601 String)
    # @param limit [Integer] 1 to 1000
    # @return [Hash] {tasks: [{task_uuid:, namespace:, name:, version:, status:, created_at:,
    #   completed_at:}, ...], next_cursor: String or nil}
    # @raise [ArgumentError] naming the parameter that is wrong
    # The keywords are the public contract's, each an independent filter.
    def tasks(status: nil, namespace: nil, name: nil, created_after: nil, limit: 50, cursor: nil) # rubocop:disable Metrics/ParameterLists
      created_after = created_after.to_r.to_f if created_after.is_a?(Time)
      FFI.list_tasks(status: status&.to_s, namespace: namespace, name: name, created_after: created_after,
                     limit: limit, cursor: cursor)
    end

    # A picture of the task: its template's DAG with each step's state (colour, and a label with
    # its status, attempts and duration). Step names are escaped for the output's syntax.
    # @param format [Symbol, String] :mermaid, :dot (Graphviz) or :svg (laid out here, no Graphviz)
    # @return [String]
    # @raise [ArgumentError] naming format for any other format
    # @raise [TaskNotFoundError] for a uuid nobody knows
    def task_graph(task_uuid, format: :svg)
      unless format.is_a?(Symbol) || format.is_a?(String)
        raise ArgumentError, "format: #{format.inspect} is not one of :mermaid, :dot, :svg"
      end

      FFI.task_graph(task_uuid, format.to_s)
    end

    # Stop a task: no step of it starts any more, handlers running its steps are interrupted
    # (`StepCancelledError` is raised in them, unless the step says `on_timeout: "wait"`), the
    # steps that never ran become `cancelled`, and the task becomes `cancelled` once no handler
    # of it runs any more (so `wait_for_task` returns then).
    # @return [Boolean] true, or false if the task had already finished
    # @raise [TaskNotFoundError] for a uuid this worker never created (or no longer remembers)
    def cancel_task(task_uuid)
      FFI.cancel_task(task_uuid)
    end

    # Run an `error` or `cancelled` task again from its failed, skipped and cancelled steps.
    # Completed steps keep their results; attempts go on counting, and each step gets its
    # `max_attempts` again.
    # @return [true]
    # @raise [ConfigurationError] if the task is still running or complete
    def retry_task(task_uuid)
      FFI.retry_task(task_uuid)
    end

    # Wait (with the GVL released) until the task completes or errors.
    # @raise [Timeout::Error] past `timeout` seconds (nil waits forever)
    def wait_for_task(task_uuid, timeout: 30)
      FFI.wait_for_task(task_uuid, timeout) ||
        raise(Timeout::Error, "task #{task_uuid} did not finish within #{timeout}s")
    end

    # Wait (with the GVL released) until every task has finished.
    # @param task_uuids [Array<String>]
    # @return [Array<Hash>] the final task statuses, in the order of `task_uuids`
    # @raise [TaskNotFoundError] for a uuid this worker never created (nothing is waited for)
    # @raise [Timeout::Error] past `timeout` seconds (nil waits forever)
    def wait_for_tasks(task_uuids, timeout: 30)
      FFI.wait_for_tasks(task_uuids, timeout) ||
        raise(Timeout::Error, "#{task_uuids.size} tasks did not all finish within #{timeout}s")
    end
  end
end

module TaskerCore
  # A process that only creates and follows tasks (a web process, a console, a cron job) while
  # worker processes elsewhere run them: an engine connected to the workers' PostgreSQL database
  # that claims no step and starts no handler thread. It needs no template files: every worker
  # stores its templates in the database, and an unknown template raises as it does in a worker.
  #
  #   client = TaskerCore::Client.connect(database_url: ENV.fetch("DATABASE_URL"))
  #   uuid = client.create_task(namespace: "billing", name: "invoice", context: { id: 7 })
  #   client.wait_for_task(uuid, timeout: 60)
  #
  # One engine serves a process, so a process has one client, or a worker, not both (a worker's
  # process creates tasks with `TaskerCore.create_task`). After a fork the child connects again.
  class Client
    # Settings that belong to a worker (a client runs no step) and are refused here.
    WORKER_SETTINGS = %i[namespaces templates concurrency validate_handlers install_signal_handlers
                         enable_web_api web_api_bind web_api_token web_api_actions].freeze

    class << self
      # @param database_url [String] the workers' database (default: ENV["DATABASE_URL"])
      # @param options [Hash] engine settings a client may set (database_pool_size, log_level, ...)
      # @return [Client]
      # @raise [ConfigurationError] without a database url, or for a worker setting
      # @raise [WorkerBootstrapError] if this process already runs a worker or a client
      def connect(database_url: ENV.fetch("DATABASE_URL", nil), **options)
        if database_url.to_s.empty?
          raise ConfigurationError,
                "Client.connect needs database_url: (or DATABASE_URL): a client talks to the workers' PostgreSQL " \
                "database. On the memory backend tasks live in the worker's own process: call " \
                "TaskerCore.create_task there, after TaskerCore::Worker::Bootstrap.start!"
        end
        refused = options.keys.map(&:to_sym) & (WORKER_SETTINGS + %i[backend])
        unless refused.empty?
          raise ConfigurationError,
                "#{refused.join(", ")}: not a client setting (a client runs no step and uses PostgreSQL); " \
                "give it to the worker (Worker::Bootstrap.start! or tasker-worker)"
        end
        if FFI.worker_status[:running]
          raise WorkerBootstrapError,
                "this process already runs a worker or a client (one engine a process): create tasks with " \
                "TaskerCore.create_task, or close the other client first"
        end
        new(database_url, options)
      end
    end

    def initialize(database_url, options)
      FFI.bootstrap_worker({ backend: "postgres", database_url: database_url, namespaces: [], templates: [] }
                             .merge(options))
      @pid = Process.pid
      @open = true
      at_exit { close }
    end

    # Stop this client's engine (its database connections close). Idempotent.
    def close
      return unless @open && @pid == Process.pid

      @open = false
      FFI.stop_worker if FFI.worker_status[:running]
      nil
    end

    # @return [Boolean] false once closed, and in a child process forked after connect
    def connected?
      @open && @pid == Process.pid && FFI.worker_status[:running]
    end

    # The same task methods as TaskerCore's (see client.rb above for each one's contract).
    %i[create_task create_tasks task_status wait_for_task wait_for_tasks cancel_task retry_task tasks
       task_graph].each do |name|
      define_method(name) do |*args, **kwargs|
        ensure_connected!
        TaskerCore.public_send(name, *args, **kwargs)
      end
    end

    private

    def ensure_connected!
      return if @open && @pid == Process.pid

      raise WorkerNotInitializedError, "this client was closed" unless @open

      raise WorkerNotInitializedError, "this client was connected in the parent process: connect again after fork"
    end
  end
end
