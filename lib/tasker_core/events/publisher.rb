# frozen_string_literal: true

module TaskerCore
  # In-process pub/sub used by the worker layer (the EventBridge) instead of the dry-events gem.
  module Events
    # Frozen empty defaults, so the hot path never allocates one.
    EMPTY_HASH = {}.freeze
    EMPTY_ARRAY = [].freeze

    # Raised when publishing to (or subscribing a block to) an event that was never registered.
    class UnregisteredEventError < StandardError
      # @return [Object] the unknown event id (or the offending subscriber)
      attr_reader :event_id

      # @param event_id [String, Symbol, Object] named in the message so the typo is easy to find
      # @param message [String, nil] overrides the default message
      def initialize(event_id = nil, message = nil)
        @event_id = event_id
        super(message || "event not registered: #{event_id.inspect}")
      end
    end

    # Raised for a subscription that could never fire (dry-events' name); rescuable as UnregisteredEventError.
    class InvalidSubscriberError < UnregisteredEventError
      # @param subscriber [String, Symbol, Object] an unregistered event id, or a listener with no on_<event> method
      def initialize(subscriber)
        if subscriber.is_a?(String) || subscriber.is_a?(Symbol)
          super(subscriber, "cannot subscribe to unregistered event: #{subscriber.inspect}")
        else
          super(subscriber, "listener #{subscriber.class} answers no on_<event> method of a registered event")
        end
      end
    end

    # What subscribers receive: the event id and its payload Hash (dry-events' Event interface).
    class Event
      # @return [String] the registered event id
      attr_reader :id

      # @param id [String] registered event id
      # @param payload [Hash] published payload, merged over the registered defaults
      def initialize(id, payload)
        @id = id
        @payload = payload
      end

      # Payload lookup; raises KeyError for a missing key, like dry-events (catches typos early).
      # @return [Object]
      def [](key)
        @payload.fetch(key)
      end

      # @overload payload
      #   @return [Hash] the payload
      # @overload payload(data)
      #   @return [Event] a copy with data merged over the payload (dry-events compatibility)
      def payload(data = nil)
        data ? self.class.new(@id, @payload.merge(data)) : @payload
      end

      # @return [Hash] the payload itself, so events can be passed where a Hash is expected
      def to_h
        @payload
      end
      alias to_hash to_h

      # @return [String] short and readable in logs and failure messages
      def inspect
        "#<#{self.class.name} id=#{@id.inspect} payload=#{@payload.inspect}>"
      end
    end

    # Compiled payload filter: each check is a key path plus a predicate, built once at subscribe time.
    class Filter
      # Marks a key path missing from the payload, so `key: nil` does not match an absent key.
      NO_MATCH = Object.new.freeze

      # @param spec [Hash] filter hash given to #subscribe
      # @return [Filter, nil] nil when there is nothing to check, so delivery skips the filter entirely
      def self.build(spec)
        return nil if spec.nil?
        raise ArgumentError, "filter must be a Hash, got #{spec.class}" unless spec.is_a?(Hash)

        spec.empty? ? nil : new(spec)
      end

      # @param spec [Hash] nested filter hash
      def initialize(spec)
        @checks = compile(spec, EMPTY_ARRAY).freeze
        freeze
      end

      # @param payload [Hash] event payload
      # @return [Boolean] true when every check holds
      def match?(payload)
        @checks.all? { |path, predicate| predicate.call(dig(payload, path)) }
      end

      private

      # Flattens nested hashes into [key path, predicate] pairs (an empty nested Hash adds no check, as in dry).
      def compile(spec, path)
        spec.flat_map do |key, expected|
          key_path = [*path, key].freeze
          expected.is_a?(Hash) ? compile(expected, key_path) : [[key_path, predicate(expected)]]
        end
      end

      # Arrays mean "one of", Procs are predicates, anything else compares with ==.
      def predicate(expected)
        case expected
        when Proc then expected
        when Array then expected.method(:include?)
        else expected.method(:==)
        end
      end

      # Walks the key path through nested hashes only; a plain loop, as Array#reduce allocates per call.
      def dig(payload, path)
        node = payload
        index = 0
        while index < path.size
          key = path[index]
          return NO_MATCH unless node.is_a?(Hash) && node.key?(key)

          node = node[key]
          index += 1
        end
        node
      end
    end

    # One subscriber of one event: what to call, the object it was subscribed as, and its filter.
    class Subscription
      # @return [Object] the listener object, or the block for block subscriptions (for unsubscribe/subscribed?)
      attr_reader :owner
      # @return [#call] the block, or the listener's bound on_<event> Method
      attr_reader :callable

      # @param owner [Object] listener object or block
      # @param callable [#call] receives the Event
      # @param filter [Filter, nil] nil delivers everything
      def initialize(owner, callable, filter)
        @owner = owner
        @callable = callable
        @filter = filter
        freeze
      end

      # @return [Boolean] whether the filter (if any) accepts the payload
      def accepts?(event)
        @filter.nil? || @filter.match?(event.payload)
      end

      # Hot path: one predicate check and one call.
      def deliver(event)
        @callable.call(event) if @filter.nil? || @filter.match?(event.payload)
      end

      # @return [Boolean] identity match, as listener objects may define == loosely
      def owned_by?(object)
        @owner.equal?(object) || @callable.equal?(object)
      end
    end

    # Immutable state of one registered event; replaced, never mutated, so publishers read it without locking.
    class Channel
      # @return [String] the event id
      attr_reader :id
      # @return [Symbol] the listener method, precomputed so publish never builds it
      attr_reader :listener_method
      # @return [Array<Subscription>] frozen, in subscription order
      attr_reader :subscriptions

      # @param id [String] frozen event id
      # @param defaults [Hash] frozen default payload
      # @param subscriptions [Array<Subscription>] frozen
      def initialize(id, defaults, subscriptions)
        @id = id
        @defaults = defaults
        @subscriptions = subscriptions
        @listener_method = :"on_#{id.tr(".", "_")}"
        freeze
      end

      # @return [Event] the only allocation of a publish when the event has no default payload
      def event(payload)
        Event.new(@id, @defaults.empty? ? payload : @defaults.merge(payload))
      end

      # @return [Channel] same subscribers, new defaults (re-registration keeps subscribers, as in dry-events)
      def with_defaults(defaults)
        Channel.new(@id, defaults, @subscriptions)
      end

      # @return [Channel] a copy with the subscription appended
      def add(subscription)
        Channel.new(@id, @defaults, (@subscriptions + [subscription]).freeze)
      end

      # @return [Channel] a copy without the object's subscriptions, or self when it had none (no churn)
      def remove(object)
        kept = @subscriptions.reject { |subscription| subscription.owned_by?(object) }
        kept.size == @subscriptions.size ? self : Channel.new(@id, @defaults, kept.freeze)
      end
    end

    # Per-publisher registry. Writers copy-on-write a frozen Hash of Channels under a Mutex;
    # readers (publish) take the current Hash without locking and never see a half-made change.
    class Bus
      # @param events [Hash{String=>Hash}] event ids with default payloads to start with
      def initialize(events = EMPTY_HASH)
        @mutex = Mutex.new
        @channels = events.to_h { |id, defaults| [id, Channel.new(id, defaults, EMPTY_ARRAY)] }.freeze
      end

      # Hot path: a Hash lookup on the current snapshot; Symbols are accepted for String ids.
      # @return [Channel]
      # @raise [UnregisteredEventError]
      def channel(event_id)
        @channels[event_id] || channel_by_name(event_id) || raise(UnregisteredEventError, event_id)
      end

      # @return [Boolean]
      def registered?(event_id)
        !(@channels[event_id] || channel_by_name(event_id)).nil?
      end

      # @return [Array<String>] registered event ids, in registration order
      def event_ids
        @channels.keys
      end

      # Registers (or re-registers with new defaults) an event id.
      def register(event_id, defaults)
        id = Bus.normalize_id(event_id)
        defaults = Bus.freeze_defaults(defaults)
        update do |channels|
          existing = channels[id]
          channels.merge(id => existing ? existing.with_defaults(defaults) : Channel.new(id, defaults, EMPTY_ARRAY))
        end
      end

      # Adds a block subscription; the event must already be registered.
      # @raise [InvalidSubscriberError] (an UnregisteredEventError) for an unknown event id
      def subscribe(event_id, filter, block)
        subscription = Subscription.new(block, block, filter)
        update do |channels|
          current = channels[event_id] || channel_by_name(event_id) || raise(InvalidSubscriberError, event_id)
          channels.merge(current.id => current.add(subscription))
        end
      end

      # Adds the listener to every registered event it has an on_<event> method for.
      # @raise [InvalidSubscriberError] if it has none
      def attach(listener, filter)
        subscriptions = listener_subscriptions(listener, filter)
        raise InvalidSubscriberError, listener if subscriptions.empty?

        update do |channels|
          subscriptions.each_with_object(channels.dup) do |(id, subscription), copy|
            copy[id] = copy[id].add(subscription) if copy.key?(id)
          end
        end
      end

      # Removes every subscription of a listener object (or of a subscribed block) from every event.
      def detach(object)
        update { |channels| channels.transform_values { |channel| channel.remove(object) } }
      end

      # @return [Boolean] whether the listener object or block is subscribed to any event
      def subscribed?(object)
        @channels.each_value.any? do |channel|
          channel.subscriptions.any? { |subscription| subscription.owned_by?(object) }
        end
      end

      # @return [String] event ids are Strings; Symbols are converted once, at registration
      def self.normalize_id(event_id)
        return event_id.name if event_id.is_a?(Symbol)
        return event_id.frozen? ? event_id : event_id.dup.freeze if event_id.is_a?(String)

        raise ArgumentError, "event id must be a String or Symbol, got #{event_id.inspect}"
      end

      # @return [Hash] a frozen copy, so later changes by the caller do not leak into events
      def self.freeze_defaults(defaults)
        return EMPTY_HASH if defaults.nil?
        raise ArgumentError, "default payload must be a Hash, got #{defaults.class}" unless defaults.is_a?(Hash)

        defaults.empty? ? EMPTY_HASH : defaults.dup.freeze
      end

      private

      # Only reached on a miss, so Symbol ids cost nothing for String publishers.
      def channel_by_name(event_id)
        @channels[event_id.name] if event_id.is_a?(Symbol)
      end

      # Built outside the lock, as respond_to? and method are the listener's (user) code.
      # @return [Array<Array(String, Subscription)>] one subscription per registered event the listener answers
      def listener_subscriptions(listener, filter)
        @channels.each_value.filter_map do |channel|
          next unless listener.respond_to?(channel.listener_method)

          [channel.id, Subscription.new(listener, listener.method(channel.listener_method), filter)]
        end
      end

      # The single writer path: readers see either the old or the new frozen Hash.
      def update
        @mutex.synchronize { @channels = yield(@channels).freeze }
        self
      end
    end

    # dry-events' Publisher API, dependency-free. Include it in a class:
    #
    #   class Bridge
    #     include TaskerCore::Events::Publisher
    #     def initialize = register_event("step.execution.received")
    #   end
    #   bridge.subscribe("step.execution.received") { |event| event[:step_uuid] }
    #   bridge.publish("step.execution.received", step_uuid: "...")
    #
    # Subscribers run on the publishing thread, in subscription order, with no lock held; an exception from one
    # propagates to the publisher and skips the rest (as in dry-events). A subscriber removed while a publish
    # is in flight may still receive that one event (copy-on-write snapshot).
    module Publisher
      # Serialises the one-time creation of each publisher's bus.
      BUS_INIT_LOCK = Mutex.new

      # dry-events' `include Publisher[:id]` form; the id is not needed here.
      # @return [Module] this module
      def self.[](_id)
        self
      end

      # @api private adds the class-level register_event
      def self.included(base)
        super
        base.extend(ClassMethods)
      end

      # Class-level event registration, copied into each instance's bus when it is first used.
      module ClassMethods
        # @return [self]
        def register_event(event_id, payload = EMPTY_HASH)
          id = Bus.normalize_id(event_id)
          @__publisher_events__ = __publisher_events__.merge(id => Bus.freeze_defaults(payload)).freeze
          self
        end

        # @api private
        # @return [Hash{String=>Hash}] events registered on this class and its ancestors
        def __publisher_events__
          inherited = superclass.respond_to?(:__publisher_events__) ? superclass.__publisher_events__ : EMPTY_HASH
          own = @__publisher_events__ || EMPTY_HASH
          own.empty? ? inherited : inherited.merge(own)
        end
      end

      # @param event_id [String, Symbol]
      # @param payload [Hash] default payload; published payloads are merged over it
      # @return [self]
      def register_event(event_id, payload = EMPTY_HASH)
        __bus__.register(event_id, payload)
        self
      end

      # Delivers an Event to every matching subscriber. The hot path: no lock, one allocation.
      # @return [self]
      # @raise [UnregisteredEventError]
      def publish(event_id, payload = EMPTY_HASH)
        channel = __bus__.channel(event_id)
        subscriptions = channel.subscriptions
        return self if subscriptions.empty?

        event = channel.event(payload)
        subscriptions.each { |subscription| subscription.deliver(event) }
        self
      end
      alias trigger publish

      # @overload subscribe(event_id, filter = {}) { |event| }
      # @overload subscribe(listener, filter = {})
      #   calls listener.on_<event id with dots as underscores>(event) for each registered event it answers
      # @return [self]
      # @raise [UnregisteredEventError, InvalidSubscriberError]
      def subscribe(event_id_or_listener, filter = EMPTY_HASH, &block)
        compiled = Filter.build(filter)
        if block
          __bus__.subscribe(event_id_or_listener, compiled, block)
        elsif event_id_or_listener.is_a?(String) || event_id_or_listener.is_a?(Symbol)
          raise_blockless_subscription(event_id_or_listener)
        else
          __bus__.attach(event_id_or_listener, compiled)
        end
        self
      end

      # Removes a listener object (or a subscribed block) from every event.
      # @return [self]
      def unsubscribe(listener)
        __bus__.detach(listener)
        self
      end

      # @return [Boolean] whether the listener object (or block) is subscribed to any event
      def subscribed?(listener)
        __bus__.subscribed?(listener)
      end

      # Yields the event with each subscriber whose filter accepts it, without calling them.
      # @yieldparam event [Event]
      # @yieldparam listener [#call] the block or bound listener method
      # @return [self, Enumerator]
      def process(event_id, payload = EMPTY_HASH)
        return enum_for(:process, event_id, payload) unless block_given?

        channel = __bus__.channel(event_id)
        event = channel.event(payload)
        channel.subscriptions.each do |subscription|
          yield(event, subscription.callable) if subscription.accepts?(event)
        end
        self
      end

      # Lets a publisher skip building a payload nobody would receive.
      # @return [Boolean] whether the registered event has any subscriber
      # @raise [UnregisteredEventError]
      def subscribers?(event_id)
        !__bus__.channel(event_id).subscriptions.empty?
      end

      # @return [Boolean]
      def event_registered?(event_id)
        __bus__.registered?(event_id)
      end

      # @return [Array<String>] registered event ids
      def registered_events
        __bus__.event_ids
      end

      # @api private the per-instance bus, created on first use; double-checked so racing threads share one
      # @return [Bus]
      def __bus__
        @__bus__ || BUS_INIT_LOCK.synchronize { @__bus__ ||= Bus.new(__class_events__) }
      end

      private

      # An event id without a block can never fire: say which mistake it is.
      def raise_blockless_subscription(event_id)
        raise InvalidSubscriberError, event_id unless __bus__.registered?(event_id)

        raise ArgumentError, "subscribe(#{event_id.inspect}) needs a block; pass listener objects without an id"
      end

      # @return [Hash{String=>Hash}] events registered at class level (none when Publisher was `extend`ed)
      def __class_events__
        self.class.respond_to?(:__publisher_events__) ? self.class.__publisher_events__ : EMPTY_HASH
      end
    end
  end
end
