# frozen_string_literal: true

# What the workflow specs' handlers did, recorded from the handler threads.
module WorkflowRecorder
  # One handler invocation. Times are CLOCK_MONOTONIC seconds (the clock Rust's Instant uses).
  Execution = Struct.new(
    :task_uuid, :step_uuid, :name, :attempt, :started_at, :finished_at, :thread, :outcome,
    :task, :sequence, :step, :config,
    keyword_init: true
  )

  @mutex = Mutex.new
  @executions = []

  class << self
    def now
      Process.clock_gettime(Process::CLOCK_MONOTONIC)
    end

    def reset!
      @mutex.synchronize { @executions = [] }
    end

    # @return [Array<Execution>] a snapshot, in start order
    def executions
      @mutex.synchronize { @executions.dup }
    end

    def for_task(task_uuid)
      executions.select { |e| e.task_uuid == task_uuid }
    end

    def start(task, sequence, step, config)
      execution = Execution.new(
        task_uuid: task.task_uuid, step_uuid: step.step_uuid, name: step.name, attempt: step.attempts,
        started_at: now, thread: Thread.current, task: task, sequence: sequence, step: step, config: config
      )
      @mutex.synchronize { @executions << execution }
      execution
    end
  end
end

# Handlers for the workflow specs (templates under spec/fixtures/templates_b and tmpdirs).
module WorkflowHandlers
  # Does what its plan says and records the invocation. The plan is the template's
  # `handler.initialization`, overridden per step by the task context's "plan" => {step_name => {...}}:
  #   "sleep"         seconds, or [min, max] for a random duration
  #   "sleep_attempts" only sleep on these attempt numbers (default: every attempt)
  #   "raise"         retryable | standard | permanent | not_implemented | stack
  #   "until_attempt" raise only on attempts before this one (then succeed)
  #   "retry_after"   seconds, with "raise" => "retryable"
  class Scripted < TaskerCore::StepHandler::Base
    # The recording runs with interrupts deferred and the plan with them open: a StepTimeoutError
    # landing inside the recorder's own code (after `start` recorded the execution, before the
    # ensure set `finished_at`) would leave an execution that seems to run forever. One that
    # arrives after the plan is done is raised as the recording ends, still inside the handler.
    def call(task, sequence, step)
      plan = config.merge(task.context.fetch("plan", {}).fetch(step.name, {}))
      Thread.handle_interrupt(Object => :never) do
        execution = WorkflowRecorder.start(task, sequence, step, config)
        begin
          Thread.handle_interrupt(Object => :immediate) do
            pause(plan, step)
            fail_as_planned(plan, step)
          end
          execution.outcome = :success
          { "step" => step.name, "attempt" => step.attempts, "dependencies" => sequence.dependency_results.keys.sort }
        rescue Exception # rubocop:disable Lint/RescueException
          execution.outcome = :raised
          raise
        ensure
          execution.finished_at = WorkflowRecorder.now
        end
      end
    end

    private

    def pause(plan, step)
      duration = plan["sleep"]
      return unless duration
      return if plan["sleep_attempts"] && !plan["sleep_attempts"].include?(step.attempts)

      duration = rand(duration[0]..duration[1]) if duration.is_a?(Array)
      sleep(duration)
    end

    def fail_as_planned(plan, step)
      kind = plan["raise"]
      return unless kind
      return if plan["until_attempt"] && step.attempts >= plan["until_attempt"]

      message = "planned #{kind} failure on attempt #{step.attempts}"
      raise TaskerCore::RetryableError.new(message, retry_after: plan["retry_after"]) if kind == "retryable"

      raise PLANNED_FAILURES.fetch(kind) { raise ArgumentError, "unknown planned failure #{kind.inspect}" }, message
    end

    PLANNED_FAILURES = {
      "standard" => RuntimeError, "permanent" => TaskerCore::PermanentError,
      "not_implemented" => NotImplementedError, "stack" => SystemStackError
    }.freeze
  end

  # Counts executions per step_uuid (for "no step runs twice"), then sleeps like Scripted.
  class Counted < Scripted
    @counts = Hash.new(0)
    @mutex = Mutex.new

    class << self
      def reset!
        @mutex.synchronize { @counts = Hash.new(0) }
      end

      def counts
        @mutex.synchronize { @counts.dup }
      end

      def count(step_uuid)
        @mutex.synchronize { @counts[step_uuid] += 1 }
      end
    end

    def call(task, sequence, step)
      self.class.count(step.step_uuid)
      super
    end
  end
end

module WorkflowHandlers
  # A runaway: rescues every exception (StepTimeoutError included) and keeps working for
  # `stubborn_for` seconds (context plan), recording each interrupt it swallowed.
  class Stubborn < TaskerCore::StepHandler::Base
    @swallowed = Queue.new

    class << self
      attr_reader :swallowed
    end

    def call(task, sequence, step)
      execution = WorkflowRecorder.start(task, sequence, step, config)
      until_at = WorkflowRecorder.now + task.context.fetch("stubborn_for", 1.0)
      begin
        sleep(until_at - WorkflowRecorder.now) while WorkflowRecorder.now < until_at
      rescue Exception => e # rubocop:disable Lint/RescueException
        self.class.swallowed << e
        retry
      end
      execution.outcome = :success
      { "stubborn" => true }
    ensure
      execution.finished_at = WorkflowRecorder.now
    end
  end
end

# Shared by the spec/workflow specs: `include_context "workflow worker"`.
module WorkflowSpecHelpers
  TEMPLATES_B = File.join(FIXTURES, "templates_b")
  NAMESPACE = "workflow"

  def bootstrap
    TaskerCore::Worker::Bootstrap.instance
  end

  def bridge
    TaskerCore::Worker::EventBridge.instance
  end

  def start_worker(**config)
    TaskerCore::Worker::Bootstrap.start!({ templates: TEMPLATES_B }.merge(config))
  end

  def create_workflow_task(name, context = {})
    TaskerCore.create_task(namespace: NAMESPACE, name: name, context: context)
  end

  # Create a task and wait for it to finish; returns its final status.
  def run_task(name, context = {}, timeout: 10)
    TaskerCore.wait_for_task(create_workflow_task(name, context), timeout: timeout)
  end

  # Take the next step event by hand, as a handler thread would: `false` means the wait ended early
  # with nothing (Ruby may cut a GVL-released wait short at any time), so wait again until `within`
  # has passed. Returns the event Hash, or false / nil.
  def take_next_event(within: 2)
    deadline = monotonic + within
    event = false
    while event == false && (left = deadline - monotonic).positive?
      event = TaskerCore::FFI.next_step_event(left)
    end
    event
  end

  def step_status(task_status, name)
    task_status.fetch(:steps).find { |s| s[:name] == name } || raise("no step #{name} in #{task_status.inspect}")
  end

  def monotonic
    Process.clock_gettime(Process::CLOCK_MONOTONIC)
  end

  # Subscribe a block to an EventBridge event for this example only; events land in the returned Queue.
  def listen(event_id)
    queue = Queue.new
    block = proc { |event| queue << event }
    bridge.subscribe(event_id, &block)
    spec_listeners << block
    queue
  end

  # Subscribe a listener object for this example only.
  def attach_listener(listener)
    bridge.subscribe(listener)
    spec_listeners << listener
    listener
  end

  def spec_listeners
    @spec_listeners ||= []
  end

  def drain(queue)
    items = []
    items << queue.pop until queue.empty?
    items
  end

  # Largest number of [start, finish] intervals open at one instant.
  def max_overlap(intervals)
    points = intervals.flat_map { |s, f| [[s, 1], [f, -1]] }
    # At equal times, count the finish first: touching intervals do not overlap.
    points.sort_by! { |t, d| [t, d] }
    open = 0
    points.map { |_, d| open += d }.max || 0
  end
end

RSpec.shared_context "workflow worker" do
  include WorkflowSpecHelpers

  before do
    WorkflowRecorder.reset!
    WorkflowHandlers::Counted.reset!
  end

  after do
    spec_listeners.each { |listener| TaskerCore::Worker::EventBridge.instance.unsubscribe(listener) }
  end
end

# Seed 002's integration spec (kept verbatim) subscribes blocks to the EventBridge singleton and
# never removes them: they would see every later example's events (and keep them in memory) and
# skew specs that count subscribers. Remove whatever an integration example left subscribed.
RSpec.configure do |config|
  subscribers = lambda do
    bridge = TaskerCore::Worker::EventBridge.instance
    bridge.registered_events.flat_map { |id| bridge.process(id, {}).map { |_event, callable| callable } }
  end

  config.around(file_path: %r{spec/integration/}) do |example|
    before = subscribers.call
    example.run
  ensure
    bridge = TaskerCore::Worker::EventBridge.instance
    (subscribers.call - before).each { |callable| bridge.unsubscribe(callable) }
  end
end
