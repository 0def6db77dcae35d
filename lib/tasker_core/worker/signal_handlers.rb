# frozen_string_literal: true

module TaskerCore
  module Worker
    # INT and TERM for a worker embedded in an application (Bootstrap.start! installs them unless
    # `install_signal_handlers: false`; the `tasker-worker` command has its own, see CLI).
    #
    # On INT or TERM the worker starts draining (no new step starts, in-flight ones finish), then
    # the handler that was installed before is called, as if the worker were not there: Ruby's
    # default raises Interrupt (INT) or SignalException (TERM) in the main thread, so a script
    # ends as usual (exit status 130 for Ctrl-C) and its at_exit waits for the drain; an app's own
    # trap runs as it did before. A signal the app ignored ("IGNORE") stays ignored.
    #
    # The trap itself only writes the signal's name to a pipe (nothing that takes a lock or
    # logs runs in trap context); a thread reads it and drains. In a forked child the traps only
    # chain until the child starts its own worker.
    class SignalHandlers
      SIGNALS = %w[INT TERM].freeze
      IGNORED = %w[IGNORE SIG_IGN].freeze

      class << self
        # Install (or, in a forked child, re-arm) the traps for `bootstrap`. Idempotent.
        def install(bootstrap)
          (@instance ||= new).arm(bootstrap)
        end

        # The handlers that were installed before ours (for specs and debugging).
        def previous
          @instance&.previous || {}
        end
      end

      attr_reader :previous

      def initialize
        @previous = {}
        @pid = nil
      end

      def arm(bootstrap)
        @bootstrap = bootstrap
        return self if @pid == Process.pid

        # A child inherits the parent's pipe and traps, but not its reading thread.
        @reader, @writer = IO.pipe
        @pid = Process.pid
        SIGNALS.each { |signal| trap(signal) unless @previous.key?(signal) }
        start_thread
        self
      end

      private

      def trap(signal)
        previous = Signal.trap(signal) { |signo| on_signal(signal, signo) }
        if IGNORED.include?(previous)
          Signal.trap(signal, previous)
          return
        end
        @previous[signal] = previous
      end

      # Runs in trap context: no lock, no logging, no blocking.
      def on_signal(signal, signo)
        @writer.write_nonblock("#{signal}\n", exception: false) if @pid == Process.pid
        chain(signal, signo)
      end

      def chain(signal, signo)
        previous = @previous[signal]
        return raise_default(signal) if previous.nil? || %w[DEFAULT SYSTEM_DEFAULT].include?(previous)
        return exit if previous == "EXIT"
        return unless previous.respond_to?(:call)

        previous.arity.zero? ? previous.call : previous.call(signo)
      end

      # As Ruby's own handler would: raised where the main thread was, without our frames.
      def raise_default(signal)
        where = caller.drop_while { |line| line.start_with?(__FILE__) }
        error = signal == "INT" ? Interrupt.new("") : SignalException.new(signal)
        error.set_backtrace(where)
        raise error
      end

      def start_thread
        reader = @reader
        thread = Thread.new do
          while (line = reader.gets)
            signal = line.chomp
            @bootstrap.logger.info("SIG#{signal}: stopping the worker (in-flight steps finish)")
            @bootstrap.shutdown!
          end
        end
        thread.name = "tasker-signals"
        thread.report_on_exception = true
      end
    end
  end
end
