# frozen_string_literal: true

require "json"
require "open3"
require "net/http"
require "rbconfig"
require "socket"
require "tmpdir"
require "yaml"

# The `tasker-worker` executable, run as a child process (`ruby -I lib exe/tasker-worker`, no
# installed gem), as a deployment would run it.
# A running tasker-worker: its stderr is collected as it comes.
class CliSpecWorkerCommand
  attr_reader :pid

  def initialize(exe, args, env)
    @stdin, @stdout, @stderr, @wait = Open3.popen3(
      { "TASKER_LOG_LEVEL" => "info" }.merge(env), RbConfig.ruby, "-I", SpecHelpers::LIB, exe, *args,
      chdir: Dir.tmpdir
    )
    @stdin.close
    @pid = @wait.pid
    @err = +""
    @lock = Mutex.new
    @readers = [Thread.new { @stderr.each_line { |l| @lock.synchronize { @err << l } } }, Thread.new { @stdout.read }]
  end

  def stderr
    @lock.synchronize { @err.dup }
  end

  def signal(name)
    Process.kill(name, @pid)
  end

  # Waits for a stderr line matching `pattern`; returns it.
  def wait_for(pattern, timeout: 20)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      line = stderr.lines.find { |l| l.match?(pattern) }
      return line if line
      raise "no line matching #{pattern.inspect} within #{timeout}s; stderr:\n#{stderr}" if past?(deadline)
      raise "tasker-worker exited (#{@wait.value.inspect}) before #{pattern.inspect}; stderr:\n#{stderr}" unless alive?

      sleep 0.02
    end
  end

  def alive?
    @wait.alive?
  end

  # The exit status, or nil if still running after `timeout` (then it is killed).
  def exit_status(timeout: 20)
    return @wait.value.tap { @readers.each(&:join) } if @wait.join(timeout)

    kill
    nil
  end

  def kill
    Process.kill("KILL", @pid) if alive?
    @wait.join(5)
  end

  private

  def past?(deadline)
    Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline
  end
end

module CliSpecPaths
  EXE = File.expand_path("../../exe/tasker-worker", __dir__)
  HANDLERS = File.join(FIXTURES, "cli", "handlers.rb")
  MEMORY_TASKS = File.join(FIXTURES, "cli", "memory_tasks.rb")
  TEMPLATES = File.join(FIXTURES, "cli", "templates")

  def exe = EXE
  def handlers = HANDLERS
  def memory_tasks = MEMORY_TASKS
  def templates = TEMPLATES
end

RSpec.describe "tasker-worker" do
  include CliSpecPaths

  let(:dir) { Dir.mktmpdir("tasker-cli") }
  let(:log) { File.join(dir, "steps.log") }
  let(:tasks_log) { File.join(dir, "tasks.log") }
  let(:commands) { [] }

  after do
    commands.each(&:kill)
    FileUtils.rm_rf(dir)
  end

  def run_command(*args, env: {})
    Open3.capture3({ "TASKER_LOG_LEVEL" => "info" }.merge(env), RbConfig.ruby, "-I", SpecHelpers::LIB, exe, *args,
                   chdir: Dir.tmpdir)
  end

  def start(*args, env: {})
    CliSpecWorkerCommand.new(exe, args, env).tap { |command| commands << command }
  end

  # A memory-backend worker that creates one cli/pair task per context once it runs.
  def start_memory(*args, contexts:, env: {})
    start("-r", handlers, "-r", memory_tasks, "-t", templates, *args,
          env: { "CLI_SPEC_TASKS" => JSON.generate(contexts), "CLI_SPEC_LOG" => tasks_log }.merge(env))
  end

  # [{step:, task:, attempt:, pid:, event:}] from CliSpec::Step's log.
  def step_log
    return [] unless File.exist?(log)

    File.readlines(log).map do |line|
      step, task, attempt, pid, event = line.split
      { step: step, task: task, attempt: Integer(attempt), pid: Integer(pid), event: event }
    end
  end

  def events_of(step)
    step_log.select { |l| l[:step] == step }.map { |l| l[:event] }
  end

  def slow_first(seconds)
    { "log" => log, "plan" => { "first" => { "sleep" => seconds } } }
  end

  describe "command line" do
    it "prints its version and its help" do
      out, _err, status = run_command("--version")
      expect(status.exitstatus).to eq(0)
      expect(out).to eq("tasker-worker #{TaskerCore::VERSION}\n")

      out, _err, status = run_command("--help")
      expect(status.exitstatus).to eq(0)
      %w[--require --concurrency --namespaces --templates --backend --database-url --shutdown-timeout --environment
         --config --web --web-actions --version --help TSTP TTIN].each { |option| expect(out).to include(option) }
    end

    it "exits 2 naming the problem for a bad option, a bad value or a bad config file" do
      _out, err, status = run_command("--concurrency", "zero")
      expect(status.exitstatus).to eq(2)
      expect(err).to include("invalid argument: --concurrency zero")

      _out, err, status = run_command("--backend", "postgres")
      expect(status.exitstatus).to eq(2)
      expect(err).to include("--backend postgres needs --database-url")

      file = File.join(dir, "worker.yml")
      File.write(file, { "concurrency" => 2, "colour" => "blue" }.to_yaml)
      _out, err, status = run_command("-C", file)
      expect(status.exitstatus).to eq(2)
      expect(err).to include("unknown option \"colour\"")
    end

    it "exits 1 with the reason when the worker cannot start" do
      _out, err, status = run_command("-t", File.join(dir, "missing"), "-r", handlers)
      expect(status.exitstatus).to eq(1)
      expect(err).to match(/tasker-worker could not start: TaskerCore::ConfigurationError: .*missing/)

      # The handlers were not required: the check at boot names the missing class.
      _out, err, status = run_command("-t", templates)
      expect(status.exitstatus).to eq(1)
      expect(err).to match(/could not start: .*CliSpec::Step is not defined/m)
    end
  end

  describe "on the memory backend" do
    it "runs tasks, logs its options at start, drains on TERM and logs its counts at exit" do
      worker = start_memory("-c", "3", "-n", "cli", "--shutdown-timeout", "10", "-e", "staging",
                            contexts: [{ "log" => log }, slow_first(1.0)])
      started = worker.wait_for(/tasker-worker #{Regexp.escape(TaskerCore::VERSION)} started/)
      expect(started).to include("concurrency=3", 'namespaces="cli"', 'environment="staging"', "shutdown_timeout=10.0")
      eventually(timeout: 10) { events_of("first").count("start") == 2 && events_of("second").include?("done") }

      worker.signal("TERM")
      status = worker.exit_status
      expect(status&.exitstatus).to eq(0), worker.stderr
      # The slow step finished during the drain; the second step of its task never started.
      expect(events_of("first").count("done")).to eq(2)
      expect(events_of("second").count("start")).to eq(1)
      expect(worker.stderr).to match(/tasker-worker stopped .*steps_processed=3 .*handed_back=0/)
    end

    it "serves the web API and dashboard at --web BIND, the token from $TASKER_WEB_TOKEN" do
      port = TCPServer.new("127.0.0.1", 0).then { |server| server.addr[1].tap { server.close } }
      worker = start_memory("--web", "127.0.0.1:#{port}", "--web-actions",
                            contexts: [{ "log" => log }], env: { "TASKER_WEB_TOKEN" => "cli-token" })
      expect(worker.wait_for(/tasker-worker .* started/)).to include("web=", "127.0.0.1:#{port}")
      get = lambda do |path, headers = {}|
        Net::HTTP.start("127.0.0.1", port, open_timeout: 5, read_timeout: 5) do |http|
          http.request(Net::HTTP::Get.new(path, headers))
        end
      end
      bearer = { "Authorization" => "Bearer cli-token" }
      expect(get.call("/health").code).to eq("401")
      expect(get.call("/health", bearer).code).to eq("200")
      expect(JSON.parse(get.call("/api/session", bearer).body)).to include("actions" => true, "token_required" => true)
      expect(get.call("/", bearer).body).to include("assets/app.js")

      worker.signal("TERM")
      expect(worker.exit_status&.exitstatus).to eq(0), worker.stderr
      expect { TCPSocket.new("127.0.0.1", port).close }.to raise_error(Errno::ECONNREFUSED)
    end

    it "exits 2 for --web-actions without --web, 1 naming web_api_bind for a bad or open bind" do
      _out, err, status = run_command("--web-actions")
      expect([status.exitstatus, err]).to match([2, /--web-actions needs --web BIND/])
      _out, err, status = run_command("--web", "")
      expect([status.exitstatus, err]).to match([2, /invalid argument: --web/])
      _out, err, status = run_command("-r", handlers, "-t", templates, "--web", "somewhere")
      expect([status.exitstatus, err]).to match([1, /could not start: TaskerCore::ConfigurationError: web_api_bind/])
      _out, err, status = run_command("-r", handlers, "-t", templates, "--web", "0.0.0.0:0")
      expect([status.exitstatus, err])
        .to match([1, /web_api_bind: 0\.0\.0\.0:0 is reachable from other hosts.*web_api_token/])
    end

    it "reads its options from -C config.yml; the command line wins" do
      file = File.join(dir, "worker.yml")
      File.write(file, <<~YAML)
        concurrency: 2
        templates: <%= #{templates.inspect} %>
        require: [#{handlers.inspect}, #{memory_tasks.inspect}]
        shutdown-timeout: 7
        environment: from_file
      YAML
      worker = start("-C", file, "-e", "from_cli", env: { "CLI_SPEC_TASKS" => JSON.generate([{ "log" => log }]),
                                                          "CLI_SPEC_LOG" => tasks_log })
      started = worker.wait_for(/tasker-worker .* started/)
      expect(started).to include("concurrency=2", "shutdown_timeout=7.0", 'environment="from_cli"')
      eventually(timeout: 10) { File.exist?(tasks_log) && File.read(tasks_log).include?("complete") }
      worker.signal("INT")
      expect(worker.exit_status&.exitstatus).to eq(0)
    end

    it "past --shutdown-timeout raises TaskerCore::Shutdown in the handler (its transaction rolls back) and exits 0" do
      worker = start_memory("--shutdown-timeout", "0.5", contexts: [slow_first(60)])
      eventually(timeout: 10) { events_of("first").include?("start") }
      worker.signal("TERM")
      status = worker.exit_status(timeout: 15)
      expect(status&.exitstatus).to eq(0), worker.stderr
      expect(events_of("first")).to eq(%w[start rollback ensure])
      expect(worker.stderr).to include("shutdown deadline passed: step handed back, raising TaskerCore::Shutdown")
      expect(worker.stderr).to match(/tasker-worker stopped .*handed_back=1 abandoned=0/)
    end

    it "exits at once with 130 on a second INT" do
      worker = start_memory("--shutdown-timeout", "60", contexts: [slow_first(60)])
      eventually(timeout: 10) { events_of("first").include?("start") }
      worker.signal("INT")
      worker.wait_for(/SIGINT: draining/)
      worker.signal("INT")
      status = worker.exit_status(timeout: 5)
      expect(status&.exitstatus).to eq(130), worker.stderr
      expect(worker.stderr).to include("second SIGINT: exiting now")
    end

    it "logs every thread's backtrace and the worker status on TTIN, and keeps running" do
      worker = start_memory("-c", "2", contexts: [slow_first(60)])
      eventually(timeout: 10) { events_of("first").include?("start") }
      worker.signal("TTIN")
      worker.wait_for(/worker status .*state="running"/)
      dump = worker.stderr
      expect(dump).to match(/thread main \(run\)/)
      expect(dump).to match(/thread tasker-handler-\d \(sleep\).*handlers\.rb/)
      expect(worker).to be_alive
    end
  end

  describe "on PostgreSQL" do
    include_context "postgres database"

    # This process creates the tasks (a worker of its own serving a namespace with no steps).
    def start_spec_client
      TaskerCore::Worker::Bootstrap.start!(backend: "postgres", database_url: pg_url(db), templates: templates,
                                           namespaces: ["cli_client"], log_level: "error",
                                           install_signal_handlers: false)
    end

    def create_pair(context)
      TaskerCore.create_task(namespace: "cli", name: "pair", context: context)
    end

    def start_pg(*args)
      start("-r", handlers, "-t", templates, "--backend", "postgres", "--database-url", pg_url(db), *args)
    end

    it "runs tasks created by another process, and drains on TERM" do
      worker = start_pg("-c", "2", "--shutdown-timeout", "20")
      worker.wait_for(/tasker-worker .* started .*backend="postgres"/)
      start_spec_client
      uuids = [create_pair("log" => log), create_pair(slow_first(1.0))]
      expect(TaskerCore.wait_for_task(uuids[0], timeout: 15)[:status]).to eq("complete")
      eventually(timeout: 10) { events_of("first").count("start") == 2 }

      worker.signal("TERM")
      expect(worker.exit_status&.exitstatus).to eq(0), worker.stderr
      # The slow first step finished in the drain; its successor waits for another worker.
      slow = TaskerCore.task_status(uuids[1])
      expect(step_of(slow, "first")[:status]).to eq("complete")
      expect(step_of(slow, "second")[:status]).to eq("enqueued").or eq("pending")
    end

    it "hands a step still running past --shutdown-timeout back: another worker runs it" do
      worker = start_pg("--shutdown-timeout", "0.5")
      worker.wait_for(/tasker-worker .* started/)
      start_spec_client
      uuid = create_pair(slow_first(3))
      eventually(timeout: 10) { events_of("first").include?("start") }
      first_pid = step_log.first[:pid]

      worker.signal("TERM")
      expect(worker.exit_status(timeout: 15)&.exitstatus).to eq(0), worker.stderr
      expect(events_of("first")).to eq(%w[start rollback ensure])
      # Handed back: ready again at once (not after its 120 s timeout), and the attempt did not count.
      expect(step_of(TaskerCore.task_status(uuid), "first")).to include(attempts: 0)

      successor = start_pg
      expect(TaskerCore.wait_for_task(uuid, timeout: 30)[:status]).to eq("complete"), successor.stderr
      reruns = step_log.select { |l| l[:step] == "first" && l[:event] == "done" }
      expect(reruns.map { |l| l[:pid] }).to eq([successor.pid])
      expect(reruns.map { |l| l[:pid] }).not_to include(first_pid)
      successor.signal("TERM")
      expect(successor.exit_status&.exitstatus).to eq(0)
    end

    it "takes no step while quiet (TSTP) and takes them again after CONT" do
      worker = start_pg("-c", "2")
      worker.wait_for(/tasker-worker .* started/)
      worker.signal("TSTP")
      worker.wait_for(/quiet: no new steps start until resumed \(SIGCONT\)/)
      start_spec_client
      uuid = create_pair("log" => log)
      sleep 1.5
      expect(step_log).to be_empty
      expect(TaskerCore.task_status(uuid)[:status]).to eq("pending").or eq("in_progress")

      worker.signal("CONT")
      worker.wait_for(/resumed: steps start again/)
      expect(TaskerCore.wait_for_task(uuid, timeout: 15)[:status]).to eq("complete")
      worker.signal("TERM")
      expect(worker.exit_status&.exitstatus).to eq(0)
    end
  end
end
