# frozen_string_literal: true

require "tmpdir"
require "fileutils"

module WorkflowTemplatesSpec
  VALID = <<~YAML
    namespace: shop
    name: order
    version: 1.0.0
    steps:
      - name: pack
        handler: { callable: WorkflowHandlers::Scripted }
      - name: ship
        dependencies: [pack]
        handler: { callable: WorkflowHandlers::Scripted }
  YAML

  # name => [YAML, the words the error message must contain besides the file]
  INVALID = {
    "a dependency cycle" => [<<~YAML, ["dependency cycle", "pack", "ship", "bill"]],
      namespace: shop
      name: cyclic
      version: 1.0.0
      steps:
        - name: start
          handler: { callable: WorkflowHandlers::Scripted }
        - name: pack
          dependencies: [start, bill]
          handler: { callable: WorkflowHandlers::Scripted }
        - name: ship
          dependencies: [pack]
          handler: { callable: WorkflowHandlers::Scripted }
        - name: bill
          dependencies: [ship]
          handler: { callable: WorkflowHandlers::Scripted }
    YAML
    "a step depending on itself" => [<<~YAML, %w[pack itself]],
      namespace: shop
      name: selfish
      version: 1.0.0
      steps:
        - name: pack
          dependencies: [pack]
          handler: { callable: WorkflowHandlers::Scripted }
    YAML
    "an unknown dependency" => [<<~YAML, ["ship", "unknown dependency", "packk"]],
      namespace: shop
      name: typo
      version: 1.0.0
      steps:
        - name: pack
          handler: { callable: WorkflowHandlers::Scripted }
        - name: ship
          dependencies: [packk]
          handler: { callable: WorkflowHandlers::Scripted }
    YAML
    "a duplicate step name" => [<<~YAML, %w[duplicate pack]],
      namespace: shop
      name: twice
      version: 1.0.0
      steps:
        - name: pack
          handler: { callable: WorkflowHandlers::Scripted }
        - name: pack
          handler: { callable: WorkflowHandlers::Scripted }
    YAML
    "a handler without callable" => [<<~YAML, ["ship", "handler.callable", "missing"]],
      namespace: shop
      name: no_callable
      version: 1.0.0
      steps:
        - name: pack
          handler: { callable: WorkflowHandlers::Scripted }
        - name: ship
          handler: { initialization: { fast: true } }
    YAML
    "a callable that is not a class name" => [<<~YAML, ["ship", "handler.callable", "not a Ruby class name"]],
      namespace: shop
      name: bad_callable
      version: 1.0.0
      steps:
        - name: ship
          handler: { callable: "ship it!" }
    YAML
    "a step without handler" => [<<~YAML, %w[ship handler]],
      namespace: shop
      name: no_handler
      version: 1.0.0
      steps:
        - name: pack
          handler: { callable: WorkflowHandlers::Scripted }
        - name: ship
          dependencies: [pack]
    YAML
    "retry.max_attempts 0" => [<<~YAML, ["pack", "retry.max_attempts", "0"]],
      namespace: shop
      name: zero_attempts
      version: 1.0.0
      steps:
        - name: pack
          handler: { callable: WorkflowHandlers::Scripted }
          retry: { max_attempts: 0 }
    YAML
    "retry.max_attempts not a number" => [<<~YAML, %w[pack max_attempts three]],
      namespace: shop
      name: word_attempts
      version: 1.0.0
      steps:
        - name: pack
          handler: { callable: WorkflowHandlers::Scripted }
          retry: { max_attempts: three }
    YAML
    "an unknown retry.backoff" => [<<~YAML, ["pack", "retry.backoff", "sometimes"]],
      namespace: shop
      name: bad_backoff
      version: 1.0.0
      steps:
        - name: pack
          handler: { callable: WorkflowHandlers::Scripted }
          retry: { backoff: sometimes }
    YAML
    "a negative retry.backoff_base_ms" => [<<~YAML, ["pack", "retry.backoff_base_ms", "-5"]],
      namespace: shop
      name: negative_base
      version: 1.0.0
      steps:
        - name: pack
          handler: { callable: WorkflowHandlers::Scripted }
          retry: { backoff_base_ms: -5 }
    YAML
    "retry.max_backoff_ms below backoff_base_ms" => [<<~YAML, %w[pack max_backoff_ms backoff_base_ms]],
      namespace: shop
      name: inverted_backoff
      version: 1.0.0
      steps:
        - name: pack
          handler: { callable: WorkflowHandlers::Scripted }
          retry: { backoff_base_ms: 500, max_backoff_ms: 100 }
    YAML
    "a zero timeout_seconds" => [<<~YAML, %w[pack timeout_seconds]],
      namespace: shop
      name: no_time
      version: 1.0.0
      steps:
        - name: pack
          handler: { callable: WorkflowHandlers::Scripted }
          timeout_seconds: 0
    YAML
    "an unknown step field" => [<<~YAML, ["ship", "unknown field", "retries"]],
      namespace: shop
      name: unknown_step_field
      version: 1.0.0
      steps:
        - name: pack
          handler: { callable: WorkflowHandlers::Scripted }
        - name: ship
          dependencies: [pack]
          retries: 3
          handler: { callable: WorkflowHandlers::Scripted }
    YAML
    "an unknown retry field" => [<<~YAML, ["ship", "unknown field", "backof"]],
      namespace: shop
      name: unknown_retry_field
      version: 1.0.0
      steps:
        - name: pack
          handler: { callable: WorkflowHandlers::Scripted }
        - name: ship
          handler: { callable: WorkflowHandlers::Scripted }
          retry: { max_attempts: 2, backof: linear }
    YAML
    "an unknown template field" => [<<~YAML, ["unknown field", "descripton"]],
      namespace: shop
      name: unknown_field
      version: 1.0.0
      descripton: typo
      steps:
        - name: pack
          handler: { callable: WorkflowHandlers::Scripted }
    YAML
    "no steps" => [<<~YAML, ["steps"]],
      namespace: shop
      name: empty
      version: 1.0.0
      steps: []
    YAML
    "an empty step namespace" => [<<~YAML, ["pack", "`namespace` must not be empty"]],
      namespace: shop
      name: blank_step_namespace
      version: 1.0.0
      steps:
        - name: pack
          namespace: ""
          handler: { callable: WorkflowHandlers::Scripted }
    YAML
    "malformed YAML" => [<<~YAML, ["line 7"]]
      namespace: shop
      name: broken
      version: 1.0.0
      steps:
        - name: pack
          handler: { callable: WorkflowHandlers::Scripted
    YAML
  }.freeze

  RSpec.describe "Task templates at bootstrap" do
    include_context "workflow worker"

    around do |example|
      Dir.mktmpdir("tasker-templates") do |dir|
        @dir = dir
        example.run
      end
    end

    def write_template(relative, yaml)
      path = File.join(@dir, relative)
      FileUtils.mkdir_p(File.dirname(path))
      File.write(path, yaml)
      path
    end

    def expect_no_worker
      expect(TaskerCore::FFI.worker_status).to include(running: false)
      expect(bootstrap.running?).to be(false)
    end

    INVALID.each do |problem, (yaml, words)|
      context "with #{problem}" do
        it "Bootstrap.start! raises ConfigurationError naming the file, the step and the problem" do
          write_template("valid.yml", VALID)
          path = write_template("broken.yml", yaml)

          expect { bootstrap.start!(templates: @dir) }.to raise_error(TaskerCore::ConfigurationError) { |error|
            expect(error.message).to include(path)
            words.each { |word| expect(error.message).to include(word) }
          }
          expect_no_worker
        end

        it "FFI.bootstrap_worker raises the same ConfigurationError for the file alone" do
          path = write_template("broken.yml", yaml)

          expect { TaskerCore::FFI.bootstrap_worker(templates: [path]) }
            .to raise_error(TaskerCore::ConfigurationError) { |error|
              expect(error.message).to include(path)
              words.each { |word| expect(error.message).to include(word) }
            }
          expect_no_worker
        end
      end
    end

    it "names the cycle's steps in dependency order" do
      path = write_template("cyclic.yml", INVALID.fetch("a dependency cycle").first)

      # Any rotation of the cycle, each step followed by the one that depends on it.
      rotations = ["pack -> ship -> bill -> pack", "ship -> bill -> pack -> ship", "bill -> pack -> ship -> bill"]
      expect { bootstrap.start!(templates: path) }
        .to raise_error(TaskerCore::ConfigurationError, /dependency cycle: (#{rotations.join("|")})\z/)
    end

    context "with a step in a namespace of its own (a polyglot workflow)" do
      let(:polyglot) do
        <<~YAML
          namespace: shop
          name: scored
          version: 1.0.0
          steps:
            - name: pack
              handler: { callable: WorkflowHandlers::Scripted }
            - name: score
              namespace: shop_py
              dependencies: [pack]
              handler: { callable: shop.scoring.Score }
        YAML
      end

      it "a Ruby worker without namespaces: refuses to start, naming the step it could not run" do
        path = write_template("scored.yml", polyglot)

        expect { bootstrap.start!(templates: path) }.to raise_error(TaskerCore::ConfigurationError) { |error|
          expect(error.message).to include(path, "step `score`", '"shop.scoring.Score"', "not a Ruby class name")
        }
        expect_no_worker
      end

      it "on the memory backend, refuses namespaces that leave a step of its tasks to nobody" do
        write_template("scored.yml", polyglot)

        expect { bootstrap.start!(templates: @dir, namespaces: ["shop"]) }
          .to raise_error(TaskerCore::ConfigurationError) { |error|
            expect(error.message).to include("step `score`", "shop/scored@1.0.0", '"shop_py"', "memory backend")
          }
        expect_no_worker
      end

      it "runs a Ruby step of another namespace in the same process when the worker runs both" do
        write_template("split.yml", <<~YAML)
          namespace: shop
          name: split
          version: 1.0.0
          steps:
            - name: pack
              handler: { callable: WorkflowHandlers::Scripted }
            - name: ship
              namespace: shop_shipping
              dependencies: [pack]
              handler: { callable: WorkflowHandlers::Scripted }
        YAML
        bootstrap.start!(templates: @dir, namespaces: %w[shop shop_shipping])
        uuid = TaskerCore.create_task(namespace: "shop", name: "split", version: "1.0.0", context: {})
        final = TaskerCore.wait_for_task(uuid, timeout: 10)

        expect(final[:status]).to eq("complete")
        expect(final[:steps].map { |s| [s[:name], s[:status]] }).to eq([%w[pack complete], %w[ship complete]])
      end
    end

    it "raises ConfigurationError for a templates path that does not exist" do
      missing = File.join(@dir, "nowhere")

      expect { bootstrap.start!(templates: missing) }.to raise_error(TaskerCore::ConfigurationError, /nowhere/)
      expect_no_worker
    end

    it "rejects the same template defined in two files, naming both" do
      first = write_template("a.yml", VALID)
      second = write_template("b.yml", VALID)

      expect { bootstrap.start!(templates: @dir) }.to raise_error(TaskerCore::ConfigurationError) { |error|
        expect(error.message).to include(first, second, "shop/order@1.0.0")
      }
    end

    it "starts normally after a failed bootstrap" do
      write_template("broken.yml", INVALID.fetch("an unknown dependency").first)
      expect { bootstrap.start!(templates: @dir) }.to raise_error(TaskerCore::ConfigurationError)

      bootstrap.start!
      expect(bootstrap.running?).to be(true)
      expect(TaskerCore.wait_for_task(create_test_task, timeout: 5)[:status]).to eq("complete")
    end

    it "loads every *.yml and *.yaml of a directory, recursively" do
      write_template("order.yml", VALID)
      write_template("nested/deeper/refund.yaml", VALID.sub("name: order", "name: refund"))
      write_template("other/billing.yml", VALID.sub("namespace: shop", "namespace: billing"))
      write_template("notes.txt", "not: [a template")

      bootstrap.start!(templates: @dir)

      expect(bootstrap.status[:supported_namespaces]).to match_array(%w[billing shop])
      %w[order refund].each do |name|
        uuid = TaskerCore.create_task(namespace: "shop", name: name)
        expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")
      end
      uuid = TaskerCore.create_task(namespace: "billing", name: "order")
      expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")
    end

    it "loads a list of files, and only those" do
      order = write_template("order.yml", VALID)
      refund = write_template("refund.yml", VALID.sub("name: order", "name: refund"))
      write_template("ignored.yml", VALID.sub("name: order", "name: ignored"))

      bootstrap.start!(templates: [order, refund])

      %w[order refund].each do |name|
        uuid = TaskerCore.create_task(namespace: "shop", name: name)
        expect(TaskerCore.wait_for_task(uuid, timeout: 5)[:status]).to eq("complete")
      end
      expect { TaskerCore.create_task(namespace: "shop", name: "ignored") }
        .to raise_error(TaskerCore::ConfigurationError, %r{shop/ignored@1\.0\.0})
    end

    it "accepts a list mixing directories and files" do
      order = write_template("one/order.yml", VALID)
      write_template("two/refund.yml", VALID.sub("name: order", "name: refund"))

      bootstrap.start!(templates: [order, File.join(@dir, "two")])

      %w[order refund].each do |name|
        expect(TaskerCore.wait_for_task(TaskerCore.create_task(namespace: "shop", name: name), timeout: 5)[:status])
          .to eq("complete")
      end
    end

    it "reads TASKER_TEMPLATE_PATH when templates: is not given" do
      bootstrap.start!

      expect(bootstrap.status[:supported_namespaces]).to include("test")
      expect(bootstrap.status[:supported_namespaces]).not_to include("workflow", "shop")
      expect { TaskerCore.create_task(namespace: "workflow", name: "dag") }
        .to raise_error(TaskerCore::ConfigurationError)
    end
  end
end
