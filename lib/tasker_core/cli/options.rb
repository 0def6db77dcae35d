# frozen_string_literal: true

require "erb"
require "optparse"
require "yaml"

module TaskerCore
  class CLI
    # The worker command's options: the command line over a -C YAML file holding the same
    # options (long names, dashes or underscores; ERB is evaluated first, for ENV lookups).
    class Options
      class UsageError < StandardError; end

      # key, short, long, type (or allowed values), description; :append options may repeat.
      TABLE = [
        [:require, "-r", "--require PATH", :append,
         "Ruby file to load first (handlers, app); a directory loads its config/environment.rb. Repeatable"],
        [:concurrency, "-c", "--concurrency N", Integer, "Handler threads (default: 4)"],
        [:namespaces, "-n", "--namespaces A,B", Array, "Namespaces to run (default: every template's)"],
        [:templates, "-t", "--templates PATH", :append,
         "Template directory or YAML file (default: $TASKER_TEMPLATE_PATH). Repeatable"],
        [:backend, nil, "--backend NAME", %w[memory postgres], "memory (default) or postgres"],
        [:database_url, nil, "--database-url URL", String,
         "PostgreSQL URL (default with --backend postgres: $DATABASE_URL)"],
        [:shutdown_timeout, nil, "--shutdown-timeout SECONDS", Float,
         "How long TERM/INT wait for running steps (default: 25)"],
        [:environment, "-e", "--environment NAME", String, "Environment (sets TASKER_ENV, RAILS_ENV, RACK_ENV)"],
        [:config_file, "-C", "--config FILE", String, "YAML file holding these options (command-line options win)"],
        [:log_level, nil, "--log-level LEVEL", %w[trace debug info warn error],
         "trace, debug, info (default), warn, error"],
        [:web, nil, "--web BIND", String,
         "Serve the web API and dashboard at BIND (host:port, e.g. 127.0.0.1:9393); a non-loopback BIND " \
         "needs $TASKER_WEB_TOKEN"],
        [:web_actions, nil, "--web-actions", :flag, "Let the dashboard cancel and retry tasks (with --web)"]
      ].freeze

      # Options a config file may hold: the long options' names, with underscores.
      FILE_KEYS = (TABLE.map { |row| row.first.to_s } - ["config_file"]).freeze

      HELP_FOOTER = <<~TEXT

        Signals: TERM/INT drain and exit 0, a second INT exits at once (130), TSTP stops taking
        steps and CONT resumes, TTIN logs thread backtraces and the worker status.
        Exit codes: 0 stopped, 1 could not start or the engine failed, 2 bad options, 130 forced.
      TEXT

      def initialize(out: $stdout)
        @out = out
      end

      # The options from the command line over those of the -C file, validated. nil when
      # --help or --version answered instead.
      def parse(argv)
        cli = {}
        rest = parser(cli).parse!(argv.dup)
        raise UsageError, "unexpected argument#{"s" if rest.size > 1}: #{rest.join(" ")}" unless rest.empty?
        return nil if cli.delete(:answered)

        file = cli.delete(:config_file)
        options = file ? load_file(file) : {}
        validate(options.merge!(cli))
      end

      private

      def parser(opts)
        OptionParser.new do |o|
          o.banner = "Usage: tasker-worker [options]\n\nRuns tasker_core steps until TERM or INT.\n\n"
          TABLE.each do |key, short, long, type, description|
            args = [short, long, (type unless %i[append flag].include?(type)), description].compact
            o.on(*args) { |v| type == :append ? (opts[key] ||= []) << v : opts[key] = v }
          end
          o.on("-V", "--version", "Print the version and exit") { answer(opts, "tasker-worker #{TaskerCore::VERSION}") }
          o.on("-h", "--help", "Print this help and exit") { answer(opts, o.help + HELP_FOOTER) }
        end
      end

      def answer(opts, text)
        @out.puts(text)
        opts[:answered] = true
      end

      def load_file(path)
        raise UsageError, "config file #{path} not found" unless File.file?(path)

        data = YAML.safe_load(ERB.new(File.read(path)).result, aliases: true) || {}
        unless data.is_a?(Hash)
          raise UsageError,
                "config file #{path}: expected a mapping of options, got #{data.class}"
        end

        data.to_h do |key, value|
          name = key.to_s.tr("-", "_")
          unless FILE_KEYS.include?(name)
            raise UsageError, "config file #{path}: unknown option #{key.inspect} (known: #{FILE_KEYS.join(", ")})"
          end

          [name.to_sym, value]
        end
      rescue Psych::Exception => e
        raise UsageError, "config file #{path}: #{e.message}"
      end

      def validate(options)
        options[:require] = Array(options[:require]).map(&:to_s)
        options[:templates] = Array(options[:templates]).map(&:to_s) if options.key?(:templates)
        options[:namespaces] = list(options[:namespaces]) if options.key?(:namespaces)
        integer(options, :concurrency)
        seconds(options, :shutdown_timeout)
        options[:shutdown_timeout] ||= 25.0
        backend(options)
        web(options)
        options
      end

      # The bind's form is checked by the engine at start (a ConfigurationError naming
      # web_api_bind); here only what the command line alone can tell.
      def web(options)
        if options.key?(:web) && options[:web].to_s.strip.empty?
          raise UsageError, "--web needs host:port, e.g. 127.0.0.1:9393"
        end
        return unless options[:web_actions] && !options[:web]

        raise UsageError, "--web-actions needs --web BIND"
      end

      def backend(options)
        options[:backend] = (options[:backend] || "memory").to_s
        unless %w[memory postgres].include?(options[:backend])
          raise UsageError, "backend must be memory or postgres, got #{options[:backend].inspect}"
        end
        return unless options[:backend] == "postgres"

        options[:database_url] ||= ENV.fetch("DATABASE_URL", nil)
        return unless options[:database_url].to_s.empty?

        raise UsageError, "--backend postgres needs --database-url (or $DATABASE_URL)"
      end

      def list(value)
        value.is_a?(Array) ? value.map(&:to_s) : value.to_s.split(",").map(&:strip).reject(&:empty?)
      end

      def integer(options, key)
        return unless options.key?(key)

        value = Integer(options[key], exception: false)
        raise UsageError, "#{key} must be a positive integer, got #{options[key].inspect}" unless value&.positive?

        options[key] = value
      end

      def seconds(options, key)
        return unless options.key?(key)

        value = Float(options[key], exception: false)
        return options[key] = value if value && value >= 0

        raise UsageError, "#{key} must be a number of seconds >= 0, got #{options[key].inspect}"
      end
    end
  end
end
