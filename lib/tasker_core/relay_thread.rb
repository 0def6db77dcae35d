# frozen_string_literal: true

module TaskerCore
  # The Ruby thread behind each relay from the engine to Ruby (Worker::StepInterrupter,
  # Worker::TaskEndRelay, LogRelay). Engine threads never call Ruby: they queue what Ruby must
  # see, and this thread takes it with `take` (an FFI call that waits with the GVL released) and
  # hands each answer to the block, until `take` answers nil (the engine has stopped and handed
  # out everything it queued, or the owner asked `take` to end).
  #
  # The block gets every answer but nil: an item, or what `take` answers when its wait ran out
  # with nothing (false, []), so the owner can also do periodic work there.
  class RelayThread
    # The running thread; nil before `start` and after `join` / `stop`.
    attr_reader :thread

    # @param name [String] the thread's name
    # @param take [Proc] the engine's next answer; nil ends the thread
    # @param on_error [Proc, nil] given, a StandardError raised by `take` or the block ends the
    #   thread and is passed to it (other exceptions are reported as Thread.report_on_exception
    #   says); without it, any exception ends the thread and is reported (report_on_exception)
    def initialize(name, take:, on_error: nil, &handle)
      @name = name
      @take = take
      @on_error = on_error
      @handle = handle
    end

    def start
      # Named before it runs and as soon as `start` returns.
      @thread = Thread.new do
        Thread.current.name = @name
        Thread.current.report_on_exception = true unless @on_error
        run
      end
      @thread.name = @name
      self
    end

    def alive?
      @thread&.alive? || false
    end

    # Waits up to `timeout` seconds for the thread to leave, then forgets it. Raises what
    # Thread#join raises (the exception that ended the thread, an interrupt of the caller).
    def join(timeout)
      @thread&.join(timeout)
      @thread = nil
    end

    # `join` that never raises.
    def stop(timeout)
      join(timeout)
    rescue Exception # rubocop:disable Lint/RescueException
      @thread = nil
    end

    private

    def run
      loop do
        answer = @take.call
        break if answer.nil?

        @handle.call(answer)
      end
    rescue StandardError => e
      raise unless @on_error

      @on_error.call(e)
    end
  end
end
