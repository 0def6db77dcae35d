# frozen_string_literal: true

# Defect 7: a forked child starts clean: it can bootstrap even if another thread of the parent was
# bootstrapping at the fork, and the parent's on_shutdown hooks and at_exit do not run in it.
RSpec.describe "fork" do
  include AdversarialHelpers

  # The child never runs a step: its handlers are not defined, so their check at boot is off.
  let(:config) do
    "{ templates: #{AdversarialHelpers::ADVERSARIAL_TEMPLATES.inspect}, namespaces: ['adversarial'], " \
      "validate_handlers: false }"
  end

  it "lets a child bootstrap when it was forked during another thread's bootstrap" do
    out, err, status = run_ruby(<<~RUBY, env: { "TASKER_LOG_LEVEL" => "error" })
      require "tasker_core"
      require "socket"
      # A "database" that accepts connections and never answers: the bootstrap waits for it.
      silent = TCPServer.new("127.0.0.1", 0)
      url = "postgres://nobody@127.0.0.1:\#{silent.addr[1]}/nothing"
      slow = Thread.new do
        TaskerCore::FFI.bootstrap_worker(backend: "postgres", database_url: url, templates: #{AdversarialHelpers::ADVERSARIAL_TEMPLATES.inspect})
      rescue StandardError => e
        e
      end
      sleep 0.05 until slow.status == "sleep"
      sleep 0.2
      reader, writer = IO.pipe
      pid = fork do
        reader.close
        result = begin
          started = TaskerCore::FFI.bootstrap_worker(#{config})
          TaskerCore::FFI.stop_worker
          started[:status]
        rescue StandardError => e
          "\#{e.class}: \#{e.message}"
        end
        writer.puts(result)
        exit!(0)
      end
      writer.close
      Process.wait(pid)
      puts reader.read
      $stdout.flush
      exit!(0)
    RUBY
    expect(status).to be_success, err
    expect(out).to eq("running\n")
  end

  it "runs on_shutdown hooks and at_exit only in the process that started the worker" do
    Dir.mktmpdir("tasker-fork") do |dir|
      out, err, status = run_ruby(<<~RUBY)
        require "tasker_core"
        TaskerCore::Worker::Bootstrap.instance.on_shutdown { File.write(File.join(#{dir.inspect}, Process.pid.to_s), "") }
        TaskerCore::Worker::Bootstrap.start!(#{config})
        child = fork { exit 0 }
        Process.wait(child)
        puts child
      RUBY
      expect(status).to be_success, err
      child_pid = out.to_i
      hooks_ran_in = Dir.children(dir).map(&:to_i)
      expect(hooks_ran_in.size).to eq(1), "hooks ran in #{hooks_ran_in} (child #{child_pid})"
      expect(hooks_ran_in).not_to include(child_pid)
    end
  end
end

# Issue H: a worker booted before fork (Puma's preload_app!, Unicorn) is the parent's alone. The
# child sees none, starts its own (on_worker_boot), and both run tasks.
RSpec.describe "fork after boot" do
  it "gives the child no worker; the child starts its own; parent and child both run tasks" do
    handlers = File.join(FIXTURES, "cli", "handlers.rb")
    templates = File.join(FIXTURES, "cli", "templates")
    out, err, status = run_ruby(<<~RUBY, env: { "TASKER_LOG_LEVEL" => "error" }, timeout: 60)
      require "tasker_core"
      require #{handlers.inspect}
      $stdout.sync = true
      worker = TaskerCore::Worker::Bootstrap
      run_one = -> { TaskerCore.wait_for_task(TaskerCore.create_task(namespace: "cli", name: "pair"), timeout: 10)[:status] }
      worker.start!(templates: #{templates.inspect}, concurrency: 2)
      puts "parent before: \#{run_one.call}"
      reader, writer = IO.pipe
      pid = fork do
        reader.close
        lines = []
        lines << "child sees running?=\#{worker.instance.running?} ffi=\#{TaskerCore::FFI.worker_status[:running]}"
        begin
          TaskerCore.create_task(namespace: "cli", name: "pair")
        rescue TaskerCore::WorkerNotInitializedError => e
          lines << "child create before start!: \#{e.class}"
        end
        worker.start!(templates: #{templates.inspect}, concurrency: 2)
        lines << "child running?=\#{worker.instance.running?} pid_matches=\#{worker.instance.status[:running]}"
        lines << "child task: \#{run_one.call}"
        worker.instance.shutdown!
        writer.puts(lines)
        writer.close
        exit 0 # at_exit runs in the child: it must not touch the parent's worker
      end
      writer.close
      child_lines = reader.read
      Process.wait(pid)
      puts child_lines
      puts "child exit: \#{$?.exitstatus}"
      puts "parent after: \#{run_one.call} running?=\#{worker.instance.running?}"
      puts "parent steps: \#{TaskerCore::FFI.worker_status[:steps_processed]}"
    RUBY
    expect(status).to be_success, err
    expect(out.lines.map(&:chomp)).to eq(
      ["parent before: complete",
       "child sees running?=false ffi=false",
       "child create before start!: TaskerCore::WorkerNotInitializedError",
       "child running?=true pid_matches=true",
       "child task: complete",
       "child exit: 0",
       "parent after: complete running?=true",
       # Two tasks of two steps each ran in the parent, none of the child's.
       "parent steps: 4"]
    )
  end
end
