# frozen_string_literal: true

# Defect 2: on a lone main thread (a script: no other Ruby thread), the GVL release must not jump
# out of Rust frames. Each example runs a child Ruby whose only thread is its main thread.
RSpec.describe "The GVL release on a lone main thread" do
  include AdversarialHelpers

  let(:config) { "{ templates: #{AdversarialHelpers::ADVERSARIAL_TEMPLATES.inspect}, namespaces: ['adversarial'] }" }

  def child(code, env: {}, timeout: 60)
    out, err, status = run_ruby(code, env: { "TASKER_LOG_LEVEL" => "error" }.merge(env), timeout: timeout)
    expect(status).to be_success, "child failed (#{status.inspect}):\n#{out}\n#{err}"
    out
  end

  it "survives Ctrl-C during bootstrap_worker and stop_worker: the next bootstrap works" do
    code = <<~RUBY
      require "tasker_core"
      $stdout.sync = true
      config = #{config}
      # Ctrl-C as Interrupt through the interrupt queue (the default handler raises straight from the
      # signal, which Thread.handle_interrupt cannot defer): the script below defers it everywhere
      # but around the FFI calls, so that only the bridge meets it.
      trap("INT") { Thread.main.raise(Interrupt, "SIGINT") }
      cycles = interrupted = 0
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 3
      Thread.handle_interrupt(Interrupt => :never) do
        puts "ready"
        while Process.clock_gettime(Process::CLOCK_MONOTONIC) < deadline
          begin
            Thread.handle_interrupt(Interrupt => :immediate) do
              begin
                TaskerCore::FFI.stop_worker
              rescue TaskerCore::WorkerNotInitializedError
                nil
              end
              TaskerCore::FFI.bootstrap_worker(config)
            end
            cycles += 1
          rescue Interrupt
            interrupted += 1
          rescue TaskerCore::WorkerBootstrapError => e
            # An interrupted stop leaves the worker stopping: the next stop_worker finishes it.
            raise if e.message.include?("another bootstrap")
          end
        end
        # A SIGINT whose trap ran after the last :immediate block left an Interrupt pending, which
        # would be raised when this :never block ends: stop listening, then take what is pending.
        trap("INT", "IGNORE")
        begin
          Thread.handle_interrupt(Interrupt => :immediate) { Thread.pass }
        rescue Interrupt
          interrupted += 1
        end
      end
      begin
        TaskerCore::FFI.stop_worker
      rescue TaskerCore::WorkerNotInitializedError
        nil
      end
      final = TaskerCore::FFI.bootstrap_worker(config)
      TaskerCore::FFI.stop_worker
      puts "cycles=\#{cycles} interrupted=\#{interrupted} final=\#{final[:status]}"
    RUBY
    Open3.popen3({ "TASKER_LOG_LEVEL" => "error" }, RbConfig.ruby, "-I", SpecHelpers::LIB, "-e", code,
                 chdir: Dir.tmpdir) do |stdin, stdout, stderr, wait|
      stdin.close
      err = Thread.new { stderr.read }
      expect(stdout.gets).to eq("ready\n")
      sent = 0
      until_time = monotonic + 1.5
      while monotonic < until_time && wait.alive?
        Process.kill("INT", wait.pid)
        sent += 1
        sleep(rand(0.001..0.01))
      end
      out = Thread.new { stdout.read }
      unless wait.join(30)
        Process.kill("KILL", wait.pid)
        raise "child still running after 30s"
      end
      expect(wait.value).to be_success, "child failed after #{sent} SIGINTs:\n#{out.value}\n#{err.value}"
      report = out.value
      expect(report).to match(/final=running/)
      expect(report[/interrupted=(\d+)/, 1].to_i).to be > 0
    end
  end

  it "runs a task to its end under GC.stress without hanging" do
    out = child(<<~RUBY, timeout: 120)
      require "tasker_core"
      GC.stress = true
      TaskerCore::FFI.bootstrap_worker(#{config})
      uuid = TaskerCore.create_task(namespace: "adversarial", name: "twice", context: {})
      event = false
      event = TaskerCore::FFI.next_step_event(5) while event == false
      TaskerCore::FFI.send_step_completion_event(event_id: event[:event_id], task_uuid: event[:task_uuid],
                                                 step_uuid: event[:step_uuid], success: true, result: { "ok" => 1 })
      final = TaskerCore::FFI.wait_for_task(uuid, 30)
      TaskerCore::FFI.stop_worker
      GC.stress = false
      puts final[:status]
    RUBY
    expect(out).to eq("complete\n")
  end

  it "survives a flood of signals while it releases the GVL (the unblocking function's argument outlives the call)" do
    # Ruby's signal handler calls the lone main thread's unblocking function without a lock, and
    # can do so just after the GVL-released call has returned: memory passed to it must not be
    # freed by then (it was: a use after free, `malloc(): unaligned tcache chunk`, 1 run in 5).
    out = child(<<~RUBY, timeout: 90)
      require "tasker_core"
      trap("USR2") {}
      flooder = spawn("sh", "-c", "while kill -USR2 \#{Process.pid} 2>/dev/null; do :; done")
      calls = 0
      cycles = 0
      deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 4
      while Process.clock_gettime(Process::CLOCK_MONOTONIC) < deadline
        200.times { TaskerCore::FFI.log_debug("flood") }
        calls += 200
        TaskerCore::FFI.bootstrap_worker(#{config})
        TaskerCore::FFI.stop_worker
        cycles += 1
        GC.start if (cycles % 10).zero?
      end
      Process.kill("KILL", flooder)
      Process.wait(flooder)
      puts "calls=\#{calls} cycles=\#{cycles}"
    RUBY
    expect(out).to match(/calls=\d+ cycles=\d+/)
    expect(out[/cycles=(\d+)/, 1].to_i).to be > 5
  end

  it "makes log_info cheap (well under 20 µs a call on average over 2000 calls)" do
    out = child(<<~RUBY, env: { "TASKER_LOG_LEVEL" => "info" })
      require "tasker_core"
      200.times { |i| TaskerCore::FFI.log_info("warm-up \#{i}") }
      best = Array.new(3) do
        started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
        2000.times { |i| TaskerCore::FFI.log_info("line \#{i}") }
        (Process.clock_gettime(Process::CLOCK_MONOTONIC) - started) / 2000 * 1e6
      end.min
      puts best.round(2)
    RUBY
    average_us = out.to_f
    expect(average_us).to be < 20, "log_info took #{average_us} µs a call"
  end

  it "leaves no thread behind after 20 bootstrap/stop cycles (stop_worker joins the engine's threads)" do
    # The engine's threads are joined by stop_worker. The log writer thread is not the engine's: a
    # stop flushes the log by handing it to a fresh writer, and the old writer thread ends on its
    # own a moment later (tracing-appender gives no handle to join). So each count is taken once
    # the process is back to its baseline, or after 1 s: a thread that never ends still shows.
    out = child(<<~RUBY)
      require "tasker_core"
      count = -> { Dir.children("/proc/self/task").size }
      settled = lambda do |baseline|
        deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + 1
        seen = count.call
        while (baseline.nil? || seen > baseline) && Process.clock_gettime(Process::CLOCK_MONOTONIC) < deadline
          sleep 0.02
          seen = [seen, count.call].min
        end
        seen
      end
      TaskerCore::FFI.bootstrap_worker(#{config})
      TaskerCore::FFI.stop_worker
      before = settled.call(nil)
      after = Array.new(20) do
        TaskerCore::FFI.bootstrap_worker(#{config})
        TaskerCore::FFI.stop_worker
        settled.call(before)
      end
      puts [before, after.max].inspect
    RUBY
    before, after = JSON.parse(out)
    expect(after).to eq(before)
  end
end
