# frozen_string_literal: true

module TaskerCore
  module Middleware
    # Code run around every handler call, on a worker and in test mode: APM spans, tenant
    # switching, Rails' executor. Sidekiq's server-middleware convention:
    #
    #   class Timing
    #     def call(step_event)
    #       started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
    #       yield
    #     ensure
    #       StatsD.timing("step", Process.clock_gettime(Process::CLOCK_MONOTONIC) - started)
    #     end
    #   end
    #   TaskerCore.configure { |c| c.handler_middleware.add(Timing) }
    #
    # `step_event` is the step execution event ({event_id:, task_uuid:, step_uuid:,
    # task_sequence_step:}). Each middleware is a class, instantiated with the arguments given to
    # `add` for every step (so it may keep per-step state in instance variables). The first added
    # is the outermost. What a middleware returns is ignored: the step's outcome is the handler's.
    #
    # - A middleware that raises fails the step as the handler raising the same error would
    #   (RetryableError retries, PermanentError does not, ...); the worker goes on.
    # - A middleware that returns without yielding fails the step at once, not retried, with a
    #   TaskerCore::PermanentError naming the middleware: the handler never ran, and the step must
    #   not pass as complete with no result. Raise RetryableError to have it run again later.
    # - The handler's class is resolved inside the chain, so a middleware that reloads code
    #   (Rails' reloader) runs the freshly loaded class.
    #
    # Changing the chain while a worker runs is safe: a step uses the chain as it was when the step
    # started.
    class Chain
      include Enumerable

      # One middleware class and the arguments it is built with.
      Entry = Struct.new(:klass, :args) do
        def make_new
          klass.new(*args)
        end
      end

      def initialize
        @mutex = Mutex.new
        @entries = [].freeze
      end

      # Append `klass` (built with `args` for each step); one that is already there is moved to
      # the end with the new arguments.
      def add(klass, *args)
        validate!(klass)
        update { |entries| entries.reject { |e| e.klass == klass } << Entry.new(klass, args) }
        self
      end

      # Put `klass` first (outermost).
      def prepend(klass, *args)
        validate!(klass)
        update { |entries| [Entry.new(klass, args)] + entries.reject { |e| e.klass == klass } }
        self
      end

      def remove(klass)
        update { |entries| entries.reject { |e| e.klass == klass } }
        self
      end

      # Insert `new_klass` just outside `old_klass` (or last if `old_klass` is not in the chain).
      def insert_before(old_klass, new_klass, *args)
        insert(old_klass, new_klass, args, 0)
      end

      # Insert `new_klass` just inside `old_klass` (or last if `old_klass` is not in the chain).
      def insert_after(old_klass, new_klass, *args)
        insert(old_klass, new_klass, args, 1)
      end

      def exists?(klass)
        @entries.any? { |e| e.klass == klass }
      end
      alias include? exists?

      def clear
        update { [] }
        self
      end

      def empty?
        @entries.empty?
      end

      def size
        @entries.size
      end

      # The middleware classes, outermost first.
      def each(&)
        @entries.map(&:klass).each(&)
      end

      def entries
        @entries.dup
      end

      # Run the block (the handler call) inside every middleware, outermost first; returns the
      # block's value.
      # @raise [TaskerCore::PermanentError] when a middleware returns without yielding
      def invoke(step_event, &handler)
        entries = @entries
        return yield if entries.empty?

        traverse(entries.map(&:make_new), 0, step_event, handler)
      end

      private

      def traverse(chain, index, step_event, handler)
        return handler.call if index == chain.size

        middleware = chain[index]
        yielded = false
        value = nil
        middleware.call(step_event) do
          yielded = true
          value = traverse(chain, index + 1, step_event, handler)
        end
        return value if yielded

        raise TaskerCore::PermanentError,
              "handler middleware #{middleware.class} returned without yielding: the step's handler was not " \
              "called (raise TaskerCore::RetryableError from the middleware to run the step again later)"
      end

      def insert(old_klass, new_klass, args, offset)
        validate!(new_klass)
        update do |entries|
          rest = entries.reject { |e| e.klass == new_klass }
          at = rest.index { |e| e.klass == old_klass }
          entry = Entry.new(new_klass, args)
          at ? rest.insert(at + offset, entry) : rest << entry
        end
        self
      end

      def update
        @mutex.synchronize { @entries = yield(@entries.dup).freeze }
      end

      def validate!(klass)
        return if klass.is_a?(Class) && klass.method_defined?(:call)

        raise ArgumentError, "handler middleware must be a Class defining call(step_event) { yield }, " \
                             "got #{klass.inspect}"
      end
    end
  end
end
