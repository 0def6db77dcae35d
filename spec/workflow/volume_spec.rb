# frozen_string_literal: true

RSpec.describe "Volume" do
  include_context "workflow worker"

  it "completes 10,000 diamond tasks with exact counts" do
    # The memory backend forgets finished tasks beyond task_retention (default 10,000).
    bootstrap.start!(task_retention: 20_000)
    completions = Queue.new
    counter = proc { |event| completions << [event[:step_uuid], event[:accepted]] }
    bridge.subscribe("step.completion.sent", &counter)
    spec_listeners << counter

    started = monotonic
    uuids = Array.new(10_000) { create_test_task_of("diamond") }
    created = monotonic
    finals = uuids.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 120) }
    elapsed = monotonic - started
    status = bootstrap.status

    expect(uuids.uniq.size).to eq(10_000)
    expect(finals.map { |f| f[:status] }.tally).to eq("complete" => 10_000)
    expect(finals.flat_map { |f| f[:steps].map { |s| [s[:status], s[:attempts]] } }.tally)
      .to eq(["complete", 1] => 40_000)
    expect(status).to include(steps_processed: 40_000, steps_failed: 0, steps_in_flight: 0)
    # Every completion the handlers sent was accepted, once per step.
    eventually { completions.size >= 40_000 }
    sent = drain(completions)
    expect(sent.size).to eq(40_000)
    expect(sent.map(&:last)).to all(be(true))
    expect(sent.map(&:first).uniq.size).to eq(40_000)
    # Finished tasks are still known (task_retention: 20_000).
    expect(TaskerCore.task_status(uuids.first)[:status]).to eq("complete")

    RSpec.configuration.reporter.message(
      format("\n  volume: 10,000 diamond tasks (40,000 steps) in %<t>.2fs (created in %<c>.2fs): %<r>d steps/s",
             t: elapsed, c: created - started, r: 40_000 / elapsed)
    )
  end

  def create_test_task_of(name)
    TaskerCore.create_task(namespace: "test", name: name, version: "1.0.0", context: {})
  end
end
