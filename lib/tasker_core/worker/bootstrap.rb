# frozen_string_literal: true

module TaskerCore
  module Worker
    # Starts and stops the worker: the Rust engine (TaskerCore::FFI), the EventBridge
    # subscription, and the `concurrency` Ruby threads that take steps from the engine.
    #
    #   TaskerCore::Worker::Bootstrap.start!(templates: "config/tasks", concurrency: 8)
    #   ...
    #   TaskerCore::Worker::Bootstrap.instance.shutdown!
    #
    # INT and TERM shut down gracefully (in-flight steps finish) and then exit; so does at_exit.
    class Bootstrap
      include Singleton

      SIGNALS = %w[INT TERM].freeze

      attr_reader :logger, :config

      def self.start!(config = {})
        instance.start!(config)
      end

      def initialize
        @logger = TaskerCore::Logger.new("tasker_core")
        @mutex = Mutex.new
        @status = :stopped
        @threads = []
        @shutdown_handlers = []
        @hooks_installed = false
      end

      def start!(config = {})
        @mutex.synchronize do
          raise WorkerBootstrapError, "worker already running: call shutdown! first" if @status == :running

          HandlerValidation.validate!(config)
          @config = config.dup
          EventBridge.instance.start!
          # Subscribe with a Proc we keep: `subscribe` returns the bridge (dry-events' API), and
          # only the Proc itself identifies the subscription for `unsubscribe`.
          @subscription = proc { |event| subscriber.call(event) }
          EventBridge.instance.subscribe_to_step_execution(&@subscription)
          begin
            result = TaskerCore::FFI.bootstrap_worker(@config)
          rescue Exception # rubocop:disable Lint/RescueException
            EventBridge.instance.unsubscribe(@subscription)
            raise
          end
          @threads = Array.new(result.fetch(:concurrency)) { |i| start_thread(i) }
          interrupter.start
          install_hooks
          @status = :running
          logger.info("worker started", worker_id: result[:worker_id], concurrency: @threads.size)
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
          handler_threads_alive: @threads.count(&:alive?)
        )
      end

      # Graceful and idempotent: nothing new starts, in-flight steps finish and are recorded,
      # handler threads leave, on_shutdown hooks run.
      def shutdown!
        # From a handler thread the drain would wait for this very step: hand it off instead.
        return Thread.new { shutdown! } && nil if @threads.include?(Thread.current)

        @mutex.synchronize do
          return false unless @status == :running

          @status = :shutting_down
          stop_engine
          @threads.each { |t| t.join(5) || t.kill }
          @threads = []
          EventBridge.instance.unsubscribe(@subscription) if @subscription
          @subscription = nil
          EventBridge.instance.stop!
          @status = :stopped
        end
        run_shutdown_handlers
        true
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

      # A runaway handler keeps its thread until it returns; a new thread keeps `concurrency`
      # handlers available meanwhile, and the runaway's thread leaves once its step is done.
      def retire_thread(thread)
        @mutex.synchronize do
          return unless @status == :running && @threads.include?(thread)

          thread[:tasker_retired] = true
          @threads.delete(thread)
          @threads << start_thread(@threads.size)
        end
      end

      def stop_engine
        TaskerCore::FFI.transition_to_graceful_shutdown
        TaskerCore::FFI.stop_worker
      rescue TaskerCore::WorkerNotInitializedError
        nil
      end

      # Each thread waits inside Rust with the GVL released; `nil` means the worker stopped.
      def start_thread(index)
        bridge = EventBridge.instance
        thread = Thread.new do
          # Step interrupts (timeouts, cancels) may only land inside a handler: StepInterrupter#guard
          # opens that window and discards one that arrives as the handler returns.
          Thread.handle_interrupt(StepInterruption => :never) do
            # nil: the worker is stopping, leave. false (a wait cut short with nothing: Thread#wakeup,
            # a signal, any interrupt that raises nothing) must not end the loop: `while (event = ...)`
            # would, and the pool would shrink one thread at a time.
            loop do
              event = TaskerCore::FFI.next_step_event
              break if event.nil?
              next unless event

              dispatch(bridge, event)
              break if Thread.current[:tasker_retired]
            end
          end
        end
        # Named here, not inside the thread, so the name is there as soon as start! returns.
        thread.name = "tasker-handler-#{index}"
        thread.report_on_exception = true
        thread
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
        at_exit { shutdown! }
      end
    end
  end
end
