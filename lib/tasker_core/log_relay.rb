# frozen_string_literal: true

require "logger"

module TaskerCore
  # `log_output: "rails"`: the engine's log lines (and the handlers', which go through the same
  # stream) written to a Ruby logger, Rails.logger in a Rails app.
  #
  # Lines are made on the engine's threads, which never call Ruby: they wait in a bounded queue
  # (10,000 lines) that this relay's own Ruby thread empties into the logger. A slow logger never
  # holds up the engine: when the queue is full, new lines are dropped and counted in
  # TaskerCore::FFI.dropped_log_lines.
  class LogRelay
    SEVERITIES = { "TRACE" => ::Logger::DEBUG, "DEBUG" => ::Logger::DEBUG, "INFO" => ::Logger::INFO,
                   "WARN" => ::Logger::WARN, "ERROR" => ::Logger::ERROR }.freeze
    LEVEL = /\b(TRACE|DEBUG|INFO|WARN|ERROR)\b/
    PROGNAME = "tasker_core"
    # Lines taken at a time, and how long a take waits before it looks at `stop` again.
    BATCH = 500
    WAIT = 0.5

    @lock = Mutex.new
    @current = nil

    class << self
      # Relay lines to `logger` from now on (replacing a relay started before). @return [LogRelay]
      def start(logger)
        @lock.synchronize do
          @current&.stop
          @current = new(logger).tap(&:start)
        end
      end

      # Write out what is queued and stop relaying. Idempotent.
      def stop
        @lock.synchronize do
          @current&.stop
          @current = nil
        end
      end

      def current
        @lock.synchronize { @current }
      end
    end

    def initialize(logger)
      @logger = logger
      @stopping = false
      @pid = Process.pid
      # Takes until `stop` (an empty take, after WAIT, looks at `@stopping` again).
      @relay = RelayThread.new("tasker-log-relay", take: -> { FFI.take_log_lines(BATCH, WAIT) unless @stopping },
                                                   on_error: method(:relay_failed)) { |lines| write_all(lines) }
    end

    def start
      @relay.start
      # A relay of a parent process does not run in a forked child: start one there if needed.
      at_exit { stop if @pid == Process.pid }
      self
    end

    def alive?
      @relay.alive?
    end

    # Flush the engine's writer into the queue, then write every queued line before returning.
    def stop
      return unless @relay.thread && @pid == Process.pid

      @stopping = true
      @relay.join(5)
      FFI.flush_logs
      loop do
        lines = FFI.take_log_lines(BATCH, 0)
        break if lines.empty?

        write_all(lines)
      end
    end

    private

    def relay_failed(error)
      warn "tasker_core: the log relay to #{@logger.class} stopped: #{error.class}: #{error.message}"
    end

    def write_all(lines)
      lines.each do |line|
        severity = SEVERITIES.fetch(line[LEVEL, 1], ::Logger::INFO)
        @logger.add(severity, line, PROGNAME)
      end
    end
  end
end
