# frozen_string_literal: true

module TaskerCore
  module Worker
    # Found at boot, not at 3 a.m.: before a worker starts, every handler class named by the
    # templates of the namespaces it runs is resolved the way the subscriber resolves it at run time
    # (Registry::HandlerRegistry#resolve, autoload by constant name included) and checked to be
    # callable as `handler_class.new(config:).call(task, sequence, step)`. Every problem is listed in
    # one ConfigurationError. `validate_handlers: false` skips the check (handlers loaded lazily).
    class HandlerValidation
      CALLED_AS = "call(task, sequence, step)"
      HANDLER_ARGUMENTS = 3
      # Templates, and steps of each, named per problem (the rest are counted).
      SHOWN = 3
      PARAMETER_FORMATS = { opt: "%s = ...", rest: "*%s", keyreq: "%s:", key: "%s: ...", keyrest: "**%s",
                            block: "&%s" }.freeze

      # Raises ConfigurationError naming each handler class that would fail at run time.
      def self.validate!(config, registry: Registry::HandlerRegistry.instance)
        new(registry).validate!(config)
      end

      def initialize(registry)
        @registry = registry
      end

      def validate!(config)
        # Validates the config as bootstrap_worker would and loads the templates, starting nothing:
        # a bad config is refused here, before start! sets anything up, whether or not handlers
        # are checked.
        references = TaskerCore::FFI.template_handlers(config)
        return if disabled?(config)

        by_callable = references.group_by { |reference| reference[:callable] }
        problems = by_callable.filter_map do |callable, steps|
          problem = problem_with(callable)
          [callable, steps, problem] if problem
        end
        raise ConfigurationError, report(problems, by_callable.size) unless problems.empty?
      end

      private

      # Absent or nil: on. FFI.template_handlers has already refused any value but true, false or
      # nil, and a key given both as a Symbol and as a String.
      def disabled?(config)
        return false unless config.is_a?(Hash)

        config.fetch(:validate_handlers) { config["validate_handlers"] } == false
      end

      # Why `callable` cannot run as a handler, or nil when it can. A class the registry resolves
      # need not subclass StepHandler::Base (the subscriber runs any class registered or found by
      # name), but must be callable as the subscriber calls it.
      def problem_with(callable)
        klass = resolve(callable)
        return klass if klass.is_a?(String)
        return unresolved(callable) unless klass

        problem = call_problem(klass) || initialize_problem(klass)
        return problem if problem.nil? || klass <= StepHandler::Base

        "is not a TaskerCore::StepHandler::Base subclass, and #{problem}"
      end

      # The class, nil, or (when loading it raised) the problem as a String.
      def resolve(callable)
        @registry.resolve(callable)
      rescue StandardError, ScriptError => e
        "raised #{e.class} while loading: #{e.message}"
      end

      # The registry found no handler: no such constant, or a constant that is no handler class.
      def unresolved(callable)
        constant = Object.const_get(callable)
        return "is a module, not a TaskerCore::StepHandler::Base subclass" if constant.instance_of?(Module)
        return "is not a TaskerCore::StepHandler::Base subclass (it defines no #call)" if constant.is_a?(Class)

        "is a #{constant.class}, not a TaskerCore::StepHandler::Base subclass"
      rescue NameError => e
        # A NameError about another constant came from loading this one (autoload, Zeitwerk).
        return "raised NameError while loading: #{e.message}" unless callable.split("::").include?(e.name.to_s)

        "is not defined (no such constant: define it, or register it with " \
          "TaskerCore::Registry::HandlerRegistry.instance.register)"
      end

      def call_problem(klass)
        method = klass.instance_method(:call)
        return "does not define #call: it is called as #{CALLED_AS}" if method.owner == StepHandler::Base

        parameters = method.parameters
        return if positional?(parameters, HANDLER_ARGUMENTS) && parameters.none? { |type, _| type == :keyreq }

        "has the wrong arity: #call(#{signature(parameters)}) is called as #{CALLED_AS}"
      end

      # The subscriber builds each handler as `new(config: Hash)`.
      def initialize_problem(klass)
        parameters = klass.instance_method(:initialize).parameters
        return if positional?(parameters, 0) && accepts_config_keyword?(parameters)

        "has an initialize(#{signature(parameters)}) that cannot be called as new(config: Hash)"
      end

      # `config:` (or **keywords) accepted, and no other keyword required.
      def accepts_config_keyword?(parameters)
        keywords = parameters.select { |type, _| %i[key keyreq keyrest].include?(type) }
        takes_config = keywords.any? { |type, name| type == :keyrest || name == :config }
        takes_config && keywords.none? { |type, name| type == :keyreq && name != :config }
      end

      # Whether a method with these parameters accepts exactly `count` positional arguments.
      def positional?(parameters, count)
        required = parameters.count { |type, _| type == :req }
        optional = parameters.count { |type, _| type == :opt }
        rest = parameters.any? { |type, _| type == :rest }
        required <= count && (rest || required + optional >= count)
      end

      def signature(parameters)
        parameters.map { |type, name| format(PARAMETER_FORMATS.fetch(type, "%s"), name) }.join(", ")
      end

      def report(problems, total)
        lines = problems.map do |callable, steps, problem|
          "  - #{callable} #{problem} (#{where(steps)})"
        end
        "#{problems.size} of the #{total} handler classes named by the templates cannot run:\n" \
          "#{lines.join("\n")}\n" \
          "(validate_handlers: false skips this check, for handlers loaded after start!)"
      end

      # "used by shop/orders@1.0.0 step pay; reports/daily@2.0.0 steps a, b": the first few
      # templates, and the first few steps of each.
      def where(steps)
        templates = steps.group_by { |step| "#{step[:namespace]}/#{step[:name]}@#{step[:version]}" }
        shown = templates.first(SHOWN).map do |template, in_template|
          names = in_template.map { |step| step[:step] }
          "#{template} #{names.size == 1 ? "step" : "steps"} #{listed(names)}"
        end
        "used by #{shown.join("; ")}#{"; and #{templates.size - SHOWN} more templates" if templates.size > SHOWN}"
      end

      def listed(names)
        return names.join(", ") if names.size <= SHOWN

        "#{names.first(SHOWN).join(", ")} and #{names.size - SHOWN} more"
      end
    end
  end
end
