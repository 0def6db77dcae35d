# frozen_string_literal: true

require "spec_helper"
require "tasker_core/rspec"

RSpec.describe "TaskerCore::Testing.fake!" do
  include_context "workflow worker"

  let(:testing) { TaskerCore::Testing }

  around do |example|
    testing.config = { templates: [File.join(FIXTURES, "templates"), WorkflowSpecHelpers::TEMPLATES_B] }
    testing.fake! { example.run }
  ensure
    testing.config = nil
  end

  it "records the task without running it; its status is the engine's for a task not yet started" do
    uuid = create_workflow_task("chain", { "order_id" => 7 })

    expect(WorkflowRecorder.executions).to be_empty
    expect(testing.tasks.map(&:to_h)).to eq([{ task_uuid: uuid, namespace: "workflow", name: "chain",
                                               version: "1.0.0", context: { "order_id" => 7 }, status: "pending",
                                               run_at: nil }])
    status = TaskerCore.task_status(uuid)
    expect(status).to include(status: "pending", completed_at: nil)
    expect(status[:steps].map { |s| [s[:name], s[:status], s[:attempts]] })
      .to eq([["first", "enqueued", 0], ["second", "pending", 0], ["third", "pending", 0], ["side", "enqueued", 0]])
  end

  it "never finishes a recorded task by waiting: wait_for_task times out and says to drain" do
    uuid = create_workflow_task("chain")

    expect { TaskerCore.wait_for_task(uuid, timeout: 1) }
      .to raise_error(Timeout::Error, /recorded by TaskerCore::Testing\.fake!.*TaskerCore::Testing\.drain/)
  end

  it "drain runs every recorded task inline, in creation order, and returns their final statuses" do
    first = create_workflow_task("chain")
    second = create_test_task(context: { "value" => 1 })

    statuses = testing.drain

    expect(statuses.map { |s| [s[:task_uuid], s[:status]] }).to eq([[first, "complete"], [second, "complete"]])
    expect(TaskerCore.wait_for_task(second, timeout: 0)[:steps].last[:result]).to eq("value" => 4)
    expect(WorkflowRecorder.for_task(first).map(&:name)).to eq(%w[first side second third])
    expect(testing.pending_tasks).to be_empty
    expect(testing.drain).to eq([])
  end

  it "drain also runs the tasks that the drained tasks' handlers create" do
    stub_const("TestModeHandlers::Spawner", Class.new(TaskerCore::StepHandler::Base) do
      def call(*)
        { "child" => TaskerCore.create_task(namespace: "test", name: "linear", context: { "value" => 0 }) }
      end
    end)
    dir = template_dir("spawner.yml" => <<~YAML)
      namespace: testmode
      name: spawner
      version: 1.0.0
      steps:
        - { name: spawn, handler: { callable: TestModeHandlers::Spawner } }
    YAML
    testing.config = { templates: [dir, File.join(FIXTURES, "templates")] }
    TaskerCore.create_task(namespace: "testmode", name: "spawner")

    statuses = testing.drain

    expect(statuses.map { |s| [s[:name], s[:status]] }).to eq([%w[spawner complete], %w[linear complete]])
  end

  it "clear forgets every task" do
    uuid = create_workflow_task("chain")

    testing.clear

    expect(testing.tasks).to be_empty
    expect { TaskerCore.task_status(uuid) }.to raise_error(TaskerCore::TaskNotFoundError)
  end

  it "cancel_task cancels a recorded task: none of its steps runs, drain leaves it" do
    uuid = create_workflow_task("chain")

    expect(TaskerCore.cancel_task(uuid)).to be(true)
    expect(testing.drain).to eq([])

    status = TaskerCore.wait_for_task(uuid, timeout: 0)
    expect(status[:status]).to eq("cancelled")
    expect(status[:steps].map { |s| s[:status] }.uniq).to eq(["cancelled"])
    expect(TaskerCore.cancel_task(uuid)).to be(false)
  end

  it "checks what it records as the engine would: an unknown template raises at create_task" do
    expect { create_workflow_task("nope") }.to raise_error(TaskerCore::ConfigurationError, /unknown template/)
    expect(testing.tasks).to be_empty
  end

  it "switches to inline! for a block: tasks created there run at once" do
    recorded = create_workflow_task("chain")
    ran = testing.inline! { create_workflow_task("chain") }

    expect(TaskerCore.task_status(recorded)[:status]).to eq("pending")
    expect(TaskerCore.task_status(ran)[:status]).to eq("complete")
    expect(testing.pending_tasks.map(&:task_uuid)).to eq([recorded])
  end
end
