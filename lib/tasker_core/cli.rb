# frozen_string_literal: true

require "io/wait"
require "uri"
require_relative "version"
require_relative "cli/options"

module TaskerCore
  # `tasker-worker`: runs a worker process until TERM or INT, as `sidekiq` does.
  #
  #   tasker-worker -r ./config/worker.rb -c 10 -n billing,reports -t config/tasks \
  #     --backend postgres --database-url postgres://... --shutdown-timeout 25 -e production
  #
  # Signals (the traps only write to a pipe; the main thread acts on what it reads):
  #   TERM, INT  drain: no new step starts, in-flight steps get --shutdown-timeout seconds, then
  #              the steps still running are handed back (another worker takes them on
  #              PostgreSQL) and TaskerCore::Shutdown is raised in their handlers; exit 0
  #   INT again  exit at once (130); steps still running are retried after their timeout_seconds
  #   TSTP       quiet: start no new step (steps queued here go back); CONT resumes
  #   TTIN       log every thread's backtrace and the worker's status
  #
  # Exit codes: see EXIT_CODES.
  class CLI
    EXIT_CODES = {
      stopped: 0,   # stopped by TERM/INT after draining
      failed: 1,    # could not start (configuration, templates, handlers, database), or the engine failed
      usage: 2,     # bad command line or config file
      forced: 130   # a second INT: exited at once without draining
    }.freeze

    # What each signal does (Sidekiq's table); the trap only writes the name to a pipe.
    SIGNAL_ACTIONS = { "INT" => :on_stop, "TERM" => :on_stop, "TSTP" => :on_quiet, "CONT" => :on_resume,
                       "TTIN" => :on_ttin, "DONE" => :on_done }.freeze

    def initialize(out: $stdout, err: $stderr)
      @out = out
      @err = err
      @stopping = false
    end

    # @return [Integer] the process's exit status
    def run(argv)
      options = Options.new(out: @out).parse(argv)
      return EXIT_CODES[:stopped] if options.nil?

      boot(options) || (return EXIT_CODES[:failed])
      serve(options)
    rescue Options::UsageError, OptionParser::ParseError => e
      @err.puts("tasker-worker: #{e.message}")
      @err.puts("Run tasker-worker --help for the options.")
      EXIT_CODES[:usage]
    end

    private

    # Loads the app and starts the worker. False (logged) when it cannot start.
    def boot(options)
      ENV["TASKER_ENV"] = ENV["RAILS_ENV"] = ENV["RACK_ENV"] = options[:environment] if options[:environment]
      ENV["TASKER_LOG_LEVEL"] = options[:log_level] if options[:log_level]
      require "tasker_core"
      @logger = TaskerCore::Logger.new("tasker-worker")
      options[:require].each { |path| require_app(path) }
      TaskerCore::Worker::Bootstrap.start!(engine_config(options))
      true
    rescue Options::UsageError
      raise
    rescue ScriptError, StandardError => e
      report_boot_failure(e)
      false
    end

    def require_app(path)
      if File.directory?(path)
        environment = File.join(path, "config", "environment.rb")
        unless File.file?(environment)
          raise Options::UsageError,
                "--require #{path}: a directory needs config/environment.rb"
        end

        path = environment
      end
      raise Options::UsageError, "--require #{path}: no such file" unless File.file?(path)

      require File.expand_path(path)
    end

    def engine_config(options)
      config = { install_signal_handlers: false, backend: options[:backend],
                 shutdown_timeout: options[:shutdown_timeout] }
      %i[concurrency namespaces templates database_url environment log_level].each do |key|
        config[key] = options[key] if options.key?(key)
      end
      config.merge(web_config(options))
    end

    # --web BIND: the web API and dashboard; the token comes from the environment, never from the
    # command line (which other users of the host can read in the process list).
    def web_config(options)
      return {} unless options[:web]

      token = ENV.fetch("TASKER_WEB_TOKEN", "")
      { enable_web_api: true, web_api_bind: options[:web].to_s, web_api_actions: options[:web_actions] == true,
        web_api_token: (token unless token.empty?) }.compact
    end

    def report_boot_failure(error)
      message = "tasker-worker could not start: #{error.class}: #{error.message}"
      # Before the gem loaded (the extension itself failed) there is no logger yet.
      @logger ? @logger.error(message) : @err.puts(message)
    end

    def serve(options)
      @reader, @writer = IO.pipe
      (SIGNAL_ACTIONS.keys - ["DONE"]).each { |signal| trap_signal(signal) }
      log_start(options)
      code = loop_signals(options)
      log_exit
      code
    end

    def trap_signal(signal)
      Signal.trap(signal) { @writer.write_nonblock("#{signal}\n", exception: false) }
    rescue ArgumentError
      nil # a signal this platform does not have
    end

    # The main thread: acts on signals read from the pipe; checks the engine every second.
    def loop_signals(options)
      loop do
        ready = @reader.wait_readable(1)
        unless ready
          return EXIT_CODES[:failed] if engine_failed?

          next
        end
        code = handle(@reader.gets.to_s.chomp, options)
        return code if code
      end
    end

    def engine_failed?
      return false if @stopping

      state = TaskerCore::FFI.worker_status[:state]
      return false if %w[running shutting_down starting].include?(state)

      @logger.error("the engine stopped unexpectedly (state #{state}): exiting")
      true
    end

    # An exit code once the process should exit, else nil.
    def handle(signal, options)
      action = SIGNAL_ACTIONS[signal]
      action ? send(action, signal, options) : nil
    end

    def on_done(_signal, _options)
      EXIT_CODES[:stopped]
    end

    def on_quiet(_signal, _options)
      bootstrap.quiet! unless @stopping
      nil
    end

    def on_resume(_signal, _options)
      bootstrap.resume! if bootstrap.quiet? && !@stopping
      nil
    end

    def on_ttin(_signal, _options)
      dump_threads
      nil
    end

    def on_stop(signal, options)
      if @stopping
        return nil unless signal == "INT"

        @logger.error("second SIGINT: exiting now; steps still running are retried after their timeout")
        TaskerCore::FFI.flush_logs # exit! skips at_exit, which writes out the queued lines
        $stderr.flush
        exit!(EXIT_CODES[:forced])
      end
      @stopping = true
      timeout = format("%g", options[:shutdown_timeout])
      @logger.info("SIG#{signal}: draining (no new steps; running ones get #{timeout}s)")
      Thread.new do
        bootstrap.shutdown!(timeout: options[:shutdown_timeout])
      ensure
        @writer.write("DONE\n")
      end.name = "tasker-worker-stop"
      nil
    end

    def dump_threads
      Thread.list.each do |thread|
        name = thread.name || (thread == Thread.main ? "main" : thread.object_id)
        @logger.warn("thread #{name} (#{thread.status || "dead"})",
                     backtrace: Array(thread.backtrace).join("\n  "))
      end
      status = bootstrap.status
      @logger.warn("worker status", **status.slice(:state, :quiet, :steps_processed, :steps_failed,
                                                   :steps_in_flight, :handler_threads_alive, :uptime_seconds))
    end

    def log_start(options)
      status = bootstrap.status
      @logger.info("tasker-worker #{TaskerCore::VERSION} started", **{
        pid: Process.pid, worker_id: status[:worker_id], backend: options[:backend],
        database_url: redact(options[:database_url]), concurrency: status[:concurrency],
        namespaces: Array(status[:supported_namespaces]).join(","),
        templates: Array(options[:templates]).join(","), environment: status[:environment],
        shutdown_timeout: options[:shutdown_timeout], require: options[:require].join(","),
        web: status[:web_api_bind]
      }.compact)
    end

    def log_exit
      last = bootstrap.last_stop || {}
      final = last[:final_status] || {}
      @logger.info("tasker-worker stopped",
                   steps_processed: final[:steps_processed], steps_failed: final[:steps_failed],
                   handed_back: last[:handed_back], abandoned: last[:abandoned],
                   uptime_seconds: final[:uptime_seconds]&.round(1))
    end

    def redact(url)
      return nil if url.nil?

      uri = URI.parse(url)
      uri.password = "***" if uri.password
      uri.to_s
    rescue URI::Error
      "(unparsable)"
    end

    def bootstrap
      TaskerCore::Worker::Bootstrap.instance
    end
  end
end
