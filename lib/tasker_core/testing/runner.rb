# frozen_string_literal: true

module TaskerCore
  module Testing
    # Time as test mode sees it: the wall clock plus the backoff it skipped. A retry due in 30 s
    # moves this clock 30 s ahead at once instead of sleeping, so step timestamps still show the
    # delay a worker would have waited.
    class Clock
      # @return [Float] seconds skipped so far
      attr_reader :skipped

      def initialize
        @skipped = 0.0
      end

      # Monotonic seconds (for due times).
      def monotonic
        Process.clock_gettime(Process::CLOCK_MONOTONIC) + @skipped
      end

      def time
        Time.now + @skipped
      end

      # Jump to `due` (a #monotonic reading) if it is still ahead.
      def advance_to(due)
        ahead = due - monotonic
        @skipped += ahead if ahead.positive?
      end
    end

    # Runs one Testing::Task to its end in the calling thread, with the engine's rules (the memory
    # backend, ext/tasker_worker/src/backend/memory.rs, whose names this class keeps): steps start
    # in dependency order; the steps ready together start together, as on a worker with
    # `concurrency` handler threads (one after another here), and each one's outcome is recorded as
    # it returns; a failed attempt is retried after `retry_after` or the template's backoff (skipped
    # on the Clock, never slept) while attempts remain; a step that fails for good ends the task
    # `error`, and the steps that had not started become `skipped`.
    class Runner
      # The engine's cap on `retry_after` (one year).
      MAX_RETRY_AFTER = 365 * 24 * 3600.0

      # What a failed attempt tells the engine.
      Failure = Struct.new(:retryable, :retry_after, :message, :metadata, keyword_init: true)

      # @param attempt [#call] runs the current attempt of a step: (task, step) → [:completed,
      #   completion] or [:timed_out, message] (see Attempt)
      def initialize(task, clock:, concurrency:, attempt:)
        @task = task
        @clock = clock
        @concurrency = concurrency
        @attempt = attempt
        # A scheduled task's time has come when it runs (test mode does not wait for run_at).
        task.steps.each { |s| s.status = "enqueued" if s.status == "pending" && s.waiting_on.zero? && task.ending.nil? }
        @ready = task.steps.select { |step| step.status == "enqueued" }
        @retries = [] # [due (Clock#monotonic), sequence, step]
        @retry_seq = 0
      end

      def run
        while next_batch?
          batch = @ready.shift(@concurrency).select { |step| step.status == "enqueued" && @task.ending.nil? }
          batch.each { |step| claim(step) }
          # Claimed together, run in turn: a failure does not stop a step already started.
          batch.each { |step| record(step, @attempt.call(@task, step)) } # rubocop:disable Style/CombinableLoops
        end
        settle
        @task
      end

      class << self
        # The template's delay (seconds) before the attempt after `failed_attempt` (1-based), as
        # RetryPolicy::delay_after computes it.
        def backoff(policy, failed_attempt)
          base = policy[:backoff_base_ms]
          ms = case policy[:backoff]
               when "linear" then base * failed_attempt
               when "exponential" then base * (2**[failed_attempt - 1, 63].min)
               else 0
               end
          [ms, policy[:max_backoff_ms]].min / 1000.0
        end
      end

      private

      # Whether a step is ready, skipping the clock to the next retry when only retries are left.
      def next_batch?
        loop do
          promote_due_retries
          return true unless @ready.empty?
          return false if @retries.empty? || @task.ending

          @clock.advance_to(@retries.min.first)
        end
      end

      def promote_due_retries
        now = @clock.monotonic
        due, later = @retries.partition { |at, _, _| at <= now }
        @retries = later
        due.sort.each do |_, _, step|
          next unless @task.ending.nil? && step.status == "waiting_for_retry"

          step.status = "enqueued"
          @ready << step
        end
      end

      def claim(step)
        @task.status = "in_progress" if @task.status == "pending"
        step.status = "in_progress"
        step.attempts += 1
        step.started_at = @clock.time
        step.completed_at = nil
      end

      def record(step, outcome)
        step.completed_at = @clock.time
        kind, value = outcome
        if kind == :timed_out
          fail_attempt(step, Failure.new(retryable: true, message: value))
        elsif value[:success]
          succeed(step, value)
        else
          fail_attempt(step, Failure.new(retryable: value[:retryable], retry_after: value[:retry_after],
                                         message: value[:failure_message], metadata: value[:metadata]))
        end
      end

      def succeed(step, completion)
        step.status = "complete"
        step.result = completion[:result]
        step.metadata = completion[:metadata]
        step.error_message = nil
        return if @task.ending

        @task.dependents_of(step).each do |successor|
          successor.waiting_on -= 1
          next unless successor.waiting_on.zero? && successor.status == "pending"

          successor.status = "enqueued"
          @ready << successor
        end
      end

      def fail_attempt(step, failure)
        step.metadata = failure.metadata
        step.error_message = failure.message
        # The task is already ending: no retry; the attempt's failure is kept.
        return step.status = ended_step_status if @task.ending

        policy = step.definition[:retry]
        retryable = failure.retryable && policy[:retryable]
        used = step.attempts - step.attempts_base
        if retryable && used < policy[:max_attempts]
          schedule_retry(step, failure.retry_after || Runner.backoff(policy, used))
        else
          step.status = "error"
          step.error_message = "#{failure.message} (gave up after #{used} attempts)" if retryable
          halt("error")
        end
      end

      def ended_step_status
        @task.ending == "cancelled" ? "cancelled" : "error"
      end

      def schedule_retry(step, delay)
        step.status = "waiting_for_retry"
        @retry_seq += 1
        @retries << [@clock.monotonic + [delay, MAX_RETRY_AFTER].min, @retry_seq, step]
      end

      def halt(ending)
        @task.ending = ending unless @task.ending == "cancelled"
        @task.settle_unstarted(ending == "cancelled" ? "cancelled" : "skipped")
      end

      def settle
        return if @task.finished?

        status = @task.ending || (@task.steps.all? { |s| s.status == "complete" } ? "complete" : nil)
        return unless status

        @task.status = status
        @task.completed_at = @clock.time
      end
    end
  end
end
