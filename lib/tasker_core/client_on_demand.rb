# frozen_string_literal: true

module TaskerCore
  # A process whose tasks run in worker processes elsewhere (a web process, a console): the first
  # task call (create_task, task_status, ... and so Active Job's perform_later) connects a
  # TaskerCore::Client to the workers' PostgreSQL database, and later calls use it. A process that
  # starts a worker itself (bin/rails tasker:worker) uses its worker and never connects.
  #
  # Connecting on first use rather than at boot keeps processes that never create a task (rake
  # tasks, asset builds, a preforking server's parent) off the database, and a child forked from a
  # connected parent connects again on its own first call.
  #
  # Enabled by the Railtie for config.tasker_core.client_only; elsewhere:
  #   TaskerCore::ClientOnDemand.enable(database_url: ENV["DATABASE_URL"])
  module ClientOnDemand
    @lock = Mutex.new
    @settings = nil
    @client = nil

    class << self
      # @param settings [Hash] Client.connect's (database_url:, log_level:, ...)
      def enable(settings)
        settings = settings.to_h.transform_keys(&:to_sym)
        @lock.synchronize { @settings = settings.freeze }
        TaskerCore.singleton_class.prepend(Hook) unless TaskerCore.singleton_class.include?(Hook)
        self
      end

      def disable
        @lock.synchronize do
          @settings = nil
          @client&.close
          @client = nil
        end
      end

      def enabled?
        !@settings.nil?
      end

      # The connected client of this process, connecting it if needed; nil when this process runs
      # a worker (or the client it connected is still connected).
      def connect_if_needed
        return unless needed?

        @lock.synchronize do
          return if @client&.connected? || FFI.worker_status[:running]

          settings = @settings.dup
          @client = Client.connect(database_url: settings.delete(:database_url) || ENV.fetch("DATABASE_URL", nil),
                                   **settings)
        end
      end

      attr_reader :client

      private

      def needed?
        # Test mode answers task calls itself (no engine, no database).
        return false if @settings.nil? || (defined?(Testing) && Testing.enabled?)

        !@client&.connected?
      end
    end

    # Connects before each task call of TaskerCore while enabled.
    module Hook
      %i[create_task create_tasks task_status wait_for_task wait_for_tasks cancel_task retry_task tasks].each do |name|
        define_method(name) do |*args, **kwargs|
          ClientOnDemand.connect_if_needed
          super(*args, **kwargs)
        end
      end
    end
  end
end
