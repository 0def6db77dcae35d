# frozen_string_literal: true

module TaskerCore
  module Worker
    # The worker of this process, for embedding it in an application:
    #
    #   TaskerCore::Worker::Bootstrap.start!(templates: "config/tasks", concurrency: 8)
    #   ...
    #   TaskerCore::Worker::Bootstrap.instance.shutdown!
    #
    # The work is done by a Launcher (engine, subscription, handler threads); this singleton adds
    # what an embedding process needs around it:
    # - INT and TERM start a drain, then call the handlers installed before (Ruby's default ends
    #   the process; see SignalHandlers). `install_signal_handlers: false` leaves signals alone.
    # - at_exit drains the worker (in-flight steps finish within `shutdown_timeout`).
    # - fork: a child sees no worker (`running?` false) and may start its own; the parent's is
    #   untouched. With Puma, start it in `on_worker_boot` (see docs/deployment.md).
    class Bootstrap
      include Singleton

      attr_reader :logger, :config

      def self.start!(config = {})
        instance.start!(config)
      end

      def initialize
        @logger = TaskerCore::Logger.new("tasker_core")
        @mutex = Mutex.new
        @launcher = nil
        @stopping = false
        @shutdown_handlers = []
        @at_exit_installed = false
      end

      def start!(config = {})
        @mutex.synchronize do
          forget_inherited_worker
          raise WorkerBootstrapError, "worker already running: call shutdown! first" if @launcher

          HandlerValidation.validate!(config)
          @config = config.dup
          launcher = Launcher.new(@config, logger: logger).start
          @launcher = launcher
          install_hooks
          logger.info("worker started", worker_id: launcher.worker_id, concurrency: launcher.pool.concurrency)
        end
        self
      end

      # Whether a worker started by this process runs (false in a forked child of it).
      def running?
        launcher = @launcher
        !launcher.nil? && launcher.owned? && !@stopping && TaskerCore::FFI.worker_status[:running] == true
      end

      # The handler threads (see HandlerPool: dead ones are replaced, a runaway one can be retired).
      def pool
        launcher = own_launcher
        launcher&.pool
      end

      # Rust's status merged with the Ruby side's.
      def status
        launcher = own_launcher
        return launcher.status if launcher

        TaskerCore::FFI.worker_status.merge(
          quiet: false, event_bridge_active: EventBridge.instance.active?,
          handler_registry_size: Registry::HandlerRegistry.instance.handlers.size, handler_threads_alive: 0
        )
      end

      # Start no new step until #resume! (what SIGTSTP does to the worker command). Running
      # steps finish; steps queued for this process go back (to other workers on PostgreSQL).
      def quiet!
        launcher = own_launcher or raise WorkerNotInitializedError, "no worker running: call start! first"
        launcher.quiet!
      end

      def resume!
        launcher = own_launcher or raise WorkerNotInitializedError, "no worker running: call start! first"
        launcher.resume!
      end

      def quiet?
        own_launcher&.quiet? || false
      end

      # Graceful and idempotent: nothing new starts, in-flight steps get `timeout` seconds
      # (default: the `shutdown_timeout` config key, 30) to finish; past it their steps are handed
      # back and TaskerCore::Shutdown is raised into their handlers. Handler threads leave,
      # on_shutdown hooks run. Always completes: whatever fails on the way is logged, and the
      # worker ends stopped, unsubscribed, with its hooks run. Returns whether a worker stopped.
      def shutdown!(timeout: nil)
        # From a handler thread the drain would wait for this very step: hand it off instead.
        return Thread.new { shutdown!(timeout: timeout) } && nil if pool&.include?(Thread.current)

        stopped = Thread.handle_interrupt(Object => :never) do
          @mutex.synchronize { stop_locked(timeout) }
        end
        run_shutdown_handlers if stopped
        !stopped.nil?
      end

      # What the last shutdown! did: {handed_back:, abandoned:, final_status:} (nil before one).
      attr_reader :last_stop

      def on_shutdown(&block)
        raise ArgumentError, "on_shutdown needs a block" unless block

        @mutex.synchronize { @shutdown_handlers << block }
        self
      end

      private

      # The launcher if its worker is this process's (a forked child's is the parent's).
      def own_launcher
        launcher = @launcher
        launcher if launcher&.owned?
      end

      # Called with @mutex held and interrupts deferred. Returns the stop's summary, or nil if no
      # worker of this process was running.
      def stop_locked(timeout)
        forget_inherited_worker
        launcher = @launcher
        return nil unless launcher

        @stopping = true
        begin
          stopped = launcher.stop(timeout: timeout || launcher.shutdown_timeout)
          @last_stop = stopped.merge(final_status: TaskerCore::FFI.last_stopped_status)
        rescue StandardError => e
          logger.error("shutdown failed", error: e.class.name, message: e.message.to_s)
          @last_stop = { handed_back: 0, abandoned: 0, final_status: nil }
        ensure
          @launcher = nil
          @stopping = false
        end
        @last_stop
      end

      # A forked child inherits this object but not the worker: forget it (its threads do not
      # exist here, and the engine's handle is the parent's), run nothing. Called with @mutex held.
      def forget_inherited_worker
        return if @launcher.nil? || @launcher.owned?

        @launcher.forget
        @launcher = nil
        @stopping = false
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
        flag = @config.fetch(:install_signal_handlers) { @config["install_signal_handlers"] }
        SignalHandlers.install(self) unless flag == false
        return if @at_exit_installed

        @at_exit_installed = true
        # Only in the process that started the worker: a forked child that exits has no worker to
        # stop (own_launcher is nil there unless the child started its own).
        at_exit { shutdown! if own_launcher }
      end
    end
  end
end
