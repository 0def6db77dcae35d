# frozen_string_literal: true

require "io/wait"

# Defects 6 and 8: stderr is never written with the GVL held; smaller holes at the boundary.
RSpec.describe "The Ruby-Rust boundary" do
  include AdversarialHelpers

  # A child whose stderr is a pipe nobody reads (so it fills up and writes block), with a ticker
  # thread printing to stdout: the ticks must go on while another thread logs into the full pipe.
  def ticks_while_stderr_blocked(logging_loop)
    code = <<~RUBY
      require "tasker_core"
      $stdout.sync = true
      Thread.new { loop { puts "tick"; sleep 0.01 } }
      Thread.new { loop { #{logging_loop} } }
      sleep 60
    RUBY
    Open3.popen3({ "TASKER_LOG_LEVEL" => "warn" }, RbConfig.ruby, "-I", SpecHelpers::LIB, "-e", code,
                 chdir: Dir.tmpdir) do |stdin, stdout, _stderr, wait|
      stdin.close
      stdout.gets
      sleep 1.5 # long enough for the logging thread to fill stderr's pipe
      ticks = 0
      finish = monotonic + 1
      while (left = finish - monotonic).positive?
        ticks += 1 if stdout.wait_readable(left) && stdout.gets
      end
      ticks
    ensure
      Process.kill("KILL", wait.pid)
      wait.join
    end
  end

  it "keeps every Ruby thread running while refused-completion warnings wait for a blocked stderr" do
    uuid = SecureRandom.uuid
    refusal = "TaskerCore::FFI.send_step_completion_event(event_id: '#{uuid}', task_uuid: '#{uuid}', " \
              "step_uuid: '#{uuid}', success: true)"
    expect(ticks_while_stderr_blocked(refusal)).to be > 30
  end

  it "keeps every Ruby thread running while caught panics are logged to a blocked stderr" do
    panic = "begin; TaskerCore::FFI.__provoke_panic('gvl'); rescue TaskerCore::FFIError; end"
    expect(ticks_while_stderr_blocked(panic)).to be > 30
  end

  describe "with a worker" do
    after do
      TaskerCore::FFI.stop_worker if TaskerCore::FFI.worker_status[:running]
    rescue TaskerCore::WorkerNotInitializedError
      nil
    end

    it "refuses binary-encoded Symbol keys in a completion with ArgumentError, and the step can still complete" do
      TaskerCore::FFI.bootstrap_worker(adversarial_config(concurrency: 1))
      uuid = create_adversarial_task
      event = TaskerCore::FFI.next_step_event(5)
      binary = "caf\xC3".b.to_sym
      expect(binary.encoding).to eq(Encoding::BINARY)

      [{ result: { binary => 1 } }, { metadata: { binary => 1 } }, { result: [binary] }].each do |bad|
        expect { TaskerCore::FFI.send_step_completion_event(success_for(event).merge(bad)) }
          .to raise_error(ArgumentError, /UTF-8/)
      end
      expect(TaskerCore::FFI.send_step_completion_event(success_for(event))).to be(true)
      expect(TaskerCore::FFI.wait_for_task(uuid, 5)[:status]).to eq("complete")
    end

    it "reads shutting_down as soon as transition_to_graceful_shutdown returns" do
      states = Array.new(30) do
        TaskerCore::FFI.bootstrap_worker(adversarial_config(concurrency: 1))
        TaskerCore::FFI.transition_to_graceful_shutdown
        state = TaskerCore::FFI.worker_status[:state]
        TaskerCore::FFI.stop_worker
        state
      end
      expect(states.tally).to eq("shutting_down" => 30)
    end
  end

  it "refuses __measure_thread_wake with absurd sizes instead of aborting the process" do
    expect { TaskerCore::FFI.__measure_thread_wake(2**40, 0, "pair") }.to raise_error(ArgumentError, /samples/)
    expect { TaskerCore::FFI.__measure_thread_wake(1000, 1.0, "pair") }.to raise_error(ArgumentError, /at most 60s/)
    expect(TaskerCore::FFI.__measure_thread_wake(3, 0, "pair").size).to eq(3)
  end

  it "builds the test hooks only when asked (an installed gem has no __provoke_panic)" do
    makefile = Dir.mktmpdir("tasker-extconf") do |dir|
      _out, err, status = Open3.capture3({ "TASKER_CORE_TEST_HOOKS" => nil }, RbConfig.ruby,
                                         File.join(SpecHelpers::LIB, "../ext/tasker_core/extconf.rb"), chdir: dir)
      expect(status).to be_success, err
      File.read(File.join(dir, "Makefile"))
    end
    expect(makefile).not_to include("test-hooks")
  end
end
