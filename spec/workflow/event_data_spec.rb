# frozen_string_literal: true

# What the engine hands to Ruby for each step, beyond its shape: which parts are shared and
# frozen (the template's), which are the handler's own (users' data), and how the engine thread
# behaves while steps are out.
RSpec.describe "Step execution event data" do
  include_context "workflow worker"

  let(:ffi) { TaskerCore::FFI }

  def bootstrap_bare_worker
    ffi.bootstrap_worker(templates: WorkflowSpecHelpers::TEMPLATES_B, shutdown_timeout: 1)
  end

  def take_events(count)
    Array.new(count) do
      event = take_next_event(within: 2)
      expect(event).to be_a(Hash), "expected an event, got #{event.inspect}"
      event
    end
  end

  def complete(event)
    ffi.send_step_completion_event(event_id: event[:event_id], task_uuid: event[:task_uuid],
                                   step_uuid: event[:step_uuid], success: true, result: {})
  end

  describe "the step definition" do
    it "is one deeply frozen Hash per template step, shared by every execution of that step" do
      bootstrap_bare_worker
      first, second = Array.new(2) { create_workflow_task("quick") }
      events = take_events(2)
      definitions = events.map { |e| e[:task_sequence_step][:step_definition] }

      expect(events.map { |e| e[:task_uuid] }).to contain_exactly(first, second)
      expect(definitions[0]).to equal(definitions[1])
      definition = definitions[0]
      expect(definition).to be_frozen
      expect(definition[:handler]).to be_frozen
      expect(definition[:handler][:initialization]).to be_frozen
      expect(definition[:retry]).to be_frozen
      expect(definition[:dependencies]).to be_frozen
      expect(definition[:name]).to be_frozen
      expect { definition[:handler][:initialization]["x"] = 1 }.to raise_error(FrozenError)
      events.each { |e| complete(e) }
    end

    it "deep-freezes initialization data, so no handler can change what the next one is given" do
      start_worker(concurrency: 1)
      uuid = create_workflow_task("dag")
      TaskerCore.wait_for_task(uuid, timeout: 10)
      fetch = WorkflowRecorder.for_task(uuid).find { |e| e.name == "fetch" }

      expect(fetch.config).to eq("greeting" => "hello", "limits" => { "max" => 3 }, "sleep" => 0.02)
      expect(fetch.config).to be_frozen
      expect(fetch.config["limits"]).to be_frozen
      expect(fetch.config["greeting"]).to be_frozen
      expect { fetch.config["limits"]["max"] = 4 }.to raise_error(FrozenError)
    end

    it "is built afresh for a new worker's templates" do
      bootstrap_bare_worker
      create_workflow_task("quick")
      before = take_events(1).first
      complete(before)
      ffi.stop_worker

      bootstrap_bare_worker
      create_workflow_task("quick")
      after = take_events(1).first
      complete(after)
      expect(after[:task_sequence_step][:step_definition]).to eq(before[:task_sequence_step][:step_definition])
      expect(after[:task_sequence_step][:step_definition]).not_to equal(before[:task_sequence_step][:step_definition])
    end
  end

  describe "the handler's own data" do
    it "gives each execution its own mutable Hashes for the event, the task context and dependency results" do
      bootstrap_bare_worker
      uuid = create_workflow_task("pair", { "order" => { "id" => 1 } })
      first = take_events(1).first
      sequence = first[:task_sequence_step]

      expect(first).not_to be_frozen
      expect(sequence[:task][:context]).to eq("order" => { "id" => 1 })
      expect(sequence[:task][:context]["order"]).not_to be_frozen
      expect(sequence[:dependency_results]).not_to be_frozen
      sequence[:task][:context]["order"]["id"] = 2
      complete(first)

      second = take_events(1).first
      expect(second[:task_sequence_step][:workflow_step][:name]).to eq("b")
      expect(second[:task_sequence_step][:task][:context]).to eq("order" => { "id" => 1 })
      second[:task_sequence_step][:dependency_results]["a"]["mine"] = true
      complete(second)
      expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")
    end

    it "names the ids and template names with frozen Strings (the same task uuid object in both places)" do
      bootstrap_bare_worker
      uuid = create_workflow_task("quick")
      event = take_events(1).first
      task = event[:task_sequence_step][:task]

      expect([event[:event_id], event[:task_uuid], event[:step_uuid]]).to all(be_frozen)
      expect([task[:namespace], task[:name], task[:version]]).to all(be_frozen)
      expect(event[:task_uuid]).to eq(uuid).and equal(task[:task_uuid])
      complete(event)
    end
  end

  describe "completion keys" do
    it "prefers a Symbol key over the same field given as a String" do
      bootstrap_bare_worker
      uuid = create_workflow_task("quick")
      event = take_events(1).first
      completion = {
        event_id: event[:event_id], task_uuid: event[:task_uuid], step_uuid: event[:step_uuid],
        success: true, result: { "from" => "symbol" }, "result" => { "from" => "string" }
      }

      expect(ffi.send_step_completion_event(completion)).to be(true)
      final = TaskerCore.wait_for_task(uuid, timeout: 5)
      expect(step_status(final, "work")[:result]).to eq("from" => "symbol")
    end

    it "falls back to the String key when the Symbol key holds nil" do
      bootstrap_bare_worker
      uuid = create_workflow_task("quick")
      event = take_events(1).first
      completion = {
        "event_id" => event[:event_id], task_uuid: event[:task_uuid], step_uuid: event[:step_uuid],
        event_id: nil, success: true
      }

      expect(ffi.send_step_completion_event(completion)).to be(true)
      expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")
    end
  end

  describe "the engine thread while steps are out" do
    def engine_cpu_seconds
      task = Dir.children("/proc/self/task").find do |tid|
        File.read("/proc/self/task/#{tid}/comm").strip == "tasker-engine"
      end
      fields = File.read("/proc/self/task/#{task}/stat").split(") ").last.split
      (fields[11].to_i + fields[12].to_i) / Float(Etc.sysconf(Etc::SC_CLK_TCK))
    end

    it "sleeps instead of polling while a slow handler runs" do
      require "etc"
      start_worker(concurrency: 1)
      uuid = create_workflow_task("quick", { "plan" => { "work" => { "sleep" => 1.0 } } })
      eventually { TaskerCore.task_status(uuid)[:steps].first[:status] == "in_progress" }
      before = engine_cpu_seconds
      TaskerCore.wait_for_task(uuid, timeout: 5)
      used = engine_cpu_seconds - before

      # A busy-polling engine would use about a second here; a few spins before it backs off cost ms.
      expect(used).to be < 0.1
    end
  end
end
