# frozen_string_literal: true

module TaskerCore
  module Worker
    # One worker's lifecycle, as Sidekiq's Launcher: the Rust engine (TaskerCore::FFI), the
    # EventBridge subscription, the HandlerPool (Sidekiq's Manager: `concurrency` threads, each
    # running one step at a time through the StepExecutionSubscriber, Sidekiq's Processor) and the
    # StepInterrupter. It installs no signal handler and no at_exit hook: Bootstrap (embedded use)
    # and the `tasker-worker` command decide that.
    class Launcher
      # The engine's own default (`shutdown_timeout` config key).
      DEFAULT_SHUTDOWN_TIMEOUT = 30.0
      # How long handler threads get to leave once TaskerCore::Shutdown was raised into them.
      HARD_STOP_GRACE = 2.0

      attr_reader :config, :pool, :logger, :pid, :worker_id

      def initialize(config, logger:)
        @config = config.dup
        @logger = logger
        @quiet = false
        @pid = Process.pid
      end

      # Starts the engine, subscribes, starts the handler threads. Raises what bootstrap raises,
      # with nothing left half-started.
      def start
        EventBridge.instance.start!
        subscribe
        begin
          result = TaskerCore::FFI.bootstrap_worker(@config)
        rescue Exception # rubocop:disable Lint/RescueException
          unsubscribe
          raise
        end
        @worker_id = result[:worker_id]
        @pool = HandlerPool.new(concurrency: result.fetch(:concurrency), logger: logger) do |event|
          dispatch(EventBridge.instance, event)
        end
        @pool.start
        interrupter.start
        start_task_end_relay
        self
      end

      # Seconds a stop waits for in-flight steps before handing them back.
      def shutdown_timeout
        value = @config.fetch(:shutdown_timeout) { @config["shutdown_timeout"] }
        value.nil? ? DEFAULT_SHUTDOWN_TIMEOUT : Float(value)
      end

      # Whether this launcher's worker runs in this process (false in a forked child).
      def owned?
        @pid == Process.pid
      end

      def quiet?
        @quiet
      end

      # Start no new step ("quiet", Sidekiq's TSTP): steps queued for this process go back to the
      # backend (other workers may take them), running ones finish, tasks can still be created.
      def quiet!
        return false if @quiet

        TaskerCore::FFI.quiet_worker
        @quiet = true
        logger.info("quiet: no new steps start until resumed (SIGCONT)",
                    steps_in_flight: TaskerCore::FFI.worker_status[:steps_in_flight])
        true
      end

      def resume!
        return false unless @quiet

        TaskerCore::FFI.resume_worker
        @quiet = false
        logger.info("resumed: steps start again")
        true
      end

      # Nothing new starts; in-flight steps get until `timeout` seconds from now to finish. Past
      # it, each step still running is handed back (on PostgreSQL another worker takes it) and
      # TaskerCore::Shutdown (an Interrupt) is raised into its handler, never Thread#kill: an open
      # transaction rolls back instead of committing, ensure blocks run. Then the engine stops.
      # Returns {interrupted:, handed_back:, abandoned:}: handlers still running at the deadline,
      # steps handed back, handlers that went on running even after TaskerCore::Shutdown.
      def stop(timeout: shutdown_timeout)
        deadline = now + timeout
        begin_drain
        interrupted = @pool ? @pool.stop(deadline, grace: HARD_STOP_GRACE) : 0
        stop_engine
        interrupter.stop
        @task_end_relay&.stop
        { interrupted: interrupted, handed_back: @pool&.handed_back || 0, abandoned: @pool&.abandoned || 0 }
      ensure
        @pool = nil
        unsubscribe
        EventBridge.instance.stop!
      end

      # Forget a worker inherited through fork: its threads do not exist in this process.
      def forget
        @pool = nil
        @subscription = nil
      end

      def status
        TaskerCore::FFI.worker_status.merge(
          quiet: @quiet,
          event_bridge_active: EventBridge.instance.active?,
          handler_registry_size: Registry::HandlerRegistry.instance.handlers.size,
          handler_threads_alive: @pool ? @pool.alive_count : 0
        )
      end

      # A runaway handler keeps its thread until it returns; a new thread keeps `concurrency`
      # handlers available meanwhile, and the runaway's thread leaves once its step is done.
      def retire_thread(thread)
        @pool&.retire(thread)
      end

      private

      def now
        Process.clock_gettime(Process::CLOCK_MONOTONIC)
      end

      def subscriber
        @subscriber ||= StepExecutionSubscriber.new(logger: logger, interrupter: interrupter)
      end

      def interrupter
        @interrupter ||= StepInterrupter.new(logger: logger, on_runaway: method(:retire_thread))
      end

      # Task events (task.completed ...) reach EventBridge subscribers through this thread; the
      # engine announces task ends only while something subscribes to them.
      def start_task_end_relay
        @task_end_relay = TaskEndRelay.new(logger: logger).start
        EventBridge.instance.announce_task_ends
      end

      # One subscription at most, whatever happened to the last one: a start after a stop that
      # failed half-way must not leave two subscribers (each step would run twice).
      def subscribe
        unsubscribe
        # Subscribe with a Proc we keep: `subscribe` returns the bridge (dry-events' API), and
        # only the Proc itself identifies the subscription for `unsubscribe`.
        @subscription = proc { |event| subscriber.call(event) }
        EventBridge.instance.subscribe_to_step_execution(&@subscription)
      end

      def unsubscribe
        EventBridge.instance.unsubscribe(@subscription) if @subscription
        @subscription = nil
      end

      def begin_drain
        TaskerCore::FFI.transition_to_graceful_shutdown
      rescue TaskerCore::WorkerNotInitializedError
        nil
      rescue StandardError => e
        logger.error("starting the drain failed", error: e.class.name, message: e.message.to_s)
      end

      def stop_engine
        TaskerCore::FFI.stop_worker
      rescue TaskerCore::WorkerNotInitializedError
        nil
      rescue StandardError => e
        logger.error("stopping the engine failed", error: e.class.name, message: e.message.to_s)
      end

      def dispatch(bridge, event)
        bridge.dispatch_step_execution(event)
      rescue SignalException, SystemExit
        raise
      rescue Exception => e # rubocop:disable Lint/RescueException
        # A listener raised: report it and keep the thread (the step itself was completed or times out).
        logger.error("subscriber raised", error: e.class.name, message: e.message.to_s)
        bridge.publish_bridge_error(e, event_id: event[:event_id])
      end
    end
  end
end
