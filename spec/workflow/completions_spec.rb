# frozen_string_literal: true

RSpec.describe "TaskerCore::FFI.send_step_completion_event" do
  include_context "workflow worker"

  let(:ffi) { TaskerCore::FFI }
  let(:valid) do
    { event_id: SecureRandom.uuid, task_uuid: SecureRandom.uuid, step_uuid: SecureRandom.uuid, success: true }
  end

  # A worker with no Ruby handler threads: the spec takes events itself. A short shutdown_timeout,
  # so that an example leaving an event uncompleted does not hold the after hook's stop for 30 s.
  def bootstrap_bare_worker
    ffi.bootstrap_worker(templates: WorkflowSpecHelpers::TEMPLATES_B, shutdown_timeout: 1)
  end

  def take_event(task_uuid, within: 2)
    event = take_next_event(within: within)
    expect(event).to be_a(Hash), "no event within #{within}s (got #{event.inspect}); " \
                                 "task: #{TaskerCore.task_status(task_uuid).inspect}"
    expect(event[:task_uuid]).to eq(task_uuid)
    event
  end

  def completion_for(event, **fields)
    { event_id: event[:event_id], task_uuid: event[:task_uuid], step_uuid: event[:step_uuid], success: true }
      .merge(fields)
  end

  describe "validation" do
    it "names every missing required field" do
      expect { ffi.send_step_completion_event({}) }.to raise_error(
        ArgumentError, "Missing required fields in completion: event_id, task_uuid, step_uuid, success"
      )
    end

    it "names only the fields that are missing" do
      expect { ffi.send_step_completion_event(valid.slice(:event_id, :success)) }
        .to raise_error(ArgumentError, "Missing required fields in completion: task_uuid, step_uuid")
      expect { ffi.send_step_completion_event(valid.except(:success)) }
        .to raise_error(ArgumentError, "Missing required fields in completion: success")
    end

    it "treats a nil required field as missing" do
      expect { ffi.send_step_completion_event(valid.merge(step_uuid: nil)) }
        .to raise_error(ArgumentError, /Missing required fields in completion: step_uuid\z/)
    end

    it "validates with or without a worker running" do
      expect { ffi.send_step_completion_event({}) }.to raise_error(ArgumentError, /Missing required fields/)
      bootstrap_bare_worker
      expect { ffi.send_step_completion_event({}) }.to raise_error(ArgumentError, /Missing required fields/)
    end

    {
      "success: \"yes\"" => [{ success: "yes" }, /success/],
      "success: 1" => [{ success: 1 }, /success/],
      "event_id: 5" => [{ event_id: 5 }, /event_id/],
      "event_id not a UUID" => [{ event_id: "evt-1" }, /event_id/],
      "task_uuid: :symbol" => [{ task_uuid: :abc }, /task_uuid/],
      "step_uuid not a UUID" => [{ step_uuid: "step" }, /step_uuid/],
      "metadata: [1]" => [{ metadata: [1] }, /metadata/],
      "metadata: \"x\"" => [{ metadata: "x" }, /metadata/],
      "error_message: 42" => [{ success: false, error_message: 42 }, /error_message/],
      "error_class: []" => [{ success: false, error_class: [] }, /error_class/],
      "retryable: \"no\"" => [{ success: false, retryable: "no" }, /retryable/],
      "retry_after: -1" => [{ success: false, retry_after: -1 }, /retry_after/],
      "retry_after: \"soon\"" => [{ success: false, retry_after: "soon" }, /retry_after/],
      "result: an Object" => [{ result: Object.new }, /result/]
    }.each do |label, (fields, message)|
      it "raises ArgumentError for #{label}" do
        bootstrap_bare_worker
        expect { ffi.send_step_completion_event(valid.merge(fields)) }.to raise_error(ArgumentError, message)
      end
    end

    it "raises ArgumentError for a completion that is not a Hash" do
      expect { ffi.send_step_completion_event([1, 2]) }.to raise_error(ArgumentError, /Hash/)
      expect { ffi.send_step_completion_event(nil) }.to raise_error(ArgumentError, /Hash/)
    end
  end

  describe "acceptance" do
    it "returns false for an unknown event" do
      bootstrap_bare_worker
      expect(ffi.send_step_completion_event(valid)).to be(false)
    end

    it "returns false with no worker running" do
      expect(ffi.send_step_completion_event(valid)).to be(false)
    end

    it "accepts the first completion of an event and refuses the second" do
      bootstrap_bare_worker
      uuid = create_workflow_task("quick")
      event = take_event(uuid)

      expect(ffi.send_step_completion_event(completion_for(event, result: { "n" => 1 }))).to be(true)
      expect(ffi.send_step_completion_event(completion_for(event, result: { "n" => 2 }))).to be(false)
      expect(ffi.send_step_completion_event(completion_for(event, success: false))).to be(false)

      final = TaskerCore.wait_for_task(uuid, timeout: 5)
      expect(step_status(final, "work")).to include(status: "complete", attempts: 1, result: { "n" => 1 })
    end

    it "refuses a completion naming another task or step, and still accepts the right one" do
      bootstrap_bare_worker
      uuid = create_workflow_task("quick")
      event = take_event(uuid)

      expect(ffi.send_step_completion_event(completion_for(event, task_uuid: SecureRandom.uuid))).to be(false)
      expect(ffi.send_step_completion_event(completion_for(event, step_uuid: SecureRandom.uuid))).to be(false)
      expect(ffi.send_step_completion_event(completion_for(event))).to be(true)
      expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")
    end

    it "accepts string keys, and records the result with JSON's string keys" do
      bootstrap_bare_worker
      uuid = create_workflow_task("quick")
      event = take_event(uuid)
      completion = {
        "event_id" => event[:event_id], "task_uuid" => event[:task_uuid], "step_uuid" => event[:step_uuid],
        "success" => true, "result" => { total: 3, items: [{ sku: "a" }], "nested" => { ok: true } },
        "metadata" => { "handler" => "spec" }
      }

      expect(ffi.send_step_completion_event(completion)).to be(true)
      final = TaskerCore.wait_for_task(uuid, timeout: 5)
      expect(step_status(final, "work")[:result])
        .to eq("total" => 3, "items" => [{ "sku" => "a" }], "nested" => { "ok" => true })
    end

    it "passes a completed step's result to its dependents" do
      bootstrap_bare_worker
      uuid = create_workflow_task("chain")
      roots = Array.new(2) { take_event(uuid) }.to_h { |e| [e[:task_sequence_step][:workflow_step][:name], e] }
      expect(roots.keys).to match_array(%w[first side])
      expect(ffi.send_step_completion_event(completion_for(roots["side"], result: { "from" => "side" }))).to be(true)
      expect(ffi.send_step_completion_event(completion_for(roots["first"], result: { "from" => "first" })))
        .to be(true)

      second = take_event(uuid)
      expect(second[:task_sequence_step][:workflow_step][:name]).to eq("second")
      expect(second[:task_sequence_step][:dependency_results]).to eq("first" => { "from" => "first" })
      expect(ffi.send_step_completion_event(completion_for(second, result: { "from" => "second" }))).to be(true)
      third = take_event(uuid)
      expect(third[:task_sequence_step][:dependency_results]).to eq("second" => { "from" => "second" })
      expect(ffi.send_step_completion_event(completion_for(third))).to be(true)
      expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")
    end

    it "records a failure completion's error_class and error_message, and retries it unless retryable: false" do
      bootstrap_bare_worker
      uuid = create_workflow_task("quick")
      event = take_event(uuid)
      failure = completion_for(event, success: false, error_class: "Payments::Declined", error_message: "card declined")

      expect(ffi.send_step_completion_event(failure)).to be(true)
      # The backoff is 10 ms, so the waiting_for_retry state may already be over by the time
      # anything could look at it: the retry's hand-out is what shows the failure was recorded,
      # and the step keeps the first attempt's error while the second one runs.
      retry_event = take_event(uuid)
      expect(retry_event[:task_sequence_step][:workflow_step][:attempts]).to eq(2)
      step = step_status(TaskerCore.task_status(uuid), "work")
      expect(step).to include(status: "in_progress", attempts: 2)
      expect(step[:error_message]).to include("Payments::Declined", "card declined")
      expect(ffi.send_step_completion_event(completion_for(retry_event, success: false, retryable: false,
                                                                        error_message: "final"))).to be(true)
      final = TaskerCore.wait_for_task(uuid, timeout: 5)
      expect(final[:status]).to eq("error")
      expect(step_status(final, "work")).to include(status: "error", attempts: 2, error_message: "final")
    end
  end

  describe "through EventBridge#publish_step_completion" do
    it "publishes step.completion.sent with the engine's verdict" do
      bootstrap_bare_worker
      sent = listen("step.completion.sent")
      uuid = create_workflow_task("quick")
      event = take_event(uuid)

      expect(bridge.publish_step_completion(completion_for(event))).to be(true)
      expect(bridge.publish_step_completion(completion_for(event))).to be(false)
      expect(bridge.publish_step_completion(valid.transform_keys(&:to_s))).to be(false)

      verdicts = drain(sent)
      expect(verdicts.map { |e| e[:accepted] }).to eq([true, false, false])
      expect(verdicts.first.payload).to include(event_id: event[:event_id], success: true, metadata: {})
    end

    it "raises ArgumentError for missing fields and publishes nothing" do
      sent = listen("step.completion.sent")

      expect { bridge.publish_step_completion(valid.except(:task_uuid)) }
        .to raise_error(ArgumentError, "Missing required fields in completion: task_uuid")
      expect(sent).to be_empty
    end
  end
end
