# frozen_string_literal: true

module WorkflowTasksSpec
  UUID_PATTERN = /\A\h{8}-\h{4}-\h{4}-\h{4}-\h{12}\z/
  STEP_STATUSES = %w[pending enqueued in_progress complete error waiting_for_retry].freeze
  # spec/fixtures/templates_b/dag.yml
  DAG_STEPS = %w[fetch left right side join finish].freeze
  DAG_DEPENDENCIES = {
    "fetch" => [], "left" => ["fetch"], "right" => ["fetch"], "side" => [],
    "join" => %w[left right], "finish" => %w[join side]
  }.freeze

  RSpec.describe "Tasks on the embedded engine" do
    include_context "workflow worker"

    before { start_worker(concurrency: 4) }

    describe "create_task" do
      it "returns the new task's uuid" do
        uuid = create_workflow_task("dag")

        expect(uuid).to be_a(String).and match(UUID_PATTERN)
        expect(create_workflow_task("dag")).not_to eq(uuid)
      end

      it "raises ConfigurationError naming an unknown template" do
        expect { TaskerCore.create_task(namespace: "workflow", name: "nope", context: {}) }
          .to raise_error(TaskerCore::ConfigurationError, %r{workflow/nope@1\.0\.0})
        expect { TaskerCore.create_task(namespace: "workflow", name: "dag", version: "9.9.9") }
          .to raise_error(TaskerCore::ConfigurationError, %r{workflow/dag@9\.9\.9})
        expect { TaskerCore.create_task(namespace: "elsewhere", name: "dag") }
          .to raise_error(TaskerCore::ConfigurationError, /elsewhere/)
      end

      it "raises ConfigurationError for a context that is not a Hash" do
        expect { TaskerCore.create_task(namespace: "workflow", name: "dag", context: [1, 2]) }
          .to raise_error(TaskerCore::ConfigurationError, /context/)
      end

      it "raises WorkerNotInitializedError with no worker running" do
        bootstrap.shutdown!

        expect { create_workflow_task("dag") }.to raise_error(TaskerCore::WorkerNotInitializedError)
      end
    end

    describe "create_tasks" do
      it "creates one task per context, in order, each run with its own context" do
        contexts = Array.new(20) { |i| { "plan" => {}, "n" => i } }

        uuids = TaskerCore.create_tasks(namespace: "workflow", name: "quick", contexts: contexts)

        expect(uuids.size).to eq(20)
        expect(uuids).to all(match(UUID_PATTERN))
        expect(uuids.uniq.size).to eq(20)
        uuids.each_with_index do |uuid, i|
          expect(TaskerCore.wait_for_task(uuid, timeout: 10)[:status]).to eq("complete")
          expect(WorkflowRecorder.for_task(uuid).map { |e| e.task.context["n"] }).to eq([i])
        end
      end

      it "answers [] for no contexts" do
        expect(TaskerCore.create_tasks(namespace: "workflow", name: "quick", contexts: [])).to eq([])
      end

      it "creates nothing when one context is bad, and names it" do
        before = TaskerCore::FFI.worker_status[:steps_processed]
        expect { TaskerCore.create_tasks(namespace: "workflow", name: "quick", contexts: [{}, [1], {}]) }
          .to raise_error(TaskerCore::ConfigurationError, "contexts[1]: must be a Hash")
        expect { TaskerCore.create_tasks(namespace: "workflow", name: "quick", contexts: [{ "at" => Object.new }]) }
          .to raise_error(TaskerCore::ConfigurationError, /\Acontexts\[0\]: a Object is not JSON-able/)
        expect { TaskerCore.create_tasks(namespace: "workflow", name: "quick", contexts: { "a" => 1 }) }
          .to raise_error(TaskerCore::ConfigurationError, "contexts: must be an Array of Hashes")
        expect { TaskerCore.create_tasks(namespace: "workflow", name: "nope", contexts: [{}]) }
          .to raise_error(TaskerCore::ConfigurationError, %r{workflow/nope@1\.0\.0})
        sleep 0.05
        expect(TaskerCore::FFI.worker_status).to include(steps_processed: before, steps_in_flight: 0)
      end
    end

    describe "task_status and wait_for_task" do
      it "report the task and every step while it runs" do
        uuid = create_workflow_task("dag", "plan" => { "fetch" => { "sleep" => 0.3 } })
        status = TaskerCore.task_status(uuid)

        expect(status).to include(task_uuid: uuid, namespace: "workflow", name: "dag", version: "1.0.0")
        expect(status[:status]).to eq("pending").or eq("in_progress")
        expect(status[:steps].map { |s| s[:name] }).to eq(DAG_STEPS)
        status[:steps].each do |step|
          expect(step.keys).to include(:name, :status, :attempts, :result, :error_message)
          expect(STEP_STATUSES).to include(step[:status])
          expect(step[:step_uuid]).to match(UUID_PATTERN)
        end
        # `join` needs `left` and `right`, which need `fetch` (still sleeping): it cannot have started.
        expect(step_status(status, "join")).to include(status: "pending", attempts: 0, result: nil, error_message: nil)

        eventually { step_status(TaskerCore.task_status(uuid), "fetch")[:status] == "in_progress" }
        expect(TaskerCore.task_status(uuid)[:status]).to eq("in_progress")
      end

      it "report every step's status, attempts, result and error_message once the task completes" do
        uuid = create_workflow_task("dag")
        final = TaskerCore.wait_for_task(uuid, timeout: 10)

        expect(final).to include(task_uuid: uuid, status: "complete")
        final[:steps].each do |step|
          expected_result = {
            "step" => step[:name], "attempt" => 1, "dependencies" => DAG_DEPENDENCIES[step[:name]].sort
          }
          expect(step).to include(status: "complete", attempts: 1, result: expected_result, error_message: nil)
        end
        expect(TaskerCore.task_status(uuid)).to eq(final)
      end

      it "wait_for_task returns after worker_status counts the task's steps" do
        processed = bootstrap.status[:steps_processed]
        30.times do |i|
          expect(run_task("quick")[:status]).to eq("complete")
          expect(bootstrap.status[:steps_processed]).to eq(processed + i + 1)
        end
      end

      it "wait_for_task returns at once for a finished task" do
        uuid = create_workflow_task("quick")
        TaskerCore.wait_for_task(uuid, timeout: 5)

        started = monotonic
        expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")
        expect(monotonic - started).to be < 0.1
      end

      it "raise TaskNotFoundError (an FFIError) for an unknown task uuid" do
        expect { TaskerCore.task_status(SecureRandom.uuid) }
          .to raise_error(TaskerCore::TaskNotFoundError, /never created/)
        expect { TaskerCore.task_status("not-a-uuid") }.to raise_error(TaskerCore::TaskNotFoundError, /not-a-uuid/)
        expect { TaskerCore.wait_for_task(SecureRandom.uuid, timeout: 1) }.to raise_error(TaskerCore::TaskNotFoundError)
        expect { TaskerCore.wait_for_task(SecureRandom.uuid, timeout: 1) }.to raise_error(TaskerCore::FFIError)
      end

      it "wait_for_task raises Timeout::Error past its timeout, without holding the GVL" do
        uuid = create_workflow_task("quick", "plan" => { "work" => { "sleep" => 1.0 } })
        ticks = 0
        ticker = Thread.new do
          loop do
            ticks += 1
            sleep 0.01
          end
        end

        started = monotonic
        expect { TaskerCore.wait_for_task(uuid, timeout: 0.3) }.to raise_error(Timeout::Error, /#{uuid}/)
        elapsed = monotonic - started
        ticker.kill.join

        expect(elapsed).to be_between(0.29, 0.8)
        # Another Ruby thread kept running while the wait was in Rust.
        expect(ticks).to be >= 5
        expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")
      end
    end

    describe "DAG execution" do
      it "runs a step only after all its dependencies completed, passing their results by step name" do
        uuids = Array.new(5) { create_workflow_task("dag") }
        uuids.each do |uuid|
          expect(TaskerCore.wait_for_task(uuid, timeout: 10)[:status]).to eq("complete")
          runs = WorkflowRecorder.for_task(uuid).to_h { |e| [e.name, e] }
          expect(runs.keys).to match_array(DAG_STEPS)

          DAG_DEPENDENCIES.each do |name, dependencies|
            run = runs.fetch(name)
            dependencies.each do |dependency|
              expect(run.started_at).to be >= runs.fetch(dependency).finished_at,
                                        "#{name} started before its dependency #{dependency} finished"
            end
            results = run.sequence.dependency_results
            expect(results.keys).to match_array(dependencies)
            dependencies.each do |dependency|
              expect(results.fetch(dependency)).to eq(
                "step" => dependency, "attempt" => 1, "dependencies" => DAG_DEPENDENCIES[dependency].sort
              )
            end
          end
        end
      end

      it "runs independent steps of one task at the same time" do
        uuid = create_workflow_task("dag", "plan" => { "left" => { "sleep" => 0.2 }, "right" => { "sleep" => 0.2 } })
        TaskerCore.wait_for_task(uuid, timeout: 10)

        runs = WorkflowRecorder.for_task(uuid).to_h { |e| [e.name, e] }
        expect(runs["right"].started_at).to be < runs["left"].finished_at
        expect(runs["left"].started_at).to be < runs["right"].finished_at
      end

      it "calls the handler with (task, sequence, step) and the step's initialization as config" do
        context = { "order" => { "id" => 7, "items" => %w[a b] }, "flag" => true }
        uuid = create_workflow_task("dag", context)
        TaskerCore.wait_for_task(uuid, timeout: 10)
        run = WorkflowRecorder.for_task(uuid).find { |e| e.name == "fetch" }

        expect(run.task).to be_a(TaskerCore::Models::TaskWrapper)
        expect(run.task).to have_attributes(task_uuid: uuid, namespace: "workflow", name: "dag", version: "1.0.0")
        expect(run.task.context).to eq(context)

        expect(run.sequence).to be_a(TaskerCore::Models::TaskSequenceStepWrapper)
        expect(run.sequence.task.task_uuid).to eq(uuid)
        expect(run.sequence.workflow_step.step_uuid).to eq(run.step.step_uuid)
        expect(run.sequence.dependency_results).to eq({})

        expect(run.step).to be_a(TaskerCore::Models::WorkflowStepWrapper)
        expect(run.step).to have_attributes(name: "fetch", attempts: 1, max_attempts: 3, retryable: true)
        expect(run.step.step_uuid).to eq(step_status(TaskerCore.task_status(uuid), "fetch")[:step_uuid])

        initialization = { "greeting" => "hello", "limits" => { "max" => 3 }, "sleep" => 0.02 }
        expect(run.config).to eq(initialization)
        definition = run.sequence.step_definition
        expect(definition.name).to eq("fetch")
        expect(definition.handler).to eq(callable: "WorkflowHandlers::Scripted", initialization: initialization)
        expect(definition.dependencies).to eq([])
        expect(definition.timeout_seconds).to eq(30.0)
        expect(definition.retry).to include(retryable: true, max_attempts: 3, backoff: "exponential")

        join = WorkflowRecorder.for_task(uuid).find { |e| e.name == "join" }
        expect(join.config).to eq({})
        expect(join.sequence.step_definition.dependencies).to eq(%w[left right])
      end
    end
  end
end
