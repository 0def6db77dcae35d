# frozen_string_literal: true

require "spec_helper"
require "tasker_core/rspec"

RSpec.describe "tasker_core/rspec" do
  let(:testing) { TaskerCore::Testing }
  let(:not_met) { RSpec::Expectations::ExpectationNotMetError }

  def create_linear(value)
    TaskerCore.create_task(namespace: "test", name: "linear", context: { value: value })
  end

  it "turns inline! on for an example tagged :tasker_inline", :tasker_inline do
    expect(testing.mode).to eq(:inline)
    expect(TaskerCore.task_status(create_linear(1))[:status]).to eq("complete")
  end

  it "turns fake! on for an example tagged :tasker_fake", :tasker_fake do
    expect(testing.mode).to eq(:fake)
    expect(TaskerCore.task_status(create_linear(1))[:status]).to eq("pending")
  end

  it "leaves the engine in charge of untagged examples, with no task recorded from before" do
    expect(testing.mode).to eq(:disabled)
    expect(testing.tasks).to be_empty
  end

  describe "have_created_task", :tasker_fake do
    it "matches a task created in the block, with the context as stored (Symbol keys allowed)" do
      expect { create_linear(3) }.to have_created_task(namespace: "test", name: "linear")
      expect { create_linear(3) }.to have_created_task(namespace: "test", name: "linear").with_context(value: 3)
      expect { create_linear(3) }
        .to have_created_task(namespace: "test", name: "linear", version: "1.0.0").with_context("value" => 3)
      expect { create_linear(3) }
        .to have_created_task(namespace: "test", name: "linear").with_context(a_hash_including("value" => 3))
    end

    it "fails for another template or context, listing what was created" do
      expect { expect { create_linear(3) }.to have_created_task(namespace: "test", name: "diamond") }
        .to raise_error(not_met, %r{have created task test/diamond, but created:\n  test/linear@1.0.0 context=})
      expect do
        expect { create_linear(3) }.to have_created_task(namespace: "test", name: "linear").with_context(value: 4)
      end.to raise_error(not_met, /with context \{"value"=>4\}, but created:.*"value"=>3/m)
      expect { expect { nil }.to have_created_task(namespace: "test", name: "linear") }
        .to raise_error(not_met, /but no task was created/)
    end

    it "only counts tasks created inside the block" do
      create_linear(3)

      expect { nil }.not_to have_created_task(namespace: "test", name: "linear")
      expect(testing).to have_created_task(namespace: "test", name: "linear").with_context(value: 3)
      expect(testing.tasks).to have_created_task(namespace: "test", name: "linear")
    end
  end

  describe "complete_with on a task status", :tasker_inline do
    it "matches a complete task whose named steps have these results" do
      status = TaskerCore.task_status(create_linear(1))

      expect(status).to complete_with("third" => { "value" => 4 })
      expect(status).to complete_with(first: { value: 2 }, second: { value: a_value > 2 })
      expect { expect(status).to complete_with("third" => { "value" => 5 }) }
        .to raise_error(not_met, /to complete with .* but it is complete:\n  first: complete \(attempts 1\)/)
    end

    it "fails for a task that did not complete, showing each step" do
      dir = template_dir("broken.yml" => <<~YAML)
        namespace: testmode
        name: broken
        version: 1.0.0
        steps:
          - { name: only, handler: { callable: TestModeHandlers::Absent } }
      YAML
      testing.config = { templates: dir, validate_handlers: false }
      status = TaskerCore.task_status(TaskerCore.create_task(namespace: "testmode", name: "broken"))

      expect { expect(status).to complete_with({}) }
        .to raise_error(not_met, /but it is error:\n  only: error \(attempts 1\) error: NameError: handler class/)
    ensure
      testing.config = {}
    end
  end
end
