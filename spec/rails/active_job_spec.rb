# frozen_string_literal: true

require "spec_helper"
require "json"

# Active Job on tasker_core in a real Rails 6.1 app (Debian's railties and activejob) on the real
# PostgreSQL: a web-like process enqueues through a client-only connection, `bin/rails
# tasker:worker` (a child process) runs the jobs. What the jobs did is read from the lines they
# append to a file.
RSpec.describe "Active Job adapter :tasker_core (Rails, PostgreSQL)" do
  include PostgresHelpers

  before(:all) do
    @db = create_spec_database
    @app = RailsJobApp.create(Dir.mktmpdir("tasker-job-app"))
  end

  after(:all) do
    FileUtils.rm_rf(@app) if @app
    drop_spec_database(@db) if @db
  end

  let(:job_log) { File.join(@app, "log", "jobs-#{SecureRandom.hex(4)}.jsonl") }
  let(:env) do
    { "TASKER_TEMPLATE_PATH" => nil, "RUBYLIB" => SpecHelpers::LIB, "TASKER_DATABASE_URL" => pg_url(@db),
      "JOB_LOG" => job_log, "RAILS_ENV" => "development" }
  end

  def start_worker
    stdin, stdout, stderr, wait = Open3.popen3(env, RbConfig.ruby, "bin/rails", "tasker:worker", chdir: @app)
    stdin.close
    @worker = [stdout, stderr, wait]
    line = Timeout.timeout(90) { stdout.gets }
    # (stderr is read only on failure: it ends when the worker does.)
    return if line&.match?(/running \(development, backend postgres, namespaces critical, default\)/)

    raise "worker did not start: #{line.inspect}\n#{stderr.read}"
  end

  def stop_worker
    return unless @worker

    stdout, stderr, wait = @worker
    Process.kill("TERM", wait.pid)
    status = Timeout.timeout(40) { wait.value }
    expect(status.exitstatus).to eq(0), -> { stderr.read }
    stdout.close
    stderr.close
    @worker = nil
  end

  after do
    _, _, wait = @worker
    Process.kill("KILL", wait.pid) if wait&.alive?
  end

  def run_script(script)
    out, err, status = Timeout.timeout(120) { Open3.capture3(env, RbConfig.ruby, script, chdir: @app) }
    expect(status).to be_success, "#{script} failed:\n#{out}\n#{err}"
    out.lines.map { |line| JSON.parse(line) }
  end

  def job_lines
    File.exist?(job_log) ? File.readlines(job_log).map { |l| JSON.parse(l) } : []
  end

  it "connects a client-only process at its first task call, not at boot" do
    File.write(File.join(@app, "script/lazy.rb"), <<~RUBY)
      require_relative "../config/environment"
      require "json"
      before = TaskerCore::FFI.worker_status[:running]
      tasks = TaskerCore.tasks(limit: 1)[:tasks]
      puts JSON.generate("before" => before, "after" => TaskerCore::FFI.worker_status.slice(:running, :backend),
                         "tasks" => tasks.class.name, "client" => TaskerCore::ClientOnDemand.client.class.name)
    RUBY

    result, = run_script("script/lazy.rb")
    expect(result).to eq("before" => false, "after" => { "running" => true, "backend" => "postgres" },
                         "tasks" => "Array", "client" => "TaskerCore::Client")
  end

  it "runs perform_later, set(wait:), set(wait_until:), retry_on and discard_on jobs, and fails the task of " \
     "a job that raises" do
    start_worker
    enqueued, finals, client = run_script("script/enqueue.rb")

    # One task per job: namespace = queue, the generated template; scheduled ones still pending.
    early = enqueued["early"]
    expect(early["now"]).to include("namespace" => "default", "name" => "active_job")
    expect(early["flaky"]).to include("namespace" => "critical")
    expect(early.values_at("later", "until").map { |s| s["status"] }).to eq(%w[pending pending])

    error_tasks = finals.delete("error_tasks")
    expect(finals.transform_values { |f| f["status"] })
      .to eq("now" => "complete", "later" => "complete", "until" => "complete", "flaky" => "complete",
             "discarded" => "complete", "failing" => "error", "exhausted" => "complete")
    # Once retry_on's attempts are used up it raises: the last task of the job ends in error.
    expect(error_tasks).to eq(["ArgumentError: boom from the job", "FlakyError: never works"])
    expect(finals["failing"]["step"]).to include("status" => "error", "attempts" => 1)
    expect(finals["failing"]["step"]["error_message"]).to match(/ArgumentError.*boom from the job|boom from the job/)

    # The web process was a client: no handler thread, no namespace of its own.
    expect(client).to eq("client" => true, "namespaces" => [], "handler_threads" => 0)

    # retry_on re-enqueued FlakyJob (waiting 1 s each time) until its third execution succeeded.
    Timeout.timeout(30) { sleep 0.2 until job_lines.any? { |l| l["job"] == "FlakyJob" && l["event"] == "performed" } }
    stop_worker
    lines = job_lines
    flaky = lines.select { |l| l["job"] == "FlakyJob" }
    expect(flaky.map { |l| [l["event"], l["executions"]] })
      .to eq([["started", 1], ["started", 2], ["started", 3], ["performed", 3]])
    expect(flaky.map { |l| l["job_id"] }.uniq.size).to eq(1)
    starts = flaky.select { |l| l["event"] == "started" }.map { |l| l["at"] }
    expect(starts.each_cons(2).map { |a, b| b - a }).to all(be >= 1.0)

    performed = lines.select { |l| l["job"] == "RecordJob" }.to_h { |l| [l["label"], l] }
    # Arguments went through Active Job's serializer: a Hash with Symbol keys and a Time.
    expect(performed["now"]).to include("options_class" => "Hash", "symbol_key" => true,
                                        "at_class" => "Time")
    # Scheduled jobs ran no earlier than asked.
    expect(performed["later"]["at"]).to be >= enqueued["enqueued_at"] + 2 - 0.5
    expect(performed["until"]["at"]).to be >= enqueued["enqueued_at"] + 2 - 0.5
    expect(performed.values.map { |l| l["pid"] }.uniq).not_to include(Process.pid)

    expect(lines.count { |l| l["job"] == "DiscardedJob" }).to eq(1)
    expect(lines.count { |l| l["job"] == "FailingJob" }).to eq(1)
    expect(lines.select { |l| l["job"] == "ExhaustedJob" }.map { |l| l["executions"] }).to eq([1, 2])

    # log_output "rails": the engine's and the handlers' lines are in the Rails log.
    log = File.read(File.join(@app, "log", "app.log"))
    expect(log).to include("postgres backend ready")
    expect(log).to include("performing now")
  end
end
