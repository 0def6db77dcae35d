# frozen_string_literal: true

# Defect 4: the handler threads are supervised. A thread ended by a stray exception is logged and
# replaced; shutdown! always completes; start! never leaves two subscribers; a thread can be retired.
RSpec.describe TaskerCore::Worker::HandlerPool do
  include AdversarialHelpers
  include_context "workflow worker"

  let(:worker) { TaskerCore::Worker::Bootstrap.instance }

  def step_subscribers
    bridge.process(TaskerCore::Worker::EventBridge::STEP_EXECUTION, {}).to_a.size
  end

  def run_once(context = {})
    TaskerCore.wait_for_task(create_adversarial_task("twice", context), timeout: 10)
  end

  it "replaces handler threads ended by a stray Thread#raise, and keeps running steps" do
    worker.start!(adversarial_config(concurrency: 2))
    originals = worker.pool.threads
    originals.each do |thread|
      until_asleep(thread)
      thread.raise(AdversarialHelpers::Poke, "stray")
      thread.join(5)
    end

    expect(originals.map(&:alive?)).to eq([false, false])
    eventually { worker.pool.alive_count == 2 }
    expect(worker.pool.threads & originals).to be_empty
    expect(worker.pool.replacements).to eq(2)
    expect(worker.status[:handler_threads_alive]).to eq(2)
    expect(Array.new(4) { run_once[:status] }).to eq(%w[complete] * 4)
  end

  it "replaces a killed handler thread" do
    worker.start!(adversarial_config(concurrency: 2))
    victim = worker.pool.threads.first
    victim.kill
    victim.join(5)
    eventually { worker.pool.alive_count == 2 && !worker.pool.threads.include?(victim) }
    expect(run_once[:status]).to eq("complete")
  end

  it "logs a dead thread at error with its exception" do
    logger = AdversarialHelpers::RecordingLogger.new
    TaskerCore::FFI.bootstrap_worker(adversarial_config(concurrency: 1))
    pool = described_class.new(concurrency: 1, logger: logger) do |event|
      TaskerCore::FFI.send_step_completion_event(success_for(event))
    end
    pool.start
    thread = pool.threads.first
    until_asleep(thread)
    thread.raise(AdversarialHelpers::Poke, "stray interrupt")

    message, context = Timeout.timeout(5) { logger.errors.pop }
    expect(message).to match(/handler thread died; replaced/)
    expect(context).to include(error: "AdversarialHelpers::Poke", message: "stray interrupt")
    uuid = create_adversarial_task
    expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")
    TaskerCore::FFI.transition_to_graceful_shutdown
    TaskerCore::FFI.stop_worker
    expect(pool.stop(monotonic + 5)).to eq(0)
  end

  it "retires a thread: it finishes its step and leaves, a replacement keeps concurrency threads taking steps" do
    worker.start!(adversarial_config(concurrency: 2))
    uuid = create_adversarial_task("twice", "plan" => { "only" => { "sleep" => 0.5 } })
    busy = eventually { WorkflowRecorder.for_task(uuid).first&.thread }

    replacement = worker.pool.retire(busy)
    expect(replacement).to be_a(Thread)
    expect(worker.pool.threads).not_to include(busy)
    expect(worker.pool.threads.size).to eq(2)
    expect(worker.pool.include?(busy)).to be(true)

    expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")
    expect(busy.join(5)).to eq(busy)
    expect(worker.pool.include?(busy)).to be(false)
    later = Array.new(6) { create_adversarial_task("twice", "plan" => { "only" => { "sleep" => 0.05 } }) }
    later.each { |task| expect(TaskerCore.wait_for_task(task, timeout: 5)[:status]).to eq("complete") }
    expect(WorkflowRecorder.executions.map(&:thread).drop(1)).not_to include(busy)
    expect(worker.pool.retire(busy)).to be_nil
  end

  describe "Bootstrap#shutdown! and start!" do
    it "completes after stray exceptions ended the handler threads: stopped, unsubscribed, hooks run" do
      hooks = 0
      worker.on_shutdown { hooks += 1 }
      worker.start!(adversarial_config(concurrency: 2))
      subscribed = step_subscribers
      worker.pool.threads.each do |thread|
        until_asleep(thread)
        thread.raise(AdversarialHelpers::Poke, "stray")
      end

      expect(worker.shutdown!).to be(true)
      expect(worker.status[:state]).to eq("stopped")
      expect(worker.running?).to be(false)
      expect(step_subscribers).to eq(subscribed - 1)
      expect(hooks).to eq(1)
      expect(worker.shutdown!).to be(false)
      expect(hooks).to eq(1)
    end

    it "never leaves two subscribers across restarts: each step runs once" do
      3.times do
        worker.start!(adversarial_config(concurrency: 2))
        worker.pool.threads.first.raise(AdversarialHelpers::Poke, "stray")
        worker.shutdown!
      end
      before = step_subscribers
      worker.start!(adversarial_config(concurrency: 2))
      expect(step_subscribers).to eq(before + 1)

      uuids = Array.new(5) { create_adversarial_task("twice") }
      uuids.each { |uuid| expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete") }
      expect(WorkflowRecorder.executions.size).to eq(5)
    end
  end
end
