# frozen_string_literal: true

require "json"
require "securerandom"
require "singleton"
require "time"
require "timeout"

require_relative "tasker_core/version"
# The native extension defines TaskerCore::FFI and the error classes.
require "tasker_core/tasker_core"
require_relative "tasker_core/errors"
require_relative "tasker_core/logger"
require_relative "tasker_core/relay_thread"
require_relative "tasker_core/log_relay"
require_relative "tasker_core/middleware/chain"
require_relative "tasker_core/configuration"
require_relative "tasker_core/events/publisher"
require_relative "tasker_core/models/task_sequence_step_wrapper"
require_relative "tasker_core/step_handler/base"
require_relative "tasker_core/registry/handler_registry"
require_relative "tasker_core/worker/event_bridge"
require_relative "tasker_core/worker/step_interrupter"
require_relative "tasker_core/worker/task_end_relay"
require_relative "tasker_core/worker/step_execution_subscriber"
require_relative "tasker_core/worker/handler_validation"
require_relative "tasker_core/worker/handler_pool"
require_relative "tasker_core/worker/launcher"
require_relative "tasker_core/worker/signal_handlers"
require_relative "tasker_core/worker/bootstrap"
require_relative "tasker_core/client"
require_relative "tasker_core/client_on_demand"
require_relative "tasker_core/web"
# Only inside a Rails app (Rails loaded first, as Bundler.require does).
require_relative "tasker_core/railtie" if defined?(Rails::Railtie)

# Workflow steps run by a Rust engine inside this process. Requiring the gem starts nothing:
# see TaskerCore::Worker::Bootstrap.start! and TaskerCore.create_task.
module TaskerCore
end

# Log lines are written by a background thread; write out the queued ones before the process ends.
# Registered first, so it runs after every at_exit registered later (a worker's drain included).
at_exit { TaskerCore::FFI.flush_logs }
