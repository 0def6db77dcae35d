# frozen_string_literal: true

require "securerandom"
require "tempfile"

RSpec.describe "TaskerCore errors across the FFI boundary" do
  let(:ffi) { TaskerCore::FFI }

  describe "hierarchy" do
    it "has TaskerCore::Error as a StandardError" do
      expect(TaskerCore::Error.superclass).to be(StandardError)
    end

    %w[WorkerNotInitializedError WorkerBootstrapError ConfigurationError FFIError RetryableError PermanentError]
      .each do |name|
      it "has TaskerCore::#{name} directly under TaskerCore::Error" do
        klass = TaskerCore.const_get(name)
        expect(klass).to be_a(Class)
        expect(klass.superclass).to be(TaskerCore::Error)
        expect(klass.new("boom")).to be_a(StandardError)
      end
    end

    it "has TaskerCore::TaskNotFoundError under FFIError (a uuid never created, or no longer known)" do
      expect(TaskerCore::TaskNotFoundError.superclass).to be(TaskerCore::FFIError)
      expect(TaskerCore::TaskNotFoundError.ancestors).to include(TaskerCore::Error, StandardError)
    end

    it "has TaskerCore::StepTimeoutError directly under TaskerCore::Error (raised inside a handler past its timeout)" do
      expect(TaskerCore::StepTimeoutError.superclass).to be(TaskerCore::Error)
      expect(TaskerCore::StepTimeoutError.new("late")).to be_a(StandardError)
    end

    it "lets a plain `rescue => e` catch every one of them" do
      caught = begin
        ffi.stop_worker
      rescue => e # rubocop:disable Style/RescueStandardError
        e
      end
      expect(caught).to be_a(TaskerCore::WorkerNotInitializedError)
    end

    it "gives RetryableError an optional retry_after" do
      expect(TaskerCore::RetryableError.new("later", retry_after: 5).retry_after).to eq(5)
      expect(TaskerCore::RetryableError.new("later").retry_after).to be_nil
      expect(TaskerCore::RetryableError.new("later", retry_after: 5).message).to eq("later")
    end
  end

  describe "panics" do
    # Rust's panic hook writes to file descriptor 2: capture it (and keep the suite's output clean).
    def capturing_stderr
      saved = $stderr.dup
      Tempfile.create("tasker-stderr") do |file|
        $stderr.reopen(file)
        begin
          yield
        ensure
          TaskerCore::FFI.flush_logs # lines are written by a background thread
          $stderr.flush
          $stderr.reopen(saved)
          saved.close
        end
        File.read(file.path)
      end
    end

    %w[gvl no_gvl].each do |place|
      it "turn a Rust panic (#{place}) into FFIError mentioning the panic, and the process keeps working" do
        stderr = capturing_stderr do
          expect { ffi.__provoke_panic(place) }.to raise_error(TaskerCore::FFIError, /panic/)
        end
        expect(stderr).to match(/ERROR .*panic caught/)

        result = ffi.bootstrap_worker({})
        expect(result).to include(success: true, status: "running")
        uuid = ffi.create_task(namespace: "test", name: "linear", version: "1.0.0", context: {})
        expect(ffi.task_status(uuid)[:task_uuid]).to eq(uuid)
        expect(ffi.stop_worker).to be(true)
      end
    end

    it "can happen many times, in several threads, with a worker running" do
      TaskerCore::Worker::Bootstrap.start!
      errors = nil
      capturing_stderr do
        errors = Array.new(4) do
          Thread.new do
            Array.new(10) do |i|
              ffi.__provoke_panic(i.even? ? "gvl" : "no_gvl")
            rescue TaskerCore::FFIError => e
              e
            end
          end
        end.flat_map(&:value)
      end

      expect(errors.size).to eq(40)
      expect(errors).to all(be_a(TaskerCore::FFIError))
      uuid = create_test_task
      expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")
    end

    it "does not abort a child process (no fatal, no signal)" do
      out, err, status = run_ruby(<<~RUBY, env: { "RUST_BACKTRACE" => "0" })
        require "tasker_core"
        %w[gvl no_gvl].each do |place|
          TaskerCore::FFI.__provoke_panic(place)
        rescue TaskerCore::FFIError => e
          puts e.class
        end
        TaskerCore::FFI.bootstrap_worker({})
        puts TaskerCore::FFI.worker_status[:state]
        TaskerCore::FFI.stop_worker
      RUBY

      expect(status).to be_success, err
      expect(status.signaled?).to be(false)
      expect(out.lines.map(&:chomp)).to eq(%w[TaskerCore::FFIError TaskerCore::FFIError running])
    end

    it "rejects an unknown place with ArgumentError" do
      stderr = capturing_stderr do
        expect { ffi.__provoke_panic("elsewhere") }.to raise_error(ArgumentError, /elsewhere/)
      end
      expect(stderr).to eq("")
    end
  end

  describe ".task_status" do
    before { ffi.bootstrap_worker({}) }

    it "raises TaskNotFoundError (an FFIError) for a string that is not a uuid: no such task was ever created" do
      expect { ffi.task_status("not-a-uuid") }.to raise_error(TaskerCore::TaskNotFoundError, /not-a-uuid/)
      expect { ffi.task_status("not-a-uuid") }.to raise_error(TaskerCore::FFIError)
      expect { ffi.wait_for_task("not-a-uuid", 1) }.to raise_error(TaskerCore::TaskNotFoundError, /not-a-uuid/)
    end

    it "raises TaskNotFoundError (an FFIError) for a uuid the worker does not know" do
      unknown = SecureRandom.uuid
      expect { ffi.task_status(unknown) }.to raise_error(TaskerCore::TaskNotFoundError, /#{unknown}/)
      expect { ffi.task_status(unknown) }.to raise_error(TaskerCore::FFIError)
      expect { ffi.wait_for_task(unknown, 1) }.to raise_error(TaskerCore::TaskNotFoundError, /#{unknown}/)
    end

    it "raises ArgumentError for a uuid that is not a String" do
      expect { ffi.task_status(42) }.to raise_error(ArgumentError, /must be a String/)
      expect { ffi.task_status(nil) }.to raise_error(ArgumentError, /must be a String/)
    end

    it "answers for a task that exists" do
      uuid = ffi.create_task(namespace: "test", name: "linear", context: { "value" => 1 })
      expect(ffi.task_status(uuid)).to include(task_uuid: uuid, namespace: "test", name: "linear")
    end
  end

  describe "calls that need a worker" do
    it "create_task without a worker raises WorkerNotInitializedError" do
      expect { ffi.create_task(namespace: "test", name: "linear", version: "1.0.0", context: {}) }
        .to raise_error(TaskerCore::WorkerNotInitializedError, /bootstrap/)
    end

    it "TaskerCore.create_task without a worker raises WorkerNotInitializedError" do
      expect { create_test_task }.to raise_error(TaskerCore::WorkerNotInitializedError)
    end

    it "task_status without a worker raises WorkerNotInitializedError" do
      expect { ffi.task_status(SecureRandom.uuid) }.to raise_error(TaskerCore::WorkerNotInitializedError)
    end
  end

  describe "create_task with a worker" do
    before { ffi.bootstrap_worker({}) }

    it "raises ConfigurationError for an unknown template, naming it" do
      expect { ffi.create_task(namespace: "test", name: "nope", version: "1.0.0", context: {}) }
        .to raise_error(TaskerCore::ConfigurationError, %r{test/nope})
    end

    it "raises ConfigurationError for a context that is not a Hash" do
      expect { ffi.create_task(namespace: "test", name: "linear", version: "1.0.0", context: [1]) }
        .to raise_error(TaskerCore::ConfigurationError, /context/)
    end

    it "raises ConfigurationError for a context that is not JSON-able" do
      expect { ffi.create_task(namespace: "test", name: "linear", version: "1.0.0", context: { "at" => Object.new }) }
        .to raise_error(TaskerCore::ConfigurationError, /context/)
    end
  end
end
