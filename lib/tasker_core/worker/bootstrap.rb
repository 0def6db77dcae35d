# frozen_string_literal: true

module TaskerCore
  module Worker
    # Starts and stops the worker: the Rust engine (TaskerCore::FFI), the EventBridge
    # subscription, and the HandlerPool of `concurrency` Ruby threads that take steps from the engine.
    #
    #   TaskerCore::Worker::Bootstrap.start!(templates: "config/tasks", concurrency: 8)
    #   ...
    #   TaskerCore::Worker::Bootstrap.instance.shutdown!
    #
    # INT and TERM shut down gracefully (in-flight steps finish) and then exit; so does at_exit.
    class Bootstrap
      include Singleton

      SIGNALS = %w[INT TERM].freeze

      # How long shutdown! waits for handler threads to leave once the engine has stopped.
      SHUTDOWN_JOIN_SECONDS = 5

      attr_reader :logger, :config
      # The handler threads (see HandlerPool: dead ones are replaced, a runaway one can be retired).
      attr_reader :pool

      def self.start!(config = {})
        instance.start!(config)
      end

      def initialize
        @logger = TaskerCore::Logger.new("tasker_core")
        @mutex = Mutex.new
        @status = :stopped
        @pool = nil
        @shutdown_handlers = []
        @hooks_installed = false
        @owner_pid = nil
      end

      def start!(config = {})
        @mutex.synchronize do
          raise WorkerBootstrapError, "worker already running: call shutdown! first" if @status == :running

          HandlerValidation.validate!(config)
          @config = config.dup
          EventBridge.instance.start!
          subscribe
          begin
            result = TaskerCore::FFI.bootstrap_worker(@config)
          rescue Exception # rubocop:disable Lint/RescueException
            unsubscribe
            raise
          end
          @owner_pid = Process.pid
          @pool = HandlerPool.new(concurrency: result.fetch(:concurrency), logger: logger) do |event|
            dispatch(EventBridge.instance, event)
          end
          @pool.start
          interrupter.start
          start_task_end_relay
          install_hooks
          @status = :running
          logger.info("worker started", worker_id: result[:worker_id], concurrency: @pool.concurrency)
        end
        self
      end

      def running?
        @status == :running && TaskerCore::FFI.worker_status[:running] == true
      end

      # Rust's status merged with the Ruby side's.
      def status
        TaskerCore::FFI.worker_status.merge(
          event_bridge_active: EventBridge.instance.active?,
          handler_registry_size: Registry::HandlerRegistry.instance.handlers.size,
          handler_threads_alive: @pool ? @pool.alive_count : 0
        )
      end

      # Graceful and idempotent: nothing new starts, in-flight steps finish and are recorded,
      # handler threads leave, on_shutdown hooks run. Always completes: whatever fails on the way is
      # logged, and the worker ends :stopped, unsubscribed, with its hooks run.
      def shutdown!(timeout: SHUTDOWN_JOIN_SECONDS)
        # From a handler thread the drain would wait for this very step: hand it off instead.
        return Thread.new { shutdown!(timeout: timeout) } && nil if @pool&.include?(Thread.current)
        # A forked child inherits this object but not the worker: forget it, run nothing.
        return forget_inherited_worker if @owner_pid && @owner_pid != Process.pid

        stopped = Thread.handle_interrupt(Object => :never) do
          @mutex.synchronize { stop_everything(timeout) }
        end
        run_shutdown_handlers if stopped
        stopped
      end

      def on_shutdown(&block)
        raise ArgumentError, "on_shutdown needs a block" unless block

        @mutex.synchronize { @shutdown_handlers << block }
        self
      end

      private

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

      # A runaway handler keeps its thread until it returns; a new thread keeps `concurrency`
      # handlers available meanwhile, and the runaway's thread leaves once its step is done.
      def retire_thread(thread)
        @pool&.retire(thread)
      end

      # One subscription at most, whatever happened to the last one: a start! after a shutdown! that
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

      # Called with @mutex held and interrupts deferred. Returns whether a running worker was stopped.
      def stop_everything(timeout)
        return false unless @status == :running

        @status = :shutting_down
        begin
          stop_engine
          @pool&.stop(Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout)
          interrupter.stop
          @task_end_relay&.stop
        ensure
          @pool = nil
          unsubscribe
          EventBridge.instance.stop!
          @status = :stopped
        end
        true
      end

      def stop_engine
        TaskerCore::FFI.transition_to_graceful_shutdown
        TaskerCore::FFI.stop_worker
      rescue TaskerCore::WorkerNotInitializedError
        nil
      rescue StandardError => e
        logger.error("stopping the engine failed", error: e.class.name, message: e.message.to_s)
      end

      def forget_inherited_worker
        @mutex.synchronize do
          @status = :stopped
          @pool = nil
          @subscription = nil
          @owner_pid = nil
        end
        false
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

      def run_shutdown_handlers
        handlers = @mutex.synchronize { @shutdown_handlers.dup }
        handlers.each do |handler|
          handler.call
        rescue StandardError => e
          logger.error("on_shutdown hook raised", error: e.class.name, message: e.message.to_s)
        end
      end

      def install_hooks
        return if @hooks_installed

        @hooks_installed = true
        SIGNALS.each do |signal|
          # Trap context may not take a Mutex: shut down on a thread, then exit from the main thread.
          Signal.trap(signal) do
            Thread.new do
              shutdown!
              Thread.main.raise(SystemExit.new(0, "tasker_core: exiting after SIG#{signal}"))
            end
          end
        end
        # Only in the process that started the worker: a forked child that exits has no worker to stop.
        at_exit { shutdown! if @owner_pid == Process.pid }
      end
    end
  end
end
