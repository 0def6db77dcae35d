# frozen_string_literal: true

require "rails/railtie"
require_relative "middleware/rails_executor"

module TaskerCore
  # Loaded by `require "tasker_core"` when Rails is (written for Rails 6.1, the Rails Debian ships,
  # and later). In config/application.rb or an environment file:
  #
  #   config.tasker_core.concurrency = 8             # any key of Worker::Bootstrap.start!'s config
  #   config.tasker_core.templates = "config/tasker" # the default (a directory, read recursively)
  #   config.tasker_core.wrap_handlers = true        # the default: each step inside the reloader
  #   config.tasker_core.client_only = true          # web processes only create tasks (PostgreSQL)
  #   config.tasker_core.active_job_queues = %w[default mailers] # with queue_adapter :tasker_core
  #
  # - TaskerCore.configuration.worker_config is then that config, with templates defaulting to
  #   config/tasker and environment to Rails.env; `bin/rails tasker:worker` starts a worker with
  #   it, TaskerCore::Railtie.start_worker! starts one in the current process, and test mode
  #   (TaskerCore::Testing) takes its templates from it.
  # - Each handler call runs inside `Rails.application.reloader.wrap` (Middleware::RailsExecutor).
  class Railtie < ::Rails::Railtie
    # Keys of config.tasker_core that are the Railtie's, not the worker's.
    RAILTIE_KEYS = %i[wrap_handlers client_only active_job_queues active_job_timeout].freeze
    # The queues whose job templates are generated when Active Job's adapter is :tasker_core and
    # config.tasker_core.active_job_queues is not set (mailers: Action Mailer's deliver_later).
    DEFAULT_JOB_QUEUES = %w[default mailers].freeze

    config.tasker_core = ActiveSupport::OrderedOptions.new

    # Before Active Job reads config.active_job.queue_adapter (its on_load hooks run in order).
    ActiveSupport.on_load(:active_job) { require "active_job/queue_adapters/tasker_core_adapter" }

    # After the app's initializers, so that config.tasker_core set there counts too.
    config.after_initialize do |app|
      TaskerCore.configuration.worker_config = Railtie.worker_config(app)
      ClientOnDemand.enable(Railtie.client_settings(app)) if app.config.tasker_core.client_only
      Railtie.log_to_rails if TaskerCore.configuration.worker_config[:log_output].to_s == "rails"
      if app.config.tasker_core.fetch(:wrap_handlers, true)
        chain = TaskerCore.configuration.handler_middleware
        chain.remove(Middleware::RailsExecutor)
        chain.prepend(Middleware::RailsExecutor, app)
      end
    end

    rake_tasks do
      load File.expand_path("tasks/tasker.rake", __dir__)
    end

    class << self
      # The worker config from config.tasker_core, with Rails' defaults filled in.
      def worker_config(app = ::Rails.application)
        settings = app.config.tasker_core.to_h.transform_keys(&:to_sym).except(*RAILTIE_KEYS)
        defaults = { environment: ::Rails.env.to_s }
        default_templates = app.root.join("config", "tasker")
        defaults[:templates] = default_templates.to_s if default_templates.directory?
        config = defaults.merge(settings)
        config[:templates] = resolve_templates(app, config[:templates]) if config.key?(:templates)
        add_job_templates(app, config)
      end

      # The settings of a client-only connection (config.tasker_core.client_only): the worker's
      # config without what only a worker uses.
      def client_settings(app = ::Rails.application)
        worker_config(app).except(:backend, *Client::WORKER_SETTINGS)
      end

      # Whether the app sends its jobs to tasker_core.
      def active_job?(app)
        adapter = app.config.respond_to?(:active_job) && app.config.active_job.queue_adapter
        adapter.to_s == "tasker_core" || adapter.is_a?(::ActiveJob::QueueAdapters::TaskerCoreAdapter) ||
          !app.config.tasker_core.active_job_queues.nil?
      rescue NameError
        false
      end

      # `log_output: "rails"`: the engine's and handlers' lines go to Rails.logger (see LogRelay).
      def log_to_rails
        LogRelay.start(::Rails.logger)
      end

      # Start a worker in this process with the app's config (`overrides` win).
      def start_worker!(overrides = {})
        Worker::Bootstrap.start!(TaskerCore.configuration.worker_config.merge(overrides))
      end

      # `bin/rails tasker:worker`: start a worker and keep the process for it until INT or TERM
      # (which shut it down gracefully and exit).
      def run_worker(overrides = {}, out: $stdout)
        # This process exists for the worker: INT and TERM end it with status 0 once the worker has
        # drained. Bootstrap's traps start the drain and then call the ones installed before them
        # (Ruby's default would end the process by the signal), so these only let the loop below end.
        %w[INT TERM].each { |signal| trap(signal) { nil } }
        bootstrap = start_worker!(overrides)
        status = bootstrap.status
        out.puts "tasker_core worker #{status[:worker_id]} running (#{Rails.env}, backend #{status[:backend]}, " \
                 "namespaces #{status[:supported_namespaces].join(", ")}); INT or TERM to stop"
        out.flush
        sleep 0.5 while bootstrap.running?
      end

      private

      # With Active Job on tasker_core: the generated template of each job queue (see
      # TaskerCore::Jobs), written under tmp/tasker_core/active_job, joins the app's templates; and
      # the queues join `namespaces` when the app lists them.
      def add_job_templates(app, config)
        return config unless active_job?(app)

        require "tasker_core/jobs"
        settings = app.config.tasker_core
        queues = Array(settings.active_job_queues || DEFAULT_JOB_QUEUES).map(&:to_s)
        paths = Jobs.template_paths(queues, dir: app.root.join("tmp", "tasker_core", "active_job").to_s,
                                            timeout_seconds: settings.active_job_timeout ||
                                                             Jobs::DEFAULT_TIMEOUT_SECONDS)
        config[:templates] = Array(config[:templates]) + paths
        config[:namespaces] = (Array(config[:namespaces]).map(&:to_s) + queues).uniq if config[:namespaces]
        config
      end

      # Relative paths are the app's (config/tasker means Rails.root/config/tasker).
      def resolve_templates(app, templates)
        paths = Array(templates).map { |path| app.root.join(path.to_s).to_s }
        templates.is_a?(Array) ? paths : paths.first
      end
    end
  end
end
