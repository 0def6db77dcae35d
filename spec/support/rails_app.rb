# frozen_string_literal: true

require "tmpdir"
require "fileutils"

# A minimal Rails 6.1 application written into a temporary directory, for the Railtie's specs:
# real Rails (Debian's railties/activerecord), booted in a child process as an app would be.
module RailsApp
  APPLICATION = <<~RUBY
    require "rails"
    require "active_record/railtie"
    require "tasker_core"

    module SpecApp
      class Application < Rails::Application
        config.load_defaults 6.1
        config.root = File.expand_path("..", __dir__)
        config.eager_load = false
        config.logger = Logger.new(File.join(config.root, "log", "app.log"))
        # RELOAD=1: development's code reloading (edited handlers are loaded again).
        config.cache_classes = ENV["RELOAD"] != "1"
        config.tasker_core.concurrency = 2
        config.tasker_core.log_level = "warn"
        config.tasker_core.wrap_handlers = false if ENV["WRAP"] == "0"
      end
    end
  RUBY

  DATABASE = <<~YAML
    default: &default
      adapter: postgresql
      host: 127.0.0.1
      username: postgres
      database: test
      pool: 3
    development:
      <<: *default
    test:
      <<: *default
  YAML

  TEMPLATE = <<~YAML
    namespace: orders
    name: stamp
    version: 1.0.0
    steps:
      - { name: stamp, handler: { callable: Orders::Stamp } }
  YAML

  # The handler reports where it ran: its code version, whether the Rails executor wrapped it,
  # and whether it holds a database connection.
  def self.handler(version)
    <<~RUBY
      module Orders
        class Stamp < TaskerCore::StepHandler::Base
          def call(_task, _sequence, _step)
            {
              "version" => #{version.inspect},
              "executor_active" => Rails.application.executor.active?,
              "database" => ActiveRecord::Base.connection.select_value("select 41 + 1")
            }
          end
        end
      end
    RUBY
  end

  BIN_RAILS = <<~RUBY
    APP_PATH = File.expand_path("../config/application", __dir__)
    require "rails/commands"
  RUBY

  # Runs two tasks on a worker (EDIT=1: edits the handler in between, as a developer would) and
  # prints what the app saw, one JSON document per line.
  RUN_TASKS = <<~RUBY
    require_relative "../config/environment"
    require "json"

    def stamp
      uuid = TaskerCore.create_task(namespace: "orders", name: "stamp")
      TaskerCore.wait_for_task(uuid, timeout: 20)[:steps].first.slice(:status, :result, :error_message)
    end

    puts JSON.generate(TaskerCore.configuration.worker_config)
    TaskerCore::Railtie.start_worker!
    puts JSON.generate(stamp)
    if ENV["EDIT"] == "1"
      path = File.expand_path("../app/handlers/orders/stamp.rb", __dir__)
      File.write(path, File.read(path).sub('"v1"', '"v2"'))
    end
    puts JSON.generate(stamp)
    puts JSON.generate(ActiveRecord::Base.connection_pool.stat)
  RUBY

  # Writes the app; returns its root.
  def self.create(dir)
    files = {
      "config/application.rb" => APPLICATION,
      "config/environment.rb" => "require_relative \"application\"\nRails.application.initialize!\n",
      "config/database.yml" => DATABASE,
      "config/tasker/orders/stamp.yml" => TEMPLATE,
      "app/handlers/orders/stamp.rb" => handler("v1"),
      "Rakefile" => "require_relative \"config/application\"\nRails.application.load_tasks\n",
      "bin/rails" => BIN_RAILS,
      "script/run_tasks.rb" => RUN_TASKS,
      "log/.keep" => "",
      # Set in an initializer, as apps often do: the Railtie reads config.tasker_core after them.
      "config/initializers/tasker_core.rb" => "Rails.application.config.tasker_core.log_level = \"error\"\n"
    }
    files.each do |path, text|
      FileUtils.mkdir_p(File.dirname(File.join(dir, path)))
      File.write(File.join(dir, path), text)
    end
    # Rails' file watcher ignores modification times in the future and compares whole seconds:
    # date the handler in the past, so that an edit during the spec counts as one.
    File.utime(Time.now - 60, Time.now - 60, File.join(dir, "app/handlers/orders/stamp.rb"))
    dir
  end
end
