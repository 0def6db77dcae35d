# frozen_string_literal: true

# StepTimeoutError is raised into handler threads by another Ruby thread. Whatever the timing, it
# must land inside the handler or nowhere: never in the completion hand-off, never in the next step,
# never ending a handler thread; and no two attempts of a step may overlap.
RSpec.describe "Step interrupts racing the handler's return" do
  include_context "workflow worker"

  it "never leaks out of the handler, never overlaps attempts, and every task ends" do
    start_worker(concurrency: 4)
    bridge_errors = listen("bridge.error")
    # Sleeps of 10-30 ms against a 20 ms timeout: about half the attempts are interrupted, many
    # just as they return.
    uuids = Array.new(150) { create_workflow_task("edge_timeout", plan_edge) }
    finals = uuids.map { |u| TaskerCore.wait_for_task(u, timeout: 30) }

    expect(finals.map { |f| f[:status] }.uniq - %w[complete error]).to eq([])
    # Interrupts did land (how many completed depends on the machine's load: not asserted).
    expect(WorkflowRecorder.executions.map(&:outcome)).to include(:raised)
    finals.each do |f|
      expect(f[:steps].map { |s| s[:status] } & %w[pending enqueued in_progress waiting_for_retry]).to eq([])
    end
    expect(drain(bridge_errors)).to eq([])
    expect(bootstrap.status[:handler_threads_alive]).to eq(4)
    # No step had two attempts running at once.
    WorkflowRecorder.executions.group_by(&:step_uuid).each_value do |runs|
      intervals = runs.map { |r| [r.started_at, r.finished_at || monotonic] }
      expect(max_overlap(intervals)).to eq(1), lambda {
        "attempts of step #{runs.first.name} overlapped:\n" + runs.map do |r|
          "  attempt #{r.attempt} on #{r.thread.name}: #{r.started_at}..#{r.finished_at.inspect} (#{r.outcome.inspect})"
        end.join("\n")
      }
    end
    expect(run_task("quick")[:status]).to eq("complete")
  end

  def plan_edge
    { "plan" => { "edge" => { "sleep" => [0.01, 0.03] } } }
  end
end
