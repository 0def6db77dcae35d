# frozen_string_literal: true

# Every Ruby log line about a step names it as the engine's lines do: task_uuid, step, attempt.
# Logging is process-global, so the worker runs in a child process and its stderr is read.
RSpec.describe "Log lines about a step" do
  it "name the task, the step and the attempt when a step fails, on every attempt" do
    code = <<~RUBY
      require "tasker_core"
      require "tmpdir"
      class Flaky < TaskerCore::StepHandler::Base
        def call(_task, _sequence, step)
          raise ArgumentError, "flaky on attempt \#{step.attempts}"
        end
      end
      Dir.mktmpdir do |dir|
        File.write(File.join(dir, "flaky.yml"), <<~YAML)
          namespace: logs
          name: flaky
          version: 1.0.0
          steps:
            - name: wobble
              handler: { callable: Flaky }
              retry: { max_attempts: 2, backoff: none }
        YAML
        TaskerCore::Worker::Bootstrap.start!(templates: dir, concurrency: 1, log_level: "warn")
        uuid = TaskerCore.create_task(namespace: "logs", name: "flaky")
        puts uuid
        TaskerCore.wait_for_task(uuid, timeout: 10)
        TaskerCore::Worker::Bootstrap.instance.shutdown!
      end
    RUBY
    out, err, status = run_ruby(code)

    expect(status).to be_success, err
    uuid = out.lines.last.chomp
    failures = err.lines.grep(/step failed/)
    expect(failures.size).to eq(2), err
    failures.each_with_index do |line, i|
      expect(line).to include(%(task_uuid="#{uuid}"), %(step="wobble"), "attempt=#{i + 1}", %(error="ArgumentError"))
    end
  end
end
