# frozen_string_literal: true

module TaskerCore
  module Registry
    # Maps a template's `handler.callable` to a handler class. Classes are registered explicitly
    # or found by constant name (autoload); lookups read frozen Hashes without locking.
    #
    # A class found by constant name is looked up again on every call (a constant lookup, well
    # under a microsecond), never cached: when code is reloaded (Rails' reloader, Zeitwerk, `load`)
    # the next step runs the new class. A class registered explicitly stays until unregistered.
    class HandlerRegistry
      include Singleton

      def initialize
        @mutex = Mutex.new
        @handlers = {}.freeze
        @autoloaded = {}.freeze
      end

      # @return [Hash{String => Class}] the handlers known so far: registered ones, and those found
      #   by constant name (as last resolved)
      def handlers
        @autoloaded.merge(@handlers)
      end

      def register(callable_name, klass)
        validate!(callable_name, klass)
        @mutex.synchronize { @handlers = @handlers.merge(callable_name.to_s => klass).freeze }
        klass
      end

      def unregister(callable_name)
        @mutex.synchronize do
          rest = @handlers.dup
          rest.delete(callable_name.to_s)
          @handlers = rest.freeze
        end
      end

      # @return [Class, nil] the handler class, or nil when no such constant exists
      def resolve(callable_name)
        name = callable_name.to_s
        @handlers[name] || autoload(name)
      end

      def registered?(callable_name)
        !resolve(callable_name).nil?
      end

      # Kept for seed compatibility: nothing to preload, handlers resolve lazily.
      def bootstrap_handlers!
        self
      end

      def clear!
        @mutex.synchronize do
          @handlers = {}.freeze
          @autoloaded = {}.freeze
        end
      end

      private

      def autoload(name)
        klass = Object.const_get(name)
        return nil unless handler_class?(klass)

        remember(name, klass) unless @autoloaded[name].equal?(klass)
        klass
      rescue NameError
        nil
      end

      def remember(name, klass)
        @mutex.synchronize { @autoloaded = @autoloaded.merge(name => klass).freeze }
      end

      def handler_class?(klass)
        klass.is_a?(Class) && klass.method_defined?(:call)
      end

      def validate!(callable_name, klass)
        raise ArgumentError, "callable name must be a non-empty String" if callable_name.to_s.empty?
        return if handler_class?(klass)

        raise ArgumentError, "#{klass.inspect} is not a handler class (a Class defining #call(task, sequence, step))"
      end
    end
  end
end
