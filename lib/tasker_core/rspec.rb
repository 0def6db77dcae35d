# frozen_string_literal: true

require "rspec/expectations"
require "tasker_core/testing"

module TaskerCore
  # RSpec support for test mode (see docs/testing.md):
  #
  #   require "tasker_core/rspec"
  #
  #   it "creates the shipment task", :tasker_inline do ... end   # test mode inline! for the example
  #   it "only records", :tasker_fake do ... end                   # fake! for the example
  #   expect { checkout }.to have_created_task(namespace: "shop", name: "ship").with_context("order_id" => 7)
  #   expect(TaskerCore::Testing.run_step(Shop::Ship, context: {...})).to complete_with("shipped" => true)
  #   expect(TaskerCore.task_status(uuid)).to complete_with("ship" => { "shipped" => true })
  #
  # Every example starts with no test-mode task recorded (TaskerCore::Testing.clear).
  module RSpec
    # Symbol keys and Symbol values become Strings, as the engine stores JSON; anything else (an
    # RSpec matcher such as `a_kind_of(Integer)`) is left for RSpec to match.
    def self.as_stored(expected)
      case expected
      when Hash then expected.to_h { |k, v| [k.is_a?(Symbol) ? k.to_s : k, as_stored(v)] }
      when Array then expected.map { |v| as_stored(v) }
      when Symbol then expected.to_s
      else expected
      end
    end

    # `have_created_task(namespace:, name:, version: nil)`, optionally `.with_context(context)`.
    # As a block expectation: a task so named was created in test mode while the block ran. On a
    # value (TaskerCore::Testing, or an Array of Testing::Task): such a task is among them.
    class HaveCreatedTask
      include ::RSpec::Matchers::Composable

      def initialize(namespace:, name:, version: nil)
        @namespace = namespace.to_s
        @name = name.to_s
        @version = version&.to_s
        @context = :any
      end

      # `context`: the whole context (Symbol keys allowed), or a matcher such as
      # `a_hash_including("order_id" => 7)`.
      def with_context(context)
        @context = RSpec.as_stored(context)
        self
      end

      def supports_block_expectations?
        true
      end

      def matches?(actual)
        @candidates = candidates(actual)
        @candidates.any? { |task| match_task?(task) }
      end

      def does_not_match?(actual)
        !matches?(actual)
      end

      def description
        text = "have created task #{@namespace}/#{@name}#{"@#{@version}" if @version}"
        @context == :any ? text : "#{text} with context #{description_of(@context)}"
      end

      def failure_message
        created = @candidates.map { |t| "  #{t.namespace}/#{t.name}@#{t.version} context=#{t.context.inspect}" }
        "expected to #{description}, but #{created.empty? ? "no task was created" : "created:\n#{created.join("\n")}"}"
      end

      def failure_message_when_negated
        "expected not to #{description}, but it was created"
      end

      private

      def candidates(actual)
        if actual.is_a?(Proc)
          before = Testing.tasks.map(&:task_uuid)
          actual.call
          return Testing.tasks.reject { |t| before.include?(t.task_uuid) }
        end
        return Testing.tasks if actual == Testing

        Array(actual)
      end

      def match_task?(task)
        task.namespace == @namespace && task.name == @name && (@version.nil? || task.version == @version) &&
          (@context == :any || values_match?(@context, task.context))
      end
    end

    # `complete_with(results)`: on a completion (from Testing.run_step), it succeeded with this
    # result; on a task status Hash, the task is complete and each named step's result matches
    # (`{"step_name" => result}`). Results compare as the engine stores them (String keys); RSpec
    # matchers may stand for any part.
    class CompleteWith
      include ::RSpec::Matchers::Composable

      def initialize(expected)
        @expected = RSpec.as_stored(expected)
      end

      def matches?(actual)
        @actual = actual
        return false unless actual.is_a?(Hash)

        actual.key?(:steps) ? task_matches?(actual) : completion_matches?(actual)
      end

      def description
        "complete with #{description_of(@expected)}"
      end

      def failure_message
        return "expected a completion or a task status Hash, got #{@actual.inspect}" unless @actual.is_a?(Hash)
        return task_failure if @actual.key?(:steps)

        unless @actual[:success]
          return "expected the step to #{description}, but it failed: #{@actual[:error_class]}: " \
                 "#{@actual[:error_message]}#{" (timed out)" if @actual[:timed_out]}"
        end

        "expected the step to #{description}, but its result was #{@actual[:result].inspect}"
      end

      def failure_message_when_negated
        "expected not to #{description}, but it did"
      end

      private

      def completion_matches?(completion)
        completion[:success] == true && values_match?(@expected, completion[:result])
      end

      def task_matches?(status)
        return false unless status[:status] == "complete"
        return false unless @expected.is_a?(Hash)

        @expected.all? do |step_name, result|
          step = status[:steps].find { |s| s[:name] == step_name }
          step && values_match?(result, step[:result])
        end
      end

      def task_failure
        steps = @actual[:steps].map do |s|
          "  #{s[:name]}: #{s[:status]} (attempts #{s[:attempts]}) " \
            "#{s[:error_message] ? "error: #{s[:error_message]}" : "result: #{s[:result].inspect}"}"
        end
        "expected task #{@actual[:namespace]}/#{@actual[:name]} to #{description}, but it is " \
          "#{@actual[:status]}:\n#{steps.join("\n")}"
      end
    end

    # Included into every example group by `require "tasker_core/rspec"`.
    module Matchers
      def have_created_task(namespace:, name:, version: nil) # rubocop:disable Naming/PredicateName
        HaveCreatedTask.new(namespace: namespace, name: name, version: version)
      end

      def complete_with(results)
        CompleteWith.new(results)
      end
    end
  end
end

if defined?(RSpec) && RSpec.respond_to?(:configure)
  RSpec.configure do |config|
    config.include TaskerCore::RSpec::Matchers
    config.before { TaskerCore::Testing.clear }
    config.around(:each, :tasker_inline) { |example| TaskerCore::Testing.inline! { example.run } }
    config.around(:each, :tasker_fake) { |example| TaskerCore::Testing.fake! { example.run } }
  end
end
