# frozen_string_literal: true

module TaskerCore
  module Worker
    # Interrupts handlers whose attempt is over: the engine reports an attempt that outlived
    # `timeout_seconds` (or whose task was cancelled) through `FFI.next_step_interrupt`, and this
    # class raises `StepTimeoutError` (or `StepCancelledError`) in the thread running it, as
    # Temporal's Ruby SDK cancels an activity. Rust never touches a Ruby thread: one Ruby thread
    # (`#start`) waits for the engine's notices with the GVL released and raises.
    #
    # An exception raised with `Thread#raise` arrives whenever the target next checks interrupts,
    # so it must only ever land inside the handler: handler threads run with
    # `StepInterruption => :never` (see `Bootstrap`), `#guard` opens the window around the
    # handler alone, and an interrupt that arrives as the handler returns is discarded before the
    # thread moves on (it never hits the completion hand-off or the next step).
    class StepInterrupter
      # A handler still running this long after the interrupt was raised is a runaway: it rescued
      # the interrupt and went on. It is logged once and its thread is retired.
      RUNAWAY_AFTER = 2.0
      # How long a notice that arrived before its handler started is kept for it.
      EARLY_NOTICE_TTL = 60.0
      # How often the waiting thread wakes to look for runaways.
      CHECK_EVERY = 0.5

      # @param on_runaway [Proc] called with the runaway's thread (the pool retires it and starts a
      #   replacement)
      def initialize(logger:, on_runaway: nil)
        @logger = logger
        @on_runaway = on_runaway
        @lock = Mutex.new
        @running = {} # event_id => Thread running its handler
        @early = {}   # event_id => [notice, received at]: arrived before the handler started
        @raised = {}  # event_id => [Thread, notice, raised at]: waiting to see the handler return
        @relay = RelayThread.new("tasker-interrupter",
                                 take: -> { TaskerCore::FFI.next_step_interrupt(CHECK_EVERY) }) do |notice|
          deliver(notice) if notice # false: the wait ran out, time to look for runaways
          check_runaways
        end
      end

      # Runs the handler (the block) for `event_id`, interruptible by the engine's notice for it.
      def guard(event_id, &)
        thread = Thread.current
        early = @lock.synchronize do
          notice = @early.delete(event_id)&.first
          @running[event_id] = thread unless notice
          notice
        end
        # The attempt ended before the handler started: do not start it.
        raise error_for(early) if early

        begin
          Thread.handle_interrupt(StepInterruption => :immediate, &)
        ensure
          @lock.synchronize do
            @running.delete(event_id)
            @raised.delete(event_id)
          end
          discard_pending_interrupt
        end
      end

      # The thread that waits for the engine's notices (nil when not started).
      def thread = @relay.thread

      # Starts the thread that waits for the engine's notices; it ends when the worker stops.
      def start
        @relay.start
        self
      end

      # Waits for the thread to leave (it does once the engine has stopped: the wait for notices
      # then answers nil). Never raises.
      def stop(timeout = 2)
        @relay.stop(timeout)
      end

      # Handler threads currently inside `#guard` (for status and specs).
      def running
        @lock.synchronize { @running.dup }
      end

      private

      def deliver(notice)
        event_id = notice[:event_id]
        @lock.synchronize do
          thread = @running[event_id]
          if thread&.alive?
            thread.raise(error_for(notice))
            @raised[event_id] = [thread, notice, now]
          else
            prune_early
            @early[event_id] = [notice, now]
          end
        end
      end

      def check_runaways
        runaways = @lock.synchronize do
          due = @raised.select { |event_id, (thread, _, at)| now - at >= RUNAWAY_AFTER && @running[event_id] == thread }
          due.each_key { |event_id| @raised.delete(event_id) }
          due.values
        end
        runaways.each do |thread, notice, _|
          @logger.error("runaway handler: it rescued #{error_for(notice).class.name} and kept running; " \
                        "its thread is retired once it returns, a new thread takes its place",
                        task_uuid: notice[:task_uuid], step: notice[:step_name], attempt: notice[:attempt],
                        thread: thread.name)
          @on_runaway&.call(thread)
        end
      end

      def error_for(notice)
        if notice[:reason] == :cancelled
          StepCancelledError.new("task #{notice[:task_uuid]} was cancelled while step #{notice[:step_name]} " \
                                 "(attempt #{notice[:attempt]}) ran")
        else
          StepTimeoutError.new("step #{notice[:step_name]} (attempt #{notice[:attempt]}, task #{notice[:task_uuid]}) " \
                               "timed out after #{format("%g", notice[:timeout_seconds])}s")
        end
      end

      # An interrupt raised just as the handler returned is still queued for this thread; take
      # it now, while it cannot hit anything else. (Not `pending_interrupt?(StepInterruption)`:
      # with an argument it crashes Ruby 3.1.)
      def discard_pending_interrupt
        # At most one timeout and one cancel can be queued for one attempt.
        2.times do
          return unless Thread.pending_interrupt?

          begin
            Thread.handle_interrupt(StepInterruption => :immediate) { Thread.pass }
            return # what is pending is something else (the pool delivers it between steps)
          rescue StepInterruption
            next
          end
        end
      end

      def prune_early
        cutoff = now - EARLY_NOTICE_TTL
        @early.delete_if { |_, (_, at)| at < cutoff }
      end

      def now
        Process.clock_gettime(Process::CLOCK_MONOTONIC)
      end
    end
  end
end
