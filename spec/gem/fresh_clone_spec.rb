# frozen_string_literal: true

require "open3"
require "rbconfig"
require "tmpdir"

# The README's main job as a user runs it from a checkout (after `bin/setup && rake compile`): no
# gem installed, nothing on RUBYLIB or RUBYOPT. The scripts must find this tree's lib themselves.
RSpec.describe "the examples and benchmarks from a checkout" do
  root = File.expand_path("../..", __dir__)

  # `ruby <script>` from the repository root, as a user types it, with a Ruby that can see no
  # installed gems (an empty GEM_HOME/GEM_PATH) and no load path from this process.
  def run_script(root, script, env, timeout:)
    Dir.mktmpdir("tasker-no-gems") do |no_gems|
      clean = { "RUBYLIB" => nil, "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil, "BUNDLER_SETUP" => nil,
                "GEM_HOME" => no_gems, "GEM_PATH" => no_gems, "TASKER_TEMPLATE_PATH" => nil,
                "TASKER_LOG_LEVEL" => nil }
      Open3.popen3(clean.merge(env), RbConfig.ruby, script, chdir: root) do |stdin, stdout, stderr, wait|
        stdin.close
        out = Thread.new { stdout.read }
        err = Thread.new { stderr.read }
        unless wait.join(timeout)
          Process.kill("KILL", wait.pid)
          wait.join
          raise "#{script} still running after #{timeout}s (killed); stderr:\n#{err.value}"
        end
        [out.value, err.value, wait.value]
      end
    end
  end

  it "runs `ruby examples/demo.rb` to completion and prints the report" do
    out, err, status = run_script(root, "examples/demo.rb", { "TASKS" => "40", "CONCURRENCY" => "2" }, timeout: 30)

    expect(status).to be_success, "exit #{status.exitstatus}\nstdout:\n#{out}\nstderr:\n#{err}"
    expect(err).to eq("")
    expect(out).to start_with("tasker_core #{TaskerCore::VERSION} demo: 40 order workflows x 5 steps")
    # Not a terminal: the progress bar is written once, in its final state, with no carriage returns.
    expect(out).not_to include("\r")
    expect(out.lines[1]).to match(%r{\A\[#{"#" * 40}\] 100%  200/200 steps  \d+ steps/s\n\z})
    expect(out).to include("tasks:       40 complete, 0 error")
    expect(out).to include("steps:       200 processed, 0 failed")
    expect(out).to match(/^example result: \{"sent"=>true, "tracking"=>"TRK\w+"\}$/)
  end

  it "runs a benchmark (`ruby benches/sequential.rb`, smoke size) the same way" do
    out, err, status = run_script(root, "benches/sequential.rb", { "BENCH_SMOKE" => "1" }, timeout: 30)

    expect(status).to be_success, "exit #{status.exitstatus}\nstdout:\n#{out}\nstderr:\n#{err}"
    expect(err).to eq("")
    expect(out).to start_with("== ")
  end
end
