# frozen_string_literal: true

require_relative "../../lib/tasker_core/events/publisher"
require "timeout"

RSpec.describe TaskerCore::Events::Publisher do
  let(:publisher_class) do
    Class.new do
      include TaskerCore::Events::Publisher

      def initialize
        register_event("step.execution.received")
        register_event("step.completion.sent")
        register_event("bridge.error")
      end
    end
  end

  let(:publisher) { publisher_class.new }
  let(:received) { [] }

  # Listener object in the dry-events style: one on_<event> method per handled event.
  let(:listener_class) do
    Class.new do
      attr_reader :events

      def initialize
        @events = []
      end

      def on_step_execution_received(event)
        @events << event
      end
    end
  end

  describe ".[]" do
    it "returns the module itself, so dry-events' `include Publisher[:id]` form works" do
      expect(described_class[:event_bridge]).to be(described_class)
    end
  end

  describe "#register_event" do
    it "returns the publisher, for chaining" do
      expect(publisher.register_event("other.event")).to be(publisher)
    end

    it "lists registered events in registration order" do
      expect(publisher.registered_events).to eq(%w[step.execution.received step.completion.sent bridge.error])
    end

    it "accepts Symbol ids and stores them as Strings" do
      publisher.register_event(:"task.done")
      expect(publisher.event_registered?("task.done")).to be(true)
      expect(publisher.event_registered?(:"task.done")).to be(true)
    end

    it "rejects ids that are neither String nor Symbol" do
      expect { publisher.register_event(42) }.to raise_error(ArgumentError, /String or Symbol/)
    end

    it "merges the default payload under the published payload" do
      publisher.register_event("with.defaults", source: "rust", retry: false)
      publisher.subscribe("with.defaults") { |event| received << event.payload }
      publisher.publish("with.defaults", retry: true)
      expect(received).to eq([{ source: "rust", retry: true }])
    end

    it "keeps existing subscribers when an event is registered again" do
      publisher.subscribe("bridge.error") { |event| received << event[:error] }
      publisher.register_event("bridge.error", error: "default")
      publisher.publish("bridge.error")
      expect(received).to eq(["default"])
    end

    it "is isolated per publisher instance" do
      other = publisher_class.new
      publisher.register_event("only.here")
      expect(other.event_registered?("only.here")).to be(false)
    end
  end

  describe "class-level register_event" do
    let(:publisher_class) do
      Class.new do
        include TaskerCore::Events::Publisher

        register_event("class.event", origin: "class")
      end
    end

    it "registers the event for every instance" do
      publisher.subscribe("class.event") { |event| received << event[:origin] }
      publisher.publish("class.event")
      expect(received).to eq(["class"])
    end

    it "is inherited by subclasses" do
      subclass = Class.new(publisher_class) { register_event("sub.event") }
      expect(subclass.new.registered_events).to eq(%w[class.event sub.event])
      expect(publisher.registered_events).to eq(%w[class.event])
    end
  end

  describe "#publish" do
    it "passes an Event answering #id, #[], #payload and #to_h" do
      publisher.subscribe("step.execution.received") { |event| received << event }
      payload = { event_id: "e-1", step_uuid: "s-1" }
      publisher.publish("step.execution.received", payload)

      event = received.fetch(0)
      expect(event).to be_a(TaskerCore::Events::Event)
      expect(event.id).to eq("step.execution.received")
      expect(event[:step_uuid]).to eq("s-1")
      expect(event.payload).to eq(payload)
      expect(event.to_h).to eq(payload)
    end

    it "raises KeyError from #[] for a key missing from the payload, like dry-events" do
      publisher.subscribe("bridge.error") { |event| received << event }
      publisher.publish("bridge.error", error: "boom")
      expect { received.first[:nope] }.to raise_error(KeyError)
    end

    it "delivers the same Event object to every subscriber" do
      2.times { publisher.subscribe("bridge.error") { |event| received << event } }
      publisher.publish("bridge.error", error: "boom")
      expect(received[0]).to be(received[1])
    end

    it "calls subscribers in subscription order" do
      publisher.subscribe("bridge.error") { received << :first }
      publisher.subscribe("bridge.error") { received << :second }
      publisher.subscribe("bridge.error") { received << :third }
      publisher.publish("bridge.error")
      expect(received).to eq(%i[first second third])
    end

    it "delivers only to subscribers of the published event" do
      publisher.subscribe("bridge.error") { received << :error }
      publisher.subscribe("step.completion.sent") { received << :completion }
      publisher.publish("step.completion.sent")
      expect(received).to eq([:completion])
    end

    it "publishes with an empty payload by default" do
      publisher.subscribe("bridge.error") { |event| received << event.payload }
      publisher.publish("bridge.error")
      expect(received).to eq([{}])
    end

    it "accepts a Symbol for a String-registered event" do
      publisher.subscribe("bridge.error") { |event| received << event.id }
      publisher.publish(:"bridge.error")
      expect(received).to eq(["bridge.error"])
    end

    it "returns the publisher and is aliased as #trigger" do
      publisher.subscribe("bridge.error") { received << :hit }
      expect(publisher.publish("bridge.error")).to be(publisher)
      expect(publisher.trigger("bridge.error")).to be(publisher)
      expect(received).to eq(%i[hit hit])
    end

    it "is a no-op for a registered event nobody subscribed to" do
      expect { publisher.publish("bridge.error", error: "x") }.not_to raise_error
    end

    it "raises UnregisteredEventError naming the event" do
      expect { publisher.publish("no.such.event") }
        .to raise_error(TaskerCore::Events::UnregisteredEventError, /no\.such\.event/) { |error|
          expect(error.event_id).to eq("no.such.event")
        }
    end

    it "propagates a subscriber's exception and skips later subscribers, like dry-events" do
      publisher.subscribe("bridge.error") { raise "subscriber failed" }
      publisher.subscribe("bridge.error") { received << :later }
      expect { publisher.publish("bridge.error") }.to raise_error(RuntimeError, "subscriber failed")
      expect(received).to be_empty
    end

    it "allocates nothing beyond the one Event object" do
      publisher.subscribe("step.execution.received") { |_event| nil }
      publisher.subscribe("step.execution.received", step_uuid: %w[s-1 s-2]) { |_event| nil }
      payload = { step_uuid: "s-1" }
      publisher.publish("step.execution.received", payload) # warm caches
      before = GC.stat(:total_allocated_objects)
      1000.times { publisher.publish("step.execution.received", payload) }
      expect(GC.stat(:total_allocated_objects) - before).to be <= 1000 + 5
    end
  end

  describe "Event#payload with data" do
    it "returns a copy with the data merged, leaving the original alone" do
      event = TaskerCore::Events::Event.new("x", { a: 1 })
      copy = event.payload(b: 2)
      expect([copy.id, copy.payload]).to eq(["x", { a: 1, b: 2 }])
      expect(event.payload).to eq(a: 1)
    end
  end

  describe "#subscribe with a block" do
    it "returns the publisher" do
      expect(publisher.subscribe("bridge.error") { nil }).to be(publisher)
    end

    it "raises UnregisteredEventError for an unregistered event (as an InvalidSubscriberError, dry's name)" do
      expect { publisher.subscribe("no.such.event") { nil } }
        .to raise_error(TaskerCore::Events::UnregisteredEventError, /no\.such\.event/)
      expect { publisher.subscribe("no.such.event") { nil } }.to raise_error(TaskerCore::Events::InvalidSubscriberError)
    end

    it "requires a block for a registered event id" do
      expect { publisher.subscribe("bridge.error") }.to raise_error(ArgumentError, /needs a block/)
    end

    it "raises UnregisteredEventError for an unregistered id without a block" do
      expect { publisher.subscribe("no.such.event") }.to raise_error(TaskerCore::Events::UnregisteredEventError)
    end
  end

  describe "filters" do
    def deliveries(filter, *payloads)
      publisher.subscribe("bridge.error", filter) { |event| received << event.payload }
      payloads.each { |payload| publisher.publish("bridge.error", payload) }
      received
    end

    it "delivers only payloads equal on a plain value" do
      expect(deliveries({ level: "fatal" }, { level: "fatal" }, { level: "warn" })).to eq([{ level: "fatal" }])
    end

    it "treats an Array as 'one of'" do
      result = deliveries({ level: %w[fatal error] }, { level: "fatal" }, { level: "warn" }, { level: "error" })
      expect(result).to eq([{ level: "fatal" }, { level: "error" }])
    end

    it "calls a Proc as a predicate" do
      expect(deliveries({ attempts: ->(n) { n > 2 } }, { attempts: 1 }, { attempts: 3 })).to eq([{ attempts: 3 }])
    end

    it "matches nested hashes against nested payload hashes" do
      filter = { step: { status: "error", attempts: [2, 3] } }
      matching = { step: { status: "error", attempts: 3, name: "x" } }
      result = deliveries(filter, matching, { step: { status: "error", attempts: 1 } }, { step: "error" }, {})
      expect(result).to eq([matching])
    end

    it "requires every key to match" do
      expect(deliveries({ a: 1, b: 2 }, { a: 1, b: 2 }, { a: 1, b: 3 }, { a: 1 })).to eq([{ a: 1, b: 2 }])
    end

    it "does not treat a missing key as nil" do
      expect(deliveries({ a: nil }, {}, { a: nil })).to eq([{ a: nil }])
    end

    it "delivers everything for an empty filter" do
      expect(deliveries({}, { a: 1 }, {})).to eq([{ a: 1 }, {}])
    end

    it "applies to the default payload merged with the published one" do
      publisher.register_event("defaults.filtered", level: "fatal")
      publisher.subscribe("defaults.filtered", level: "fatal") { received << :hit }
      publisher.publish("defaults.filtered", other: 1)
      expect(received).to eq([:hit])
    end

    it "applies to listener objects" do
      listener = listener_class.new
      publisher.subscribe(listener, step_uuid: "wanted")
      publisher.publish("step.execution.received", step_uuid: "other")
      publisher.publish("step.execution.received", step_uuid: "wanted")
      expect(listener.events.map { |event| event[:step_uuid] }).to eq(["wanted"])
    end

    it "rejects a filter that is not a Hash" do
      expect { publisher.subscribe("bridge.error", "level") { nil } }.to raise_error(ArgumentError, /Hash/)
    end
  end

  describe "#subscribe with a listener object" do
    let(:listener) { listener_class.new }

    it "calls on_<event id with dots as underscores> for the events it answers" do
      publisher.subscribe(listener)
      publisher.publish("step.execution.received", step_uuid: "s-1")
      publisher.publish("bridge.error", error: "ignored")
      expect(listener.events.map(&:id)).to eq(["step.execution.received"])
      expect(listener.events.first[:step_uuid]).to eq("s-1")
    end

    it "subscribes to every registered event the listener answers" do
      multi = Class.new(listener_class) do
        def on_bridge_error(event)
          events << event
        end
      end.new
      publisher.subscribe(multi)
      publisher.publish("bridge.error")
      publisher.publish("step.execution.received")
      publisher.publish("step.completion.sent")
      expect(multi.events.map(&:id)).to eq(%w[bridge.error step.execution.received])
    end

    it "keeps block and listener subscribers in one ordered list" do
      publisher.subscribe("step.execution.received") { received << :block_before }
      publisher.subscribe(listener)
      publisher.subscribe("step.execution.received") { received << :block_after }
      publisher.publish("step.execution.received")
      expect(received).to eq(%i[block_before block_after])
      expect(listener.events.size).to eq(1)
    end

    it "only covers events registered before it subscribed, like dry-events" do
      listener.define_singleton_method(:on_late_event) { |event| events << event }
      publisher.subscribe(listener)
      publisher.register_event("late.event")
      publisher.publish("late.event")
      expect(listener.events).to be_empty
    end

    it "raises InvalidSubscriberError (an UnregisteredEventError) when it answers no registered event" do
      expect { publisher.subscribe(Object.new) }.to raise_error(TaskerCore::Events::UnregisteredEventError, /listener/)
    end

    it "ignores private handler methods" do
      hidden = Class.new do
        private

        def on_bridge_error(_event); end
      end.new
      expect { publisher.subscribe(hidden) }.to raise_error(TaskerCore::Events::InvalidSubscriberError)
    end
  end

  describe "#unsubscribe" do
    let(:listener) { listener_class.new }

    it "stops delivery to a listener object and returns the publisher" do
      publisher.subscribe(listener)
      expect(publisher.unsubscribe(listener)).to be(publisher)
      publisher.publish("step.execution.received")
      expect(listener.events).to be_empty
    end

    it "removes the listener from every event and leaves other subscribers" do
      multi = listener_class.new
      multi.define_singleton_method(:on_bridge_error) { |event| events << event }
      publisher.subscribe(multi)
      publisher.subscribe("bridge.error") { received << :other }
      publisher.unsubscribe(multi)
      publisher.publish("bridge.error")
      publisher.publish("step.execution.received")
      expect([multi.events, received]).to eq([[], [:other]])
    end

    it "removes a subscribed block" do
      block = proc { received << :block }
      publisher.subscribe("bridge.error", &block)
      publisher.unsubscribe(block)
      publisher.publish("bridge.error")
      expect(received).to be_empty
    end

    it "is a no-op for an object that never subscribed" do
      expect { publisher.unsubscribe(Object.new) }.not_to raise_error
    end
  end

  describe "#subscribed?" do
    let(:listener) { listener_class.new }

    it "is true for a subscribed listener object and false after unsubscribe" do
      expect(publisher.subscribed?(listener)).to be(false)
      publisher.subscribe(listener)
      expect(publisher.subscribed?(listener)).to be(true)
      publisher.unsubscribe(listener)
      expect(publisher.subscribed?(listener)).to be(false)
    end

    it "compares by identity, not ==" do
      publisher.subscribe(listener)
      lookalike = listener_class.new
      lookalike.define_singleton_method(:==) { |_other| true }
      expect(publisher.subscribed?(lookalike)).to be(false)
    end

    it "knows subscribed blocks" do
      block = proc {}
      publisher.subscribe("bridge.error", &block)
      expect(publisher.subscribed?(block)).to be(true)
    end
  end

  describe "#process" do
    it "yields the event with each matching subscriber without calling it" do
      publisher.subscribe("bridge.error") { received << :called }
      publisher.subscribe("bridge.error", level: "fatal") { received << :filtered }
      yielded = []
      publisher.process("bridge.error", level: "warn") { |event, listener| yielded << [event[:level], listener] }
      expect(received).to be_empty
      expect(yielded.size).to eq(1)
      expect(yielded.first.first).to eq("warn")
      yielded.first.last.call(nil)
      expect(received).to eq([:called])
    end

    it "yields bound listener methods for listener objects" do
      listener = listener_class.new
      publisher.subscribe(listener)
      publisher.process("step.execution.received") { |event, callable| callable.call(event) }
      expect(listener.events.size).to eq(1)
    end

    it "returns an Enumerator without a block" do
      publisher.subscribe("bridge.error") { nil }
      expect(publisher.process("bridge.error").to_a.size).to eq(1)
    end

    it "raises UnregisteredEventError for an unregistered event" do
      expect { publisher.process("nope") { nil } }.to raise_error(TaskerCore::Events::UnregisteredEventError)
    end
  end

  describe "locking" do
    it "lets a subscriber subscribe and unsubscribe during a publish (no lock held while calling)" do
      late = proc { received << :late }
      publisher.subscribe("bridge.error") do
        received << :first
        publisher.subscribe("bridge.error", &late)
        publisher.unsubscribe(late) if received.count(:first) > 1
      end
      publisher.publish("bridge.error")
      expect(received).to eq([:first]) # the in-flight publish uses its snapshot
      publisher.publish("bridge.error")
      expect(received).to eq(%i[first first late])
    end

    it "does not block other threads' subscriptions while a subscriber is running" do
      entered = Queue.new
      release = Queue.new
      publisher.subscribe("bridge.error") do
        entered << true
        release.pop
      end
      publishing = Thread.new { publisher.publish("bridge.error") }
      entered.pop
      extra = proc {}
      Timeout.timeout(5) { publisher.subscribe("step.completion.sent", &extra) }
      release << true
      Timeout.timeout(5) { publishing.value }
      expect(publisher.subscribed?(extra)).to be(true)
    end
  end

  describe "concurrency" do
    let(:publishers) { 4 }
    let(:publishes_per_thread) { 2_000 }
    let(:stop) { [false] } # shared flag the churners poll
    let(:churn_cycles) { Queue.new }

    # Threads that keep subscribing and unsubscribing listener objects and blocks (some filtered).
    def start_churners(count)
      Array.new(count) do |i|
        Thread.new do
          churn(i.even? ? {} : { step_uuid: [1, 2] }) until stop.first
        end
      end
    end

    def churn(filter)
      listener = listener_class.new
      block = proc { |_event| Thread.pass }
      publisher.subscribe(listener, filter)
      publisher.subscribe("step.execution.received", &block)
      Thread.pass
      publisher.unsubscribe(listener)
      publisher.unsubscribe(block)
      churn_cycles << 1
    end

    def start_publishers
      Array.new(publishers) do |i|
        Thread.new do
          publishes_per_thread.times do |n|
            publisher.publish("step.execution.received", step_uuid: n % 3, thread: i)
            Thread.pass if (n % 4).zero? # force interleaving with the churners under the GVL
          end
        end
      end
    end

    it "delivers exactly once per publish to a stable subscriber while others churn" do
      counter = Queue.new # thread-safe append; size is the delivery count
      publisher.subscribe("step.execution.received") { |_event| counter << 1 }
      churners = start_churners(3)
      Timeout.timeout(60) { start_publishers.each(&:value) }
      stop[0] = true
      Timeout.timeout(10) { churners.each(&:value) }

      expect(churn_cycles.size).to be > 10
      expect(counter.size).to eq(publishers * publishes_per_thread)
      expect(publisher.__bus__.channel("step.execution.received").subscriptions.size).to eq(1)
      expect(publisher.__bus__.channel("bridge.error").subscriptions).to be_empty
    end

    it "shares one bus when threads race to register on a fresh publisher" do
      fresh = Class.new { include TaskerCore::Events::Publisher }.new
      threads = Array.new(8) do |i|
        Thread.new { 25.times { |n| fresh.register_event("event.#{i}.#{n}") } }
      end
      Timeout.timeout(30) { threads.each(&:value) }
      expect(fresh.registered_events.size).to eq(8 * 25)
    end
  end
end
