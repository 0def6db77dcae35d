# frozen_string_literal: true

module TaskerCore
  module Worker
    # The Ruby threads that take steps from the engine (TaskerCore::FFI.next_step_event, which waits
    # inside Rust with the GVL released) and run them, kept at `concurrency` live threads:
    #
    # - a thread that dies (an exception escaped: a stray Thread#raise, Thread#kill, a bug) is logged
    #   at error with the exception and replaced;
    # - #retire(thread) stops reusing a thread after its current step and starts its replacement at
    #   once (for a handler that will not stop: its thread must not take another step);
    # - #stop(deadline) lets every thread leave (the engine must be draining: next_step_event then
    #   returns nil); past the deadline it hands their steps back and raises TaskerCore::Shutdown
    #   into the handlers still running (never Thread#kill), and never raises.
    #
    # Interrupts: a thread runs with every interrupt deferred (Thread.handle_interrupt) except at two
    # points: between steps, where nothing is held, and around the handler itself (see
    # StepExecutionSubscriber). So a step taken from the engine always reaches the subscriber; an
    # exception arriving while the bridge hands a step over makes the bridge give it back.
    class HandlerPool
      attr_reader :concurrency

      # `dispatch` is called with each event, on a pool thread; what it raises is its own business
      # (logged here, the thread is replaced).
      def initialize(concurrency:, logger:, name: "tasker-handler", &dispatch)
        raise ArgumentError, "HandlerPool needs a dispatch block" unless dispatch
        unless concurrency.is_a?(Integer) && concurrency.positive?
          raise ArgumentError, "concurrency must be a positive Integer, got #{concurrency.inspect}"
        end

        @concurrency = concurrency
        @logger = logger
        @name = name
        @dispatch = dispatch
        @mutex = Mutex.new
        @threads = []
        @retired = []
        @serial = 0
        @stopping = false
        @replacements = 0
      end

      def start
        @mutex.synchronize do
          @stopping = false
          @threads << spawn while @threads.size < @concurrency
        end
        self
      end

      # Threads that take steps (retired ones excluded).
      def threads
        @mutex.synchronize { @threads.dup }
      end

      def alive_count
        threads.count(&:alive?)
      end

      # Whether `thread` is one of the pool's (taking steps or retired and still finishing one).
      def include?(thread)
        @mutex.synchronize { @threads.include?(thread) || @retired.include?(thread) }
      end

      # How many threads were started to replace dead or retired ones.
      def replacements
        @mutex.synchronize { @replacements }
      end

      # Stop reusing `thread` after its current step, and start its replacement now. Returns the
      # replacement, or nil if `thread` is not a working thread of this pool or the pool is stopping.
      def retire(thread)
        @mutex.synchronize do
          next nil if @stopping || !@threads.delete(thread)

          @retired << thread
          thread[:tasker_retired] = true
          @replacements += 1
          replacement = spawn
          @threads << replacement
          replacement
        end
      end

      # Steps handed back and handlers that would not stop, at the last #stop.
      attr_reader :handed_back, :abandoned

      # Let the threads leave (the engine must be draining: next_step_event then returns nil),
      # waiting until `deadline` (Process::CLOCK_MONOTONIC seconds). Past it, each thread still
      # running a step has that step handed back to the engine (the attempt does not count; on
      # PostgreSQL another worker takes it) and TaskerCore::Shutdown raised into its handler,
      # Sidekiq's way: never Thread#kill, which would let an open transaction commit. Threads
      # get `grace` seconds more to leave; one still running then is left behind (logged).
      # Returns the number of threads that had to be interrupted. Never raises.
      def stop(deadline, grace: 2.0)
        all = @mutex.synchronize do
          @stopping = true
          @threads + @retired
        end
        # Idle threads wait in the engine for a step that will not come: wake them (the wait
        # answers false, and they see the pool stopping). A thread running a step is not woken:
        # that would cut a `sleep` in its handler short. The drain was requested before this, so
        # no thread starts a step from now on.
        all.each { |thread| wake_idle(thread) }
        busy = all.reject { |thread| join_until(thread, deadline) }
        @handed_back = busy.count { |thread| interrupt(thread) if thread[:tasker_step] }
        stubborn = busy.reject { |thread| join_until(thread, now + grace) }
        stubborn.each do |thread|
          @logger.error("handler ignored TaskerCore::Shutdown and is still running: left behind",
                        thread: thread.name, backtrace: Array(thread.backtrace).first(5))
        end
        @abandoned = stubborn.size
        busy.size
      ensure
        @mutex.synchronize do
          @threads.clear
          @retired.clear
        end
      end

      private

      def now
        Process.clock_gettime(Process::CLOCK_MONOTONIC)
      end

      # The step's name and attempt, from the event Hash (or its wrapper, once published).
      def step_fields(event)
        sequence = event && event[:task_sequence_step]
        step = sequence.respond_to?(:workflow_step) ? sequence.workflow_step : sequence&.dig(:workflow_step)
        return {} unless step

        step.is_a?(Hash) ? { step: step[:name], attempt: step[:attempts] } : { step: step.name, attempt: step.attempts }
      end

      def wake_idle(thread)
        thread.wakeup if thread[:tasker_step].nil? && thread.alive?
      rescue ThreadError
        nil # it ended meanwhile
      end

      # Hand back the step `thread` runs and raise TaskerCore::Shutdown into it. True if a step
      # was handed back.
      def interrupt(thread)
        event = thread[:tasker_step]
        handed = event ? TaskerCore::FFI.hand_back_step(event[:event_id]) : false
        step = step_fields(event)
        @logger.warn("shutdown deadline passed: #{handed ? "step handed back, " : ""}raising TaskerCore::Shutdown " \
                     "in its handler", thread: thread.name, task_uuid: event&.dig(:task_uuid), **step)
        thread.raise(TaskerCore::Shutdown, "worker shutting down: step handed back")
        handed
      rescue StandardError => e
        @logger.error("interrupting a handler at shutdown failed", thread: thread.name, error: e.class.name,
                                                                   message: e.message.to_s)
        false
      end

      # Thread#join re-raises what ended the thread: ours end normally, but never let join raise.
      def join_until(thread, deadline)
        !thread.join([deadline - now, 0].max).nil?
      rescue Exception # rubocop:disable Lint/RescueException
        true
      end

      # Called with @mutex held.
      def spawn
        # A new thread inherits the creator's interrupt mask: started deferred, so that no interrupt
        # can end it before its loop (and the ensure that replaces it) is set up.
        thread = Thread.handle_interrupt(Object => :never) { Thread.new { run } }
        # Named here, not inside the thread, so the name is there as soon as start returns.
        # tasker-handler-0 .. concurrency-1 first; replacements take the next numbers.
        thread.name = "#{@name}-#{@serial}"
        @serial += 1
        thread.report_on_exception = false
        thread
      end

      def run
        Thread.handle_interrupt(Object => :never) do
          left = false
          error = nil
          begin
            work
            left = true
          rescue TaskerCore::Shutdown
            # Raised by #stop past the deadline: the step was handed back; leave quietly.
            left = true
          rescue Exception => e # rubocop:disable Lint/RescueException
            error = e
          ensure
            # Runs with interrupts deferred too: a second Thread#raise cannot skip the replacement.
            ended(left, error)
          end
        end
      end

      def work
        until Thread.current[:tasker_retired] || @stopping
          # Between steps nothing is held: interrupts deferred since the last step arrive here.
          Thread.handle_interrupt(Object => :immediate) { nil } if Thread.pending_interrupt?
          # nil: the worker is stopping, leave. false: a wait cut short with nothing (Thread#wakeup, a
          # signal, an interrupt deferred here, a step handed back): go round again.
          event = TaskerCore::FFI.next_step_event
          break if event.nil?
          next unless event

          run_step(event)
        end
      end

      # What #stop needs to hand the step back and name it in the log, kept while it runs.
      def run_step(event)
        Thread.current[:tasker_step] = event
        @dispatch.call(event)
      ensure
        Thread.current[:tasker_step] = nil
      end

      # Every thread passes here on its way out. `left`: it left its loop (worker stopping, retired);
      # otherwise an exception or Thread#kill ended it, and a working thread is replaced.
      def ended(left, error)
        replaced = @mutex.synchronize { replace(Thread.current, died: !left) }
        return if left

        @logger.error("handler thread died#{"; replaced" if replaced}",
                      thread: Thread.current.name, error: error ? error.class.name : "killed",
                      message: error&.message.to_s, backtrace: Array(error&.backtrace).first(5))
      end

      # Called with @mutex held: forget `thread`; start another if it was a working thread that died.
      def replace(thread, died:)
        @retired.delete(thread)
        return false unless @threads.delete(thread) && died && !@stopping

        @replacements += 1
        @threads << spawn
        true
      end
    end
  end
end
