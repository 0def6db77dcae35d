# frozen_string_literal: true

RSpec.describe "Graceful shutdown under load" do
  include_context "workflow worker"

  def tasks
    200
  end

  # 200 tasks of pair.yml (a -> b, each step sleeping 10-50 ms), on 4 handler threads: ~3 s of work.
  def load_worker
    start_worker(concurrency: 4)
    uuids = Array.new(tasks) { create_workflow_task("pair") }
    eventually { WorkflowRecorder.executions.size >= 40 }
    uuids
  end

  # A handler thread may have taken its next event just before the shutdown began and record the
  # start a moment later; but no thread takes another one after that: at most one late start each.
  def expect_no_new_step_after(runs, began)
    late = runs.select { |r| r.started_at > began }
    per_thread = late.group_by(&:thread).transform_values(&:size)
    expect(per_thread.values).to all(eq(1)),
                                 "steps started after the shutdown began, per thread: #{per_thread.values} " \
                                 "(#{late.map { |r| ((r.started_at - began) * 1000).round(2) }} ms after)"
  end

  # Bootstrap hooks live as long as the singleton: remove this example's afterwards.
  def on_shutdown(&block)
    example_hooks << block
    bootstrap.on_shutdown(&block)
  end

  def example_hooks
    @example_hooks ||= []
  end

  after do
    bootstrap.shutdown!
    registered = bootstrap.instance_variable_get(:@shutdown_handlers)
    example_hooks.each { |hook| registered&.delete(hook) }
  end

  def executions_per_step
    WorkflowHandlers::Counted.counts
  end

  it "Bootstrap#shutdown! finishes and records in-flight steps, starts nothing new, runs nothing twice" do
    completions = listen("step.completion.sent")
    load_worker

    shutdown_began = monotonic
    expect(bootstrap.shutdown!).to be(true)
    shutdown_ended = monotonic

    expect(bootstrap.running?).to be(false)
    expect(bootstrap.status).to include(running: false, handler_threads_alive: 0)
    runs = WorkflowRecorder.executions
    # Well short of all 400 steps: the shutdown did cut the work short.
    expect(runs.size).to be_between(40, 300)

    expect_no_new_step_after(runs, shutdown_began)
    # Every step that started finished before shutdown! returned...
    expect(runs.map(&:finished_at)).to all(be_a(Float))
    expect(runs.map(&:finished_at).max).to be < shutdown_ended
    expect(runs.map(&:outcome)).to all(eq(:success))
    # ...and the engine accepted (recorded) its completion.
    verdicts = drain(completions)
    expect(verdicts.size).to eq(runs.size)
    expect(verdicts.map { |c| c[:accepted] }).to all(be(true))
    expect(verdicts.map { |c| c[:step_uuid] }).to match_array(runs.map(&:step_uuid))
    # No step ran twice, and each ran as its first attempt.
    expect(executions_per_step.values).to all(eq(1))
    expect(executions_per_step.size).to eq(runs.size)
    expect(runs.map(&:attempt)).to all(eq(1))
    # A dependent never ran without its dependency in the same task.
    by_task = runs.group_by(&:task_uuid)
    by_task.each_value { |task_runs| expect(task_runs.map(&:name)).to include("a") }
  end

  it "transition_to_graceful_shutdown drains in-flight steps with exact counts" do
    load_worker

    drain_began = monotonic
    expect(TaskerCore::FFI.transition_to_graceful_shutdown).to be(true)
    eventually(timeout: 5) { TaskerCore::FFI.worker_status[:steps_in_flight].zero? }
    drained = monotonic
    sleep 0.2 # anything that would still start, starts now
    status = TaskerCore::FFI.worker_status

    runs = WorkflowRecorder.executions
    expect(status).to include(state: "shutting_down", steps_in_flight: 0, steps_failed: 0)
    expect(status[:steps_processed]).to eq(runs.size)
    expect(runs.map(&:finished_at)).to all(be <= drained)
    expect_no_new_step_after(runs, drain_began)
    expect(runs.map(&:started_at)).to all(be <= drained)
    expect(executions_per_step.values).to all(eq(1))
    expect(runs.size).to be < 2 * tasks
    # New tasks are refused while shutting down.
    expect { create_workflow_task("pair") }.to raise_error(TaskerCore::Error)

    expect(bootstrap.shutdown!).to be(true)
    expect(WorkflowRecorder.executions.size).to eq(runs.size)
  end

  it "hands out no queued step once transition_to_graceful_shutdown has returned" do
    ffi = TaskerCore::FFI
    5.times do
      ffi.bootstrap_worker(templates: WorkflowSpecHelpers::TEMPLATES_B, concurrency: 2)
      uuids = Array.new(10) { create_workflow_task("quick") }
      # Dispatch queues up to 2 x concurrency events ahead of the handler threads.
      eventually { ffi.worker_status[:steps_in_flight] == 4 }

      expect(ffi.transition_to_graceful_shutdown).to be(true)
      expect(ffi.next_step_event(0)).to be_nil
      expect(ffi.next_step_event(0.05)).to be_nil

      # The queued attempts went back to the engine unrun: no attempt counted, still ready.
      eventually { ffi.worker_status[:steps_in_flight].zero? }
      expect(ffi.worker_status).to include(state: "shutting_down", steps_processed: 0)
      uuids.each do |uuid|
        expect(step_status(TaskerCore.task_status(uuid), "work")).to include(status: "enqueued", attempts: 0)
      end
      started = monotonic
      expect(ffi.stop_worker).to be(true)
      expect(monotonic - started).to be < 1
    end
  end

  it "is idempotent" do
    start_worker(concurrency: 2)

    expect(bootstrap.shutdown!).to be(true)
    expect(bootstrap.shutdown!).to be(false)
    expect(bootstrap.running?).to be(false)
  end

  it "runs on_shutdown hooks after the handler threads are gone" do
    start_worker(concurrency: 2)
    seen = []
    on_shutdown { seen << [TaskerCore::FFI.worker_status[:running], bootstrap.status[:handler_threads_alive]] }

    bootstrap.shutdown!
    expect(seen).to eq([[false, 0]])
  end

  it "start! after shutdown! runs tasks again, each step once" do
    3.times do
      start_worker(concurrency: 4)
      expect(run_task("pair")[:status]).to eq("complete")
      bootstrap.shutdown!
    end

    WorkflowRecorder.reset!
    WorkflowHandlers::Counted.reset!
    start_worker(concurrency: 4)
    expect(bootstrap.status[:handler_threads_alive]).to eq(4)
    uuids = Array.new(20) { create_workflow_task("pair") }
    uuids.each { |uuid| expect(TaskerCore.wait_for_task(uuid, timeout: 10)[:status]).to eq("complete") }

    expect(WorkflowRecorder.executions.size).to eq(40)
    expect(executions_per_step.size).to eq(40)
    expect(executions_per_step.values).to all(eq(1))
    expect(bootstrap.status).to include(steps_processed: 40, steps_in_flight: 0)
  end

  it "shuts down from inside a handler without deadlocking" do
    start_worker(concurrency: 2)
    stopped = Queue.new
    on_shutdown { stopped << true }
    trigger = proc { |_event| bootstrap.shutdown! }
    bridge.subscribe("step.execution.received", &trigger)
    spec_listeners << trigger

    create_workflow_task("quick")
    expect(Timeout.timeout(5) { stopped.pop }).to be(true)
    expect(bootstrap.running?).to be(false)
  end
end
