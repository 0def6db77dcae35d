# frozen_string_literal: true

# task.completed, task.failed and task.cancelled on PostgreSQL (issue G, point 3): each task's end is
# published once, by the process whose write finished it, with the final status task_status gives.
RSpec.describe "PostgreSQL backend: task events" do
  include_context "postgres database"

  let(:bridge) { TaskerCore::Worker::EventBridge.instance }
  let(:local_events) { Queue.new }
  let(:subscriptions) { [] }

  before do
    %w[task.completed task.failed task.cancelled].each do |event|
      block = proc { |e| local_events << [e.id, e[:task_uuid], e[:status]] }
      bridge.subscribe(event, &block)
      subscriptions << [event, block]
    end
  end

  after { subscriptions.each { |_event, block| bridge.unsubscribe(block) } }

  # Every EVENT line the worker process printed until `count` arrived (or `timeout` passed).
  def worker_events(worker, count, timeout: 10)
    Array.new(count) { worker.send(:expect_line, "EVENT", timeout).split }
  end

  it "publishes task.completed and task.failed in the worker process that finished the task" do
    worker = start_pg_worker(db, env: { "TASKER_SPEC_TASK_EVENTS" => "1" })
    start_client(db)
    done = create_pg_task("single")
    failed = create_pg_task("single", { "plan" => { "*" => { "raise" => "permanent" } } })

    finals = TaskerCore.wait_for_tasks([done, failed], timeout: 20)
    events = worker_events(worker, 2).sort_by { |_id, uuid, _status| uuid == done ? 0 : 1 }

    expect(finals.map { |f| f[:status] }).to eq(%w[complete error])
    expect(events).to eq([["task.completed", done, "complete"], ["task.failed", failed, "error"]])
    expect(local_events.size).to eq(0) # the client finished nothing: it announces nothing
  end

  it "publishes task.cancelled once, in the process that finished the cancelled task" do
    worker = start_pg_worker(db, env: { "TASKER_SPEC_TASK_EVENTS" => "1" })
    start_client(db)
    running = create_pg_task("slow", { "plan" => { "*" => { "sleep" => 1.5 } } })
    eventually(timeout: 10) { TaskerCore.task_status(running)[:steps].first[:status] == "in_progress" }

    expect(TaskerCore.cancel_task(running)).to be(true)
    final = TaskerCore.wait_for_task(running, timeout: 20)
    event = worker_events(worker, 1).first # the worker recorded the interrupted step: it finished the task

    expect(final[:status]).to eq("cancelled")
    expect(event).to eq(["task.cancelled", running, "cancelled"])
    expect(local_events.size).to eq(0)
  end
end
