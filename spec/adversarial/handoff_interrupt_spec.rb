# frozen_string_literal: true

# Defect 1: a step event taken by a thread that is interrupted at the hand-off must reach the thread
# or go back to the queue, never sit in flight until its timeout.
RSpec.describe "Interrupts at the step hand-off" do
  include AdversarialHelpers

  after do
    TaskerCore::FFI.stop_worker if TaskerCore::FFI.worker_status[:running]
  rescue TaskerCore::WorkerNotInitializedError
    nil
  end

  it "loses no step when a raw handler thread is Thread#raise'd each time it sleeps in next_step_event " \
     "(200 tasks, one attempt each)" do
    TaskerCore::FFI.bootstrap_worker(adversarial_config(concurrency: 1))
    stop = false
    taken = 0
    handler = Thread.new do
      # A plain loop as a user would write it: the event is stored, then looked at.
      until stop
        begin
          event = TaskerCore::FFI.next_step_event(0.5)
          next unless event

          taken += 1
          TaskerCore::FFI.send_step_completion_event(success_for(event))
        rescue AdversarialHelpers::Poke
          next
        end
      end
    end
    handler.report_on_exception = false

    # A third thread competes for the GVL and raises into the handler whenever it sleeps in
    # next_step_event, so raises also land while a taken event waits for the GVL on its way out.
    pokes = 0
    poker = Thread.new do
      until stop
        next unless until_asleep(handler, timeout: 0.2) && !stop

        handler.raise(AdversarialHelpers::Poke, "stray interrupt")
        pokes += 1
        Thread.pass
      end
    end
    # In batches with pauses: a handler that never runs out of work never sleeps, and is never
    # poked (all 200 at once left it asleep too rarely on a fast run). Each batch reaches a handler
    # being poked.
    uuids = []
    20.times do
      batch = Array.new(10) { create_adversarial_task }
      uuids.concat(batch)
      TaskerCore::FFI.wait_for_task(batch.last, 10)
      sleep 0.02
    end
    finals = uuids.map { |uuid| TaskerCore::FFI.wait_for_task(uuid, 10) }
    stop = true
    poker.join(5)
    handler.join(5)

    statuses = finals.map { |final| final && final[:status] }.tally
    expect(pokes).to be > 10
    expect(statuses).to eq("complete" => 200), "lost steps fail as timed out: #{statuses}"
    expect(taken).to eq(200)
  end

  it "raises an interrupt that arrived with the event, and hands the event back (its attempt does not count)" do
    TaskerCore::FFI.bootstrap_worker(adversarial_config(concurrency: 1))
    uuid = create_adversarial_task
    # The event is queued: a raise pending on entry comes out of next_step_event, with the event back.
    outcome = Thread.new do
      Thread.handle_interrupt(AdversarialHelpers::Poke => :never) do
        Thread.current.raise(AdversarialHelpers::Poke, "pending")
        Thread.handle_interrupt(AdversarialHelpers::Poke => :immediate) { TaskerCore::FFI.next_step_event(1) }
      end
    rescue AdversarialHelpers::Poke
      :raised
    end.value
    expect(outcome).to eq(:raised)

    event = TaskerCore::FFI.next_step_event(2)
    expect(event).to be_a(Hash)
    expect(event[:task_uuid]).to eq(uuid)
    expect(event[:task_sequence_step][:workflow_step][:attempts]).to eq(1)
    expect(TaskerCore::FFI.send_step_completion_event(success_for(event))).to be(true)
    expect(TaskerCore::FFI.wait_for_task(uuid, 5)[:status]).to eq("complete")
  end

  it "answers false and hands the event back when the caller defers a pending interrupt" do
    TaskerCore::FFI.bootstrap_worker(adversarial_config(concurrency: 1))
    uuid = create_adversarial_task
    seen = nil
    ending = Thread.new do
      Thread.handle_interrupt(AdversarialHelpers::Poke => :never) do
        Thread.current.raise(AdversarialHelpers::Poke, "deferred")
        seen = [TaskerCore::FFI.next_step_event(1), Thread.pending_interrupt?]
      end
      :not_raised
    rescue AdversarialHelpers::Poke
      :raised_after
    end.value
    expect(seen).to eq([false, true])
    expect(ending).to eq(:raised_after)

    event = TaskerCore::FFI.next_step_event(2)
    expect(event && event[:task_uuid]).to eq(uuid)
    expect(event[:task_sequence_step][:workflow_step][:attempts]).to eq(1)
    TaskerCore::FFI.send_step_completion_event(success_for(event))
    expect(TaskerCore::FFI.wait_for_task(uuid, 5)[:status]).to eq("complete")
  end
end
