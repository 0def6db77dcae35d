# frozen_string_literal: true

# A worker claims ahead of its handler threads by how fast it finishes steps: with slow steps it
# holds little more than one per thread, so another worker with free threads gets the rest.
# slow.yml: first -> second, 0.5 s each.
RSpec.describe "PostgreSQL backend: claiming ahead" do
  include_context "postgres database"

  let(:log) { File.join(Dir.tmpdir, "tasker_pg_claim_ahead_#{Process.pid}_#{rand(1 << 30)}.log") }

  after { FileUtils.rm_f(log) }

  def claimed_by(worker_id)
    Integer(psql_rows("SELECT count(*) FROM tasker_ready_steps WHERE claimed_by = '#{worker_id}'", db: db)
      .first.first)
  end

  def started_by(pid)
    handler_log(log).count { |l| l[:pid] == pid && l[:event] == "start" }
  end

  it "with slow steps holds about twice its threads, and a second worker gets the rest at once" do
    first = start_pg_worker(db, worker_id: "ahead-first", concurrency: 2)
    start_client(db)
    uuids = Array.new(30) { create_pg_task("slow", "log" => log) }
    eventually(timeout: 10) { started_by(first.pid) >= 2 }

    # 2 x concurrency held; the table also shows, until its record is written, each step finished
    # meanwhile (a few ms; allow 2 x concurrency of them). A worker that hoarded would hold all 30.
    held = Array.new(8) { claimed_by("ahead-first").tap { sleep 0.1 } }
    expect(held.max).to be <= 8
    expect(held.min).to be <= 4

    second = start_pg_worker(db, worker_id: "ahead-second", concurrency: 2)
    # Not after the first worker's claims time out: the second starts steps within a second or two.
    eventually(timeout: 3) { started_by(second.pid) >= 2 }

    results = uuids.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 60) }
    expect(results.map { |r| r[:status] }.tally).to eq("complete" => 30)
    expect(results.flat_map { |r| r[:steps].map { |s| s[:attempts] } }.uniq).to eq([1])
  end
end
