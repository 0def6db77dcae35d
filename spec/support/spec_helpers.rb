# frozen_string_literal: true

require "rbconfig"
require "open3"
require "tmpdir"

# Helpers shared by the specs.
module SpecHelpers
  LIB = File.expand_path("../../lib", __dir__)

  # Seed 002's helper: a task of the test template, whose handlers are defined below.
  def create_test_task(context: { "value" => 1 })
    TaskerCore.create_task(namespace: "test", name: "linear", version: "1.0.0", context: context)
  end

  # Wait until the block is truthy (polling Ruby state in a spec, not in the product).
  def eventually(timeout: 5, interval: 0.01)
    deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + timeout
    loop do
      result = yield
      return result if result
      raise "condition not met within #{timeout}s" if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline

      sleep interval
    end
  end

  # Native threads of this process (Ruby threads and Rust threads alike).
  def os_thread_count
    Dir.children("/proc/self/task").size
  end

  # Run Ruby code in a child process with the gem loaded; returns [stdout, stderr, status].
  # A child still running after `timeout` seconds is killed and the spec fails.
  def run_ruby(code, env: {}, timeout: 30)
    Open3.popen3(env, RbConfig.ruby, "-I", LIB, "-e", code, chdir: Dir.tmpdir) do |stdin, stdout, stderr, wait|
      stdin.close
      out = Thread.new { stdout.read }
      err = Thread.new { stderr.read }
      unless wait.join(timeout)
        Process.kill("KILL", wait.pid)
        wait.join
        raise "child Ruby still running after #{timeout}s (killed); stderr:\n#{err.value}"
      end
      [out.value, err.value, wait.value]
    end
  end
end

# Seed 002's integration spec names the wrapper class bare and uses ActiveSupport's be_present.
TaskSequenceStepWrapper = TaskerCore::Models::TaskSequenceStepWrapper unless defined?(TaskSequenceStepWrapper)

unless Object.method_defined?(:present?)
  class Object
    def present?
      respond_to?(:empty?) ? !empty? : !nil?
    end
  end
end
