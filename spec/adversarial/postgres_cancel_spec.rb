# frozen_string_literal: true

require "securerandom"
require "tmpdir"

# Issue E on PostgreSQL, adversarially: cancels racing completions, failures and each other across
# processes must leave every task consistent (a final status only once nothing runs, no step left
# unfinished, nothing run twice), and a retry must pick up exactly what was left.
RSpec.describe "PostgreSQL backend (adversarial): cancels racing completions across processes" do
  include_context "postgres database"

  let(:log) { File.join(Dir.tmpdir, "tasker_pg_cancel_race_#{Process.pid}_#{SecureRandom.hex(4)}.log") }
  let(:unfinished) { %w[pending enqueued in_progress waiting_for_retry] }

  after { FileUtils.rm_f(log) }

  it "settles each task as cancelled (cancel returned true) or complete (false), never half-way; retry " \
     "finishes the cancelled ones" do
    workers = start_pg_workers(db, 2, poll_interval: 0.1, claim_lease: 1)
    start_client(db)
    # fanout: root -> ten children -> join; every step sleeps 0-200 ms, so that most tasks still run
    # while the cancels below (each a round trip to a process, slow on a loaded machine) arrive.
    uuids = Array.new(40) do |i|
      create_pg_task("fanout", "log" => log, "plan" => { "*" => { "sleep" => (i % 5) * 0.05 } })
    end
    # Cancel each at some point of its run, from this process or from a worker process (the one that
    # may be running its steps), a few of them from both at once.
    answers = uuids.each_with_index.map do |uuid, i|
      sleep(rand * 0.03)
      case i % 4
      when 0 then [TaskerCore.cancel_task(uuid)]
      when 1 then [workers[i % 2].cancel_task(uuid) == "true"]
      when 2
        from_worker = Thread.new { workers[0].cancel_task(uuid) == "true" }
        [TaskerCore.cancel_task(uuid), from_worker.value]
      else [] # left to run
      end
    end

    finals = uuids.map { |u| TaskerCore.wait_for_task(u, timeout: 30) }
    finals.zip(answers).each do |final, answer|
      expect(final[:steps].map { |s| s[:status] } & unfinished).to eq([]), final.inspect
      if answer.any?
        expect(final[:status]).to eq("cancelled"), final.inspect
        expect(final[:steps].map { |s| s[:status] }.uniq - %w[complete cancelled]).to eq([]), final.inspect
      else
        expect(final[:status]).to eq("complete"), final.inspect
      end
    end
    cancelled = finals.select { |f| f[:status] == "cancelled" }
    # The race was run: cancels did land on running tasks (30 of the 40 are cancelled at some point).
    expect(cancelled.size).to be >= 5
    # No step ran twice, and none ran after its task was cancelled and finished.
    starts = handler_log(log).select { |l| l[:event] == "start" }
    expect(starts.map { |l| l[:step_uuid] }.tally.values.uniq).to eq([1])
    finished_at = finals.to_h { |f| [f[:task_uuid], Time.iso8601(f[:completed_at]).to_f] }
    step_task = finals.flat_map { |f| f[:steps].map { |s| [s[:step_uuid], f[:task_uuid]] } }.to_h
    starts.each { |l| expect(l[:at]).to be <= finished_at.fetch(step_task.fetch(l[:step_uuid])) + 0.05 }
    expect(psql_count("SELECT count(*) FROM tasker_ready_steps", db: db)).to eq(0)
    expect(workers.map { |w| w.status[:steps_in_flight] }).to eq([0, 0])

    cancelled.each { |f| expect(TaskerCore.retry_task(f[:task_uuid])).to be(true) }
    again = cancelled.map { |f| TaskerCore.wait_for_task(f[:task_uuid], timeout: 30) }
    expect(again.map { |f| f[:status] }.uniq).to eq(["complete"])
    again.zip(cancelled).each do |after, before|
      before[:steps].zip(after[:steps]).each do |was, now|
        # Completed steps kept their result; an interrupted one ran again as its next attempt.
        expect(now).to include(result: was[:result], attempts: 1) if was[:status] == "complete"
        expect(now[:attempts]).to eq(was[:attempts] + 1) if was[:status] == "cancelled"
      end
    end
  end

  it "lets a failure and a cancel of the same task race: whichever comes first, the task ends once, honestly" do
    workers = start_pg_workers(db, 2, poll_interval: 0.1)
    start_client(db)
    # diamond: start -> (left, right) -> join; left fails for good at once, right runs 0-100 ms.
    uuids = Array.new(30) do |i|
      plans = { "left" => { "raise" => "permanent" }, "right" => { "sleep" => (i % 5) * 0.025 } }
      create_pg_task("diamond", "log" => log, "plan" => plans)
    end
    answers = uuids.map do |uuid|
      sleep(rand * 0.02)
      TaskerCore.cancel_task(uuid)
    end

    finals = uuids.map { |u| TaskerCore.wait_for_task(u, timeout: 30) }
    finals.zip(answers).each do |final, answer|
      statuses = final[:steps].to_h { |s| [s[:name], s[:status]] }
      expect(statuses.values & unfinished).to eq([]), final.inspect
      # A cancel that found the task unfinished wins (it outranks a failure still winding down).
      expect(final[:status]).to eq(answer ? "cancelled" : "error"), final.inspect
      # join never runs: skipped by the failure, or cancelled by a cancel that came first.
      expect(final[:status] == "error" ? %w[skipped] : %w[skipped cancelled]).to include(statuses["join"])
    end
    expect(psql_count("SELECT count(*) FROM tasker_ready_steps", db: db)).to eq(0)
    expect(workers.map { |w| w.status[:steps_in_flight] }).to eq([0, 0])
  end
end
