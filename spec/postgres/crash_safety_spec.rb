# frozen_string_literal: true

# slow.yml: first -> second, each step sleeping 0.5 s with timeout_seconds: 2. Two workers of 4
# handler threads each; the handler logs "<step_uuid> <attempt> <pid> start|done <time>" lines.
# Claims are leased for 2 s (renewed every 2/3 s while their worker lives).
RSpec.describe "PostgreSQL backend: crash safety" do
  include_context "postgres database"

  let(:log) { File.join(Dir.tmpdir, "tasker_pg_crash_#{Process.pid}_#{rand(1 << 30)}.log") }

  after { FileUtils.rm_f(log) }

  def create_slow_tasks(count)
    Array.new(count) { create_pg_task("slow", "log" => log) }
  end

  # Steps `pid` started and has not finished yet, per the handler log.
  def running_in(pid)
    lines = handler_log(log).select { |l| l[:pid] == pid }
    started = lines.select { |l| l[:event] == "start" }.map { |l| l[:step_uuid] }
    started - lines.select { |l| l[:event] == "done" }.map { |l| l[:step_uuid] }
  end

  def wait_until_running(worker, count)
    eventually(timeout: 10) { running_in(worker.pid).size >= count }
  end

  def done_lines
    handler_log(log).select { |l| l[:event] == "done" }
  end

  it "SIGKILL: the dead worker's steps reappear once its lease expires, complete on the other worker, once" do
    doomed = start_pg_worker(db, worker_id: "crash-doomed", claim_lease: 2)
    survivor = start_pg_worker(db, worker_id: "crash-survivor", claim_lease: 2)
    start_client(db)
    uuids = create_slow_tasks(24)
    wait_until_running(doomed, 2)

    doomed.signal("KILL")
    expect(doomed.exit_status(5)&.termsig).to eq(Signal.list["KILL"])
    running_at_kill = running_in(doomed.pid)
    # What it held: claimed, not recorded. Each row turns visible again 2 s after its last renewal.
    stranded = psql_rows("SELECT step_uuid, extract(epoch FROM visible_at) FROM tasker_ready_steps " \
                         "WHERE claimed_by = 'crash-doomed'", db: db).to_h.transform_values { |at| Float(at) }
    expect(stranded.keys).to include(*running_at_kill)

    results = uuids.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 30) }

    expect(results.map { |r| r[:status] }.tally).to eq("complete" => 24)
    expect(psql_rows("SELECT status, count(*) FROM tasker_steps GROUP BY 1", db: db)).to eq([%w[complete 48]])
    steps = results.flat_map { |r| r[:steps] }
    retaken, untouched = steps.partition { |s| stranded.key?(s[:step_uuid]) }
    # The stranded steps ran again on the survivor, as their second attempt, once their lease expired.
    expect(retaken.size).to eq(stranded.size)
    retaken.each do |step|
      expect(step).to include(status: "complete", attempts: 2)
      expect(step[:result]).to include("pid" => survivor.pid, "attempt" => 2)
      restart = handler_log(log).find do |l|
        l[:step_uuid] == step[:step_uuid] && l[:event] == "start" && l[:attempt] == 2
      end
      # Not before the claim expired; soon after (a poll, then a free thread of the busy survivor).
      expect(restart[:at]).to be_between(stranded[step[:step_uuid]] - 0.05, stranded[step[:step_uuid]] + 3)
    end
    expect(untouched.map { |s| s[:attempts] }.uniq).to eq([1])
    # Every step's result was recorded once: the recorded (pid, attempt) is one handler run, no attempt
    # finished twice, and no step finished twice anywhere but on the killed worker.
    done = done_lines
    expect(done.map { |l| [l[:step_uuid], l[:attempt]] }.tally.values.uniq).to eq([1])
    expect(done.reject { |l| l[:pid] == doomed.pid }.map { |l| l[:step_uuid] }.tally.values.uniq).to eq([1])
    steps.each do |step|
      recorded = done.select { |l| l[:step_uuid] == step[:step_uuid] && l[:pid] == step[:result]["pid"] }
      expect(recorded.map { |l| l[:attempt] }).to eq([step[:attempts]])
    end
    expect(psql_count("SELECT count(*) FROM tasker_ready_steps", db: db)).to eq(0)
    expect(survivor.status).to include(running: true, steps_in_flight: 0)
  end

  it "SIGTERM: the worker finishes its in-flight steps, hands back the queued ones, and exits 0" do
    leaving = start_pg_worker(db, worker_id: "crash-leaving")
    staying = start_pg_worker(db, worker_id: "crash-staying")
    start_client(db)
    uuids = create_slow_tasks(16)
    wait_until_running(leaving, 2)

    leaving.signal("TERM")
    running_at_term = running_in(leaving.pid)
    status = leaving.exit_status(10)

    expect(status&.exitstatus).to eq(0)
    results = uuids.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 30) }
    expect(results.map { |r| r[:status] }.tally).to eq("complete" => 16)
    steps = results.flat_map { |r| r[:steps] }.to_h { |s| [s[:step_uuid], s] }
    # What it was running finished there, as the first attempt, and was recorded before it exited.
    expect(running_at_term.size).to be >= 2
    running_at_term.each do |uuid|
      expect(steps.fetch(uuid)).to include(status: "complete", attempts: 1)
      expect(steps.fetch(uuid)[:result]["pid"]).to eq(leaving.pid)
    end
    # Nothing timed out or ran twice: what it had claimed but not started went back (attempt not counted).
    expect(steps.values.map { |s| s[:attempts] }.uniq).to eq([1])
    expect(done_lines.map { |l| l[:step_uuid] }.tally.values.uniq).to eq([1])
    expect(done_lines.map { |l| l[:step_uuid] }).to match_array(steps.keys)
    ran_by = steps.values.map { |s| s[:result]["pid"] }.uniq
    expect(ran_by).to contain_exactly(leaving.pid, staying.pid)
    expect(psql_count("SELECT count(*) FROM tasker_ready_steps", db: db)).to eq(0)
  end
end
