# frozen_string_literal: true

# task_status reads the memory backend's task table from the calling thread, while the engine
# records completions into it. A reader must see a task before or after each change, never half
# of one: hammer task_status from many threads while tasks run, retry, fail and get cancelled, and
# check that every snapshot is one a task can really be in.
module TornReadsSpec
  # spec/fixtures/templates_b/chain.yml: first -> second -> third, and side.
  DEPENDENCIES = { "first" => [], "second" => ["first"], "third" => ["second"], "side" => [] }.freeze
  UNFINISHED = %w[pending enqueued in_progress waiting_for_retry].freeze
  RAN = %w[in_progress complete error waiting_for_retry].freeze

  FINAL = %w[complete error cancelled].freeze

  module_function

  # Every problem a snapshot shows (empty when it is consistent).
  def problems(snapshot)
    statuses = snapshot[:steps].to_h { |s| [s[:name], s[:status]] }
    found = []
    found << "steps #{statuses.keys}" unless statuses.keys.sort == DEPENDENCIES.keys.sort
    snapshot[:steps].each { |step| found.concat(step_problems(step, statuses)) }
    found.concat(task_problems(snapshot, statuses))
  end

  # [what is wrong, when] for one step, given every step's status.
  STEP_RULES = {
    "ran or is queued before its dependencies completed" => lambda do |step, statuses|
      (RAN + ["enqueued"]).include?(step[:status]) &&
        DEPENDENCIES.fetch(step[:name], []).any? { |d| statuses[d] != "complete" }
    end,
    "ran without an attempt counted" => ->(step, _) { RAN.include?(step[:status]) && step[:attempts] < 1 },
    "complete without a result" => ->(step, _) { step[:status] == "complete" && step[:result].nil? },
    "complete without completed_at" => ->(step, _) { step[:status] == "complete" && step[:completed_at].nil? },
    "in progress with completed_at" => ->(step, _) { step[:status] == "in_progress" && step[:completed_at] }
  }.freeze

  # [what is wrong, when] for the task, given every step's status.
  TASK_RULES = {
    "unknown task status" => ->(task, _) { !(FINAL + %w[pending in_progress]).include?(task[:status]) },
    "pending with a step that ran" => lambda do |task, _|
      task[:status] == "pending" && task[:steps].any? { |s| s[:attempts].positive? }
    end,
    "in_progress with every step complete" => lambda do |task, statuses|
      task[:status] == "in_progress" && statuses.values.all?("complete")
    end,
    "complete with a step not complete" => lambda do |task, statuses|
      task[:status] == "complete" && !statuses.values.all?("complete")
    end,
    "complete without completed_at" => ->(task, _) { task[:status] == "complete" && task[:completed_at].nil? },
    "finished with unfinished steps" => lambda do |task, statuses|
      FINAL.include?(task[:status]) && statuses.values.intersect?(UNFINISHED)
    end,
    "error without a failed step" => ->(task, statuses) { task[:status] == "error" && !statuses.value?("error") },
    "skipped steps without a failed one" => ->(_, statuses) { statuses.value?("skipped") && !statuses.value?("error") }
  }.freeze

  def step_problems(step, statuses)
    STEP_RULES.filter_map do |what, broken|
      "#{step[:name]} #{step[:status]}: #{what}" if broken.call(step, statuses)
    end
  end

  def task_problems(snapshot, statuses)
    TASK_RULES.filter_map do |what, broken|
      "task #{snapshot[:status]} #{statuses}: #{what}" if broken.call(snapshot, statuses)
    end
  end

  # What changed between two snapshots of one task that can never change back.
  def regressions(previous, snapshot)
    found = []
    if FINAL.include?(previous[:status]) && snapshot[:status] != previous[:status]
      found << "went back from #{previous[:status]} to #{snapshot[:status]}"
    end
    previous[:steps].zip(snapshot[:steps]).each do |before, now|
      found << "#{now[:name]} was complete, now #{now[:status]}" if before[:status] == "complete" &&
                                                                    now[:status] != "complete"
    end
    found
  end

  # Reads task_status of `uuids` until `stop` says so: [snapshots read, of unfinished tasks, problems].
  def hammer(uuids, offset, stop)
    checked = 0
    unfinished = 0
    problems = []
    last = {}
    until stop.call
      uuid = uuids[((checked * 7) + offset) % uuids.size]
      snapshot = TaskerCore.task_status(uuid)
      checked += 1
      unfinished += 1 unless FINAL.include?(snapshot[:status])
      found = problems(snapshot)
      found.concat(regressions(last[uuid], snapshot)) if last[uuid]
      last[uuid] = snapshot
      problems << [uuid, found, snapshot] unless found.empty?
      # A read that finds the table free keeps the GVL: let the handler threads run now and then.
      Thread.pass if (checked % 64).zero?
    end
    [checked, unfinished, problems]
  end

  RSpec.describe "task_status under concurrent completions (memory backend)" do
    include_context "workflow worker"

    it "never shows a task half-way through a change, and never goes back" do
      start_worker(concurrency: 4, task_retention: 10_000)
      plans = [
        {},
        { "plan" => { "second" => { "raise" => "retryable", "until_attempt" => 3 } } },
        { "plan" => { "first" => { "raise" => "permanent" } } },
        { "plan" => { "second" => { "raise" => "standard" } } },
        { "plan" => { "side" => { "sleep" => 0.2 } } }
      ]
      contexts = Array.new(300) { |i| plans[i % plans.size] }
      uuids = TaskerCore.create_tasks(namespace: "workflow", name: "chain", contexts: contexts)
      # Cancelled while they run.
      uuids.select.with_index { |_, i| (i % plans.size) == 4 }.first(20).each { |u| TaskerCore.cancel_task(u) }

      stop = false
      readers = Array.new(6) { |r| Thread.new { TornReadsSpec.hammer(uuids, r, -> { stop }) } }

      finals = TaskerCore.wait_for_tasks(uuids, timeout: 60)
      stop = true
      results = readers.map(&:value)
      read = results.sum(&:first)
      unfinished = results.sum { |r| r[1] }
      warn "    torn reads: #{read} snapshots read, #{unfinished} of unfinished tasks" if ENV["VERBOSE"]

      problems = results.flat_map(&:last)
      expect(problems.first(3)).to eq([])
      # The readers really read while tasks ran.
      expect(read).to be > 1000
      expect(unfinished).to be > 50
      finals.each { |final| expect(TornReadsSpec.problems(final)).to eq([]) }
      expect(finals.map { |f| f[:status] }.tally.keys).to include("complete", "error", "cancelled")
    end
  end
end
