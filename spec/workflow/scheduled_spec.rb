# frozen_string_literal: true

# Tasks scheduled for a time (`create_task(..., run_at:)`) on the embedded engine: their root steps
# become ready at that time and not before. The margins are wide (a second and more) so that a
# loaded machine cannot make a late start look early; nothing here measures speed.
module WorkflowScheduledSpec
  NAMESPACE = WorkflowSpecHelpers::NAMESPACE

  RSpec.describe "Scheduled tasks (run_at) on the embedded engine" do
    include_context "workflow worker"

    before { start_worker(concurrency: 2) }

    def wall_time_of(iso8601)
      Time.iso8601(iso8601)
    end

    it "keeps the task pending until run_at, then runs its root steps, and the rest as usual" do
      run_at = Time.now + 1.5
      uuid = TaskerCore.create_task(namespace: NAMESPACE, name: "chain", context: {}, run_at: run_at)

      sleep 0.7
      early = TaskerCore.task_status(uuid)
      expect(early[:status]).to eq("pending")
      expect(early[:steps]).to all(include(status: "pending", attempts: 0, started_at: nil))
      expect(WorkflowRecorder.executions).to be_empty

      final = TaskerCore.wait_for_task(uuid, timeout: 15)
      expect(final[:status]).to eq("complete")
      # started_at has millisecond precision: compare at that precision.
      first_start = final[:steps].map { |s| wall_time_of(s[:started_at]) }.min
      expect(first_start).to be >= Time.at(run_at.to_r.floor(3))
      expect(WorkflowRecorder.executions.map(&:name)).to contain_exactly("first", "second", "third", "side")
    end

    it "runs at once when run_at has passed (a moment or up to a year ago)" do
      uuids = [Time.now - 60, Time.now - (200 * 24 * 3600)].map do |run_at|
        TaskerCore.create_task(namespace: NAMESPACE, name: "quick", run_at: run_at)
      end
      expect(TaskerCore.wait_for_tasks(uuids, timeout: 5).map { |t| t[:status] }).to eq(%w[complete complete])
    end

    it "schedules every task of create_tasks, and takes a DateTime" do
      require "date"
      run_at = DateTime.now + Rational(1, 24 * 3600) # one second ahead
      uuids = TaskerCore.create_tasks(namespace: NAMESPACE, name: "quick", contexts: [{}, {}], run_at: run_at)
      expect(uuids.map { |u| TaskerCore.task_status(u)[:status] }).to eq(%w[pending pending])
      finals = TaskerCore.wait_for_tasks(uuids, timeout: 10)
      expect(finals.map { |t| t[:status] }).to eq(%w[complete complete])
      starts = finals.map { |t| wall_time_of(t[:steps].first[:started_at]) }
      expect(starts).to all(be >= Time.at(run_at.to_time.to_r.floor(3)))
    end

    it "cancels a scheduled task before its time: nothing of it ever runs" do
      uuid = TaskerCore.create_task(namespace: NAMESPACE, name: "chain", run_at: Time.now + 1)
      expect(TaskerCore.cancel_task(uuid)).to be(true)
      final = TaskerCore.wait_for_task(uuid, timeout: 5)
      expect(final[:status]).to eq("cancelled")
      expect(final[:steps]).to all(include(status: "cancelled", attempts: 0))

      sleep 1.5 # past its time: the cancelled task's steps stay unstarted
      expect(TaskerCore.task_status(uuid)[:steps]).to all(include(status: "cancelled", attempts: 0))
      expect(WorkflowRecorder.executions).to be_empty
      expect(TaskerCore.cancel_task(uuid)).to be(false)
    end

    it "does not hold up tasks created after it for an earlier time, or unscheduled ones" do
      late = TaskerCore.create_task(namespace: NAMESPACE, name: "quick", run_at: Time.now + 30)
      soon = TaskerCore.create_task(namespace: NAMESPACE, name: "quick", run_at: Time.now + 0.5)
      now = TaskerCore.create_task(namespace: NAMESPACE, name: "quick")
      expect(TaskerCore.wait_for_tasks([now, soon], timeout: 10).map { |t| t[:status] }).to eq(%w[complete complete])
      expect(TaskerCore.task_status(late)[:status]).to eq("pending")
      expect(TaskerCore.cancel_task(late)).to be(true)
    end

    describe "absurd run_at values" do
      {
        "NaN" => [Float::NAN, /run_at: must be a finite time/],
        "infinity" => [Float::INFINITY, /run_at: must be a finite time/],
        "1e19 seconds" => [1e19, /run_at: .* more than 10 years ahead/],
        "a Time in the year 9999" => [Time.utc(9999, 1, 1), /run_at: .* more than 10 years ahead/],
        "the epoch" => [Time.at(0), /run_at: .* more than a year in the past/],
        "a Time before the epoch" => [Time.utc(1, 1, 1), /run_at: .* more than a year in the past/],
        "a String" => ["tomorrow", /run_at: must be a Time .*got a String/],
        "a Complex" => [Complex(1, 2), /run_at: must be a Time .*got a Complex/],
        "a Hash" => [{ at: 1 }, /run_at: must be a Time .*got a Hash/]
      }.each do |what, (value, message)|
        it "raises ArgumentError naming run_at for #{what}, and the worker goes on" do
          expect { TaskerCore.create_task(namespace: NAMESPACE, name: "quick", run_at: value) }
            .to raise_error(ArgumentError, message)
          expect { TaskerCore.create_tasks(namespace: NAMESPACE, name: "quick", contexts: [{}], run_at: value) }
            .to raise_error(ArgumentError, message)
          expect(TaskerCore.tasks(limit: 10)[:tasks]).to be_empty
          expect(run_task("quick")[:status]).to eq("complete")
        end
      end
    end
  end
end
