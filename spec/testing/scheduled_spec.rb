# frozen_string_literal: true

require "spec_helper"
require "tasker_core/rspec"

# Test mode and `create_task(..., run_at:)`: run_at is checked as a worker checks it and kept, but
# nothing waits for it (inline! runs the task at once, drain runs it whatever its time).
RSpec.describe "TaskerCore::Testing with scheduled tasks (run_at)" do
  include_context "workflow worker"

  let(:testing) { TaskerCore::Testing }

  around do |example|
    testing.config = { templates: WorkflowSpecHelpers::TEMPLATES_B }
    example.run
  ensure
    testing.clear
    testing.config = nil
  end

  it "fake! records run_at; the task is pending with every step pending, as on a worker, until drained" do
    run_at = Time.now + 3600
    uuid = testing.fake! { create_workflow_task_at("chain", run_at) }

    task = testing.tasks.last
    expect(task.run_at).to be_within(0.001).of(run_at)
    expect(task.to_h[:run_at]).to eq(task.run_at)
    status = testing.fake! { TaskerCore.task_status(uuid) }
    expect(status[:status]).to eq("pending")
    expect(status[:steps].map { |s| s[:status] }.uniq).to eq(["pending"])

    finals = testing.fake! { testing.drain }
    expect(finals.map { |f| f[:status] }).to eq(["complete"])
    expect(WorkflowRecorder.executions.map(&:name)).to contain_exactly("first", "second", "third", "side")
  end

  it "inline! runs a scheduled task at once" do
    uuid = testing.inline! { create_workflow_task_at("quick", Time.now + 86_400) }
    expect(testing.inline! { TaskerCore.task_status(uuid)[:status] }).to eq("complete")
  end

  it "fake! cancels a scheduled task: it never runs" do
    testing.fake! do
      uuid = create_workflow_task_at("quick", Time.now + 60)
      expect(TaskerCore.cancel_task(uuid)).to be(true)
      expect(testing.drain).to eq([])
      expect(TaskerCore.task_status(uuid)[:steps].map { |s| s[:status] }).to eq(["cancelled"])
    end
  end

  it "refuses the run_at values a worker refuses, with the same ArgumentError" do
    testing.inline! do
      expect { create_workflow_task_at("quick", Float::NAN) }.to raise_error(ArgumentError, /run_at: must be a finite/)
      expect { create_workflow_task_at("quick", Time.utc(9999)) }.to raise_error(ArgumentError, /10 years ahead/)
      expect { create_workflow_task_at("quick", "soon") }.to raise_error(ArgumentError, /run_at: must be a Time/)
    end
    expect(testing.tasks).to be_empty
  end

  def create_workflow_task_at(name, run_at)
    TaskerCore.create_task(namespace: WorkflowSpecHelpers::NAMESPACE, name: name, context: {}, run_at: run_at)
  end
end
