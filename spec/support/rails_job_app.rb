# frozen_string_literal: true

require "tmpdir"
require "fileutils"

# A minimal Rails 6.1 application using Active Job on tasker_core with PostgreSQL: web-like
# processes (scripts) enqueue through a client-only connection, and `bin/rails tasker:worker`
# runs the jobs. Written into a temporary directory; the database comes from TASKER_DATABASE_URL.
module RailsJobApp
  APPLICATION = <<~RUBY
    require "rails"
    require "active_job/railtie"
    require "tasker_core"

    module JobApp
      class Application < Rails::Application
        config.load_defaults 6.1
        config.root = File.expand_path("..", __dir__)
        config.eager_load = false
        config.logger = ActiveSupport::Logger.new(File.join(config.root, "log", "app.log"))
        config.log_level = :info

        # docs/rails.md, "Active Job" and "A web process and a worker process"
        config.active_job.queue_adapter = :tasker_core
        config.tasker_core.backend = "postgres"
        config.tasker_core.database_url = ENV.fetch("TASKER_DATABASE_URL")
        config.tasker_core.client_only = true
        config.tasker_core.active_job_queues = %w[default critical]
        config.tasker_core.log_output = "rails"
        config.tasker_core.log_level = "info"
        config.tasker_core.concurrency = 2
      end
    end
  RUBY

  # Each job appends a JSON line to ENV["JOB_LOG"]: what ran, with what, and when.
  JOBS = {
    "app/jobs/application_job.rb" => <<~RUBY,
      class ApplicationJob < ActiveJob::Base
        def record(event, **data)
          line = JSON.generate({ "job" => self.class.name, "event" => event, "job_id" => job_id,
                                 "executions" => executions, "at" => Time.now.to_f, "pid" => Process.pid }
                                 .merge(data.transform_keys(&:to_s)))
          File.open(ENV.fetch("JOB_LOG"), "a") { |f| f.puts(line) }
        end
      end
    RUBY
    "app/jobs/record_job.rb" => <<~RUBY,
      class RecordJob < ApplicationJob
        queue_as :default

        def perform(label, options = {})
          TaskerCore::Logger.new("RecordJob").info("performing \#{label}")
          record("performed", label: label, options_class: options.class.name,
                              symbol_key: options.key?(:amount), at_class: options[:at].class.name)
        end
      end
    RUBY
    "app/jobs/flaky_job.rb" => <<~RUBY,
      class FlakyError < StandardError; end

      class FlakyJob < ApplicationJob
        queue_as :critical
        retry_on FlakyError, wait: 1, attempts: 3

        def perform
          record("started")
          raise FlakyError, "not yet" if executions < 3

          record("performed")
        end
      end
    RUBY
    "app/jobs/discarded_job.rb" => <<~RUBY,
      class StaleError < StandardError; end

      class DiscardedJob < ApplicationJob
        discard_on StaleError

        def perform
          record("started")
          raise StaleError, "the record is gone"
        end
      end
    RUBY
    "app/jobs/exhausted_job.rb" => <<~RUBY,
      class ExhaustedJob < ApplicationJob
        retry_on FlakyError, wait: 0, attempts: 2

        def perform
          record("started")
          raise FlakyError, "never works"
        end
      end
    RUBY
    "app/jobs/failing_job.rb" => <<~RUBY
      class FailingJob < ApplicationJob
        def perform
          record("started")
          raise ArgumentError, "boom from the job"
        end
      end
    RUBY
  }.freeze

  BIN_RAILS = <<~RUBY
    APP_PATH = File.expand_path("../config/application", __dir__)
    require "rails/commands"
  RUBY

  # A web process's work: enqueue jobs, print one JSON line per job (its task), then the process's
  # own engine status. WAIT=1 waits for the tasks and prints their final statuses.
  ENQUEUE = <<~RUBY
    require_relative "../config/environment"
    require "json"

    jobs = {
      "now" => RecordJob.perform_later("now", { amount: 3, at: Time.utc(2026, 1, 2) }),
      "later" => RecordJob.set(wait: 2.seconds).perform_later("later"),
      "until" => RecordJob.set(wait_until: Time.now + 2).perform_later("until"),
      "flaky" => FlakyJob.perform_later,
      "discarded" => DiscardedJob.perform_later,
      "failing" => FailingJob.perform_later,
      "exhausted" => ExhaustedJob.perform_later
    }
    enqueued_at = Time.now.to_f
    statuses = jobs.transform_values { |job| TaskerCore.task_status(job.provider_job_id) }
    puts JSON.generate("enqueued_at" => enqueued_at,
                       "jobs" => jobs.transform_values { |j| { "task" => j.provider_job_id, "job_id" => j.job_id } },
                       "early" => statuses.transform_values { |s| s.slice(:namespace, :name, :status) })
    finals = jobs.transform_values do |job|
      TaskerCore.wait_for_task(job.provider_job_id, timeout: 60).then do |final|
        step = final[:steps].first
        { "status" => final[:status], "step" => step.slice(:status, :attempts, :error_message) }
      end
    end
    # retry_on's last attempt re-raises: that (second) task of ExhaustedJob ends in error.
    errors = []
    60.times do
      errors = TaskerCore.tasks(status: "error", limit: 10)[:tasks]
      break if errors.size >= 2

      sleep 0.5
    end
    finals["error_tasks"] = errors.map { |t| TaskerCore.task_status(t[:task_uuid])[:steps].first[:error_message] }.sort
    puts JSON.generate(finals)
    worker = TaskerCore::FFI.worker_status
    puts JSON.generate("client" => TaskerCore::ClientOnDemand.client&.connected?,
                       "namespaces" => worker[:supported_namespaces],
                       "handler_threads" => Thread.list.count { |t| t.name.to_s.start_with?("tasker-handler") })
  RUBY

  def self.create(dir)
    files = {
      "config/application.rb" => APPLICATION,
      "config/environment.rb" => "require_relative \"application\"\nRails.application.initialize!\n",
      "Rakefile" => "require_relative \"config/application\"\nRails.application.load_tasks\n",
      "bin/rails" => BIN_RAILS,
      "script/enqueue.rb" => ENQUEUE,
      "log/.keep" => "",
      "tmp/.keep" => ""
    }.merge(JOBS)
    files.each do |path, text|
      FileUtils.mkdir_p(File.dirname(File.join(dir, path)))
      File.write(File.join(dir, path), text)
    end
    dir
  end
end
