# frozen_string_literal: true

# Specs run against the extension built in place (`rake compile`).
$LOAD_PATH.unshift(File.expand_path("../lib", __dir__))

FIXTURES = File.expand_path("fixtures", __dir__)
ENV["TASKER_ENV"] = "test"
ENV["TASKER_TEMPLATE_PATH"] ||= File.join(FIXTURES, "templates")
ENV["TASKER_LOG_LEVEL"] ||= "error"

require "tasker_core"
Dir[File.join(__dir__, "support", "**", "*.rb")].each { |f| require f }

RSpec.configure do |config|
  config.expect_with(:rspec) { |c| c.syntax = :expect }
  config.disable_monkey_patching!
  config.order = :defined
  config.example_status_persistence_file_path = ".rspec_status"
  config.include SpecHelpers

  # CI runs the integration and workflow specs once more under each of these (see .ci/run):
  # TASKER_SPEC_GC_STRESS=1 collects at every allocation, TASKER_SPEC_GC_COMPACT=1 compacts the heap
  # at every major GC, so that a Ruby value the bridge forgot to root or mark is found.
  if ENV["TASKER_SPEC_GC_STRESS"] == "1"
    config.around do |example|
      GC.stress = true
      example.run
    ensure
      GC.stress = false
    end
  end
  if ENV["TASKER_SPEC_GC_COMPACT"] == "1"
    GC.auto_compact = true
    # Major GCs are rare in a short example: compact once more after each, with its worker still up.
    config.prepend_after { GC.compact }
  end

  # Every example starts and ends with no worker, whatever it did.
  config.after do
    TaskerCore::Worker::Bootstrap.instance.shutdown!
    TaskerCore::FFI.stop_worker if TaskerCore::FFI.worker_status[:running]
  rescue TaskerCore::WorkerNotInitializedError
    nil
  end
end
