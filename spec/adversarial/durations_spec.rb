# frozen_string_literal: true

# Defect 3: every duration that comes from Ruby is validated or clamped; nothing a handler returns
# stops the engine. Limits (README): timeouts and retry_after above one year count as one year.
RSpec.describe "Durations from Ruby" do
  include AdversarialHelpers
  include_context "workflow worker"

  # The first attempt raises RetryableError with this retry_after (Floats JSON cannot carry, so not
  # through the task's context); the second succeeds.
  def retry_plan(retry_after)
    AdversarialHelpers::RetryAfterHandler.retry_after = retry_after
    {}
  end

  def step_of(status)
    status.fetch(:steps).first
  end

  describe "retry_after from a handler" do
    before { TaskerCore::Worker::Bootstrap.start!(adversarial_config(concurrency: 2)) }

    [1e19, 1e300, Float::INFINITY, 2**70].each do |huge|
      it "waits at most a year for retry_after: #{huge} and keeps the worker running" do
        uuid = create_adversarial_task("retry_after", retry_plan(huge))
        eventually { step_of(TaskerCore.task_status(uuid))[:status] == "waiting_for_retry" }

        expect(TaskerCore::FFI.worker_status[:state]).to eq("running")
        other = TaskerCore.wait_for_task(create_adversarial_task("once"), timeout: 5)
        expect(other[:status]).to eq("complete")
        expect(step_of(TaskerCore.task_status(uuid))[:status]).to eq("waiting_for_retry")
      end
    end

    [Float::NAN, -1, -Float::INFINITY].each do |bad|
      it "fails the step naming retry_after for retry_after: #{bad}, and keeps the worker running" do
        final = TaskerCore.wait_for_task(create_adversarial_task("retry_after", retry_plan(bad)), timeout: 5)

        expect(final[:status]).to eq("error")
        expect(step_of(final)[:error_message]).to match(/retry_after/)
        expect(TaskerCore::FFI.worker_status[:state]).to eq("running")
        expect(TaskerCore.wait_for_task(create_adversarial_task("once"), timeout: 5)[:status]).to eq("complete")
      end
    end
  end

  describe "timeouts given to the FFI" do
    before { TaskerCore::FFI.bootstrap_worker(adversarial_config(concurrency: 1)) }

    it "accepts next_step_event(1e300) and Float::INFINITY as a long wait" do
      uuid = create_adversarial_task
      event = TaskerCore::FFI.next_step_event(1e300)
      expect(event[:task_uuid]).to eq(uuid)
      TaskerCore::FFI.send_step_completion_event(success_for(event))

      second = create_adversarial_task
      expect(TaskerCore::FFI.next_step_event(Float::INFINITY)[:task_uuid]).to eq(second)
    end

    it "raises ArgumentError for a NaN or negative timeout" do
      [Float::NAN, -1, -0.5, -Float::INFINITY].each do |bad|
        expect { TaskerCore::FFI.next_step_event(bad) }.to raise_error(ArgumentError, /timeout/)
        expect { TaskerCore::FFI.wait_for_task(SecureRandom.uuid, bad) }.to raise_error(ArgumentError, /timeout/)
      end
      expect(TaskerCore::FFI.worker_status[:state]).to eq("running")
    end

    it "waits for a task with wait_for_task(uuid, 1e19) and (uuid, 1e300)" do
      uuids = [create_adversarial_task, create_adversarial_task]
      completer = Thread.new do
        2.times do
          event = false
          event = TaskerCore::FFI.next_step_event(5) while event == false
          TaskerCore::FFI.send_step_completion_event(success_for(event))
        end
      end
      expect(TaskerCore::FFI.wait_for_task(uuids[0], 1e19)[:status]).to eq("complete")
      expect(TaskerCore::FFI.wait_for_task(uuids[1], 1e300)[:status]).to eq("complete")
      completer.join(5)
    end

    it "accepts a completion with retry_after: 1e19 sent by hand and keeps the engine running" do
      uuid = create_adversarial_task("twice")
      event = TaskerCore::FFI.next_step_event(5)
      failure = success_for(event).merge(success: false, retryable: true, retry_after: 1e19, error_message: "later")
      expect(TaskerCore::FFI.send_step_completion_event(failure)).to be(true)

      eventually { step_of(TaskerCore::FFI.task_status(uuid))[:status] == "waiting_for_retry" }
      expect(TaskerCore::FFI.worker_status[:state]).to eq("running")
      expect { create_adversarial_task }.not_to raise_error
    end
  end
end
