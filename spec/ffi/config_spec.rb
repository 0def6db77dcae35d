# frozen_string_literal: true

require "tmpdir"

RSpec.describe "TaskerCore::FFI.bootstrap_worker configuration" do
  let(:ffi) { TaskerCore::FFI }

  # Native threads the engine owns (named by the engine crate), read from /proc.
  def engine_thread_count
    Dir.children("/proc/self/task").count do |tid|
      File.read("/proc/self/task/#{tid}/comm").strip == "tasker-engine"
    rescue Errno::ENOENT
      false
    end
  end

  # The error leaves nothing behind, and the next valid bootstrap works.
  def expect_nothing_started
    expect(ffi.worker_status).to eq(running: false, state: "stopped")
    expect(eventually { engine_thread_count.zero? }).to be(true)
    result = ffi.bootstrap_worker({})
    expect(result).to include(success: true, status: "running")
    expect(ffi.worker_status[:state]).to eq("running")
    expect(ffi.stop_worker).to be(true)
  end

  around do |example|
    Dir.mktmpdir("tasker-config") do |dir|
      @dir = dir
      example.run
    end
  end

  def template_file(name, yaml)
    File.join(@dir, name).tap { |path| File.write(path, yaml) }
  end

  describe "bad values name the key" do
    {
      { log_level: "loud" } => /log_level.*"loud"/,
      { concurrency: 0 } => /concurrency.*0/,
      { concurrency: -2 } => /concurrency/,
      { concurrency: "4" } => /concurrency.*integer/,
      { concurrency: 2.5 } => /concurrency/,
      { backend: "redis" } => /backend.*"redis"/,
      { deployment_mode: "Sometimes" } => /deployment_mode.*"Sometimes"/,
      { worker_id: "" } => /worker_id/,
      { namespaces: 5 } => /namespaces/,
      { namespaces: ["nowhere"] } => /namespaces.*nowhere/,
      { enable_web_api: "yes" } => /enable_web_api/,
      { environment: 3 } => /environment/
    }.each do |config, message|
      it "rejects #{config.inspect}" do
        expect { ffi.bootstrap_worker(config) }.to raise_error(TaskerCore::ConfigurationError, message)
        expect_nothing_started
      end
    end

    it "rejects backend: \"postgres\" with no database_url and no DATABASE_URL" do
      saved = ENV.delete("DATABASE_URL")
      expect { ffi.bootstrap_worker(backend: "postgres") }
        .to raise_error(TaskerCore::ConfigurationError, /database_url: required/)
      expect_nothing_started
    ensure
      ENV["DATABASE_URL"] = saved if saved
    end

    it "rejects an unknown key, naming it" do
      expect { ffi.bootstrap_worker(colour: "blue") }
        .to raise_error(TaskerCore::ConfigurationError, /unknown config key `colour`/)
      expect_nothing_started
    end

    it "rejects a config that is not a Hash" do
      expect { ffi.bootstrap_worker("concurrency=4") }.to raise_error(TaskerCore::ConfigurationError, /Hash/)
      expect_nothing_started
    end

    it "rejects a value that is not JSON-able, naming the problem" do
      expect { ffi.bootstrap_worker(worker_id: Object.new) }.to raise_error(TaskerCore::ConfigurationError, /Object/)
      expect_nothing_started
    end
  end

  describe "string keys" do
    it "may not repeat a Symbol key: the config error names it" do
      expect { ffi.bootstrap_worker(:concurrency => 2, "concurrency" => 8) }
        .to raise_error(TaskerCore::ConfigurationError, /concurrency: given twice/)
      expect(ffi.worker_status[:running]).to be(false)
    end

    it "work like symbol keys" do
      result = ffi.bootstrap_worker("worker_id" => "string-keys", "concurrency" => 2, "log_level" => "error")

      expect(result).to include(success: true, worker_id: "string-keys", concurrency: 2)
      expect(ffi.worker_status).to include(worker_id: "string-keys", environment: "test")
    end

    it "are validated like symbol keys" do
      expect { ffi.bootstrap_worker("concurrency" => 0) }
        .to raise_error(TaskerCore::ConfigurationError, /concurrency/)
      expect { ffi.bootstrap_worker("colour" => "blue") }
        .to raise_error(TaskerCore::ConfigurationError, /colour/)
      expect_nothing_started
    end

    it "may be mixed with symbol keys" do
      result = ffi.bootstrap_worker("worker_id" => "mixed", concurrency: 3)

      expect(result).to include(worker_id: "mixed", concurrency: 3)
    end
  end

  describe "accepted values" do
    it "takes every documented key" do
      result = ffi.bootstrap_worker(
        worker_id: "all-keys", namespaces: ["test"], backend: "memory", deployment_mode: "Hybrid",
        concurrency: 2, templates: File.join(FIXTURES, "templates"), log_level: "error",
        enable_web_api: false, event_driven_enabled: true, environment: "staging"
      )

      expect(result).to include(success: true, worker_id: "all-keys")
      expect(ffi.worker_status).to include(
        environment: "staging", backend: "memory", deployment_mode: "Hybrid",
        supported_namespaces: ["test"], web_api_enabled: false
      )
    end

    it "takes no argument at all, or nil, as the defaults" do
      expect(ffi.bootstrap_worker[:status]).to eq("running")
      ffi.stop_worker
      expect(ffi.bootstrap_worker(nil)[:status]).to eq("running")
    end

    it "takes a list of template files" do
      file = template_file("one.yml", <<~YAML)
        namespace: listed
        name: one
        version: 1.0.0
        steps:
          - { name: only, handler: { callable: TestHandlers::Noop } }
      YAML
      ffi.bootstrap_worker(templates: [file, File.join(FIXTURES, "templates", "linear.yml")])

      expect(ffi.worker_status[:supported_namespaces]).to contain_exactly("listed", "test")
    end
  end

  describe "templates" do
    it "rejects a directory that does not exist, naming it" do
      missing = File.join(@dir, "no-such-dir")
      expect { ffi.bootstrap_worker(templates: missing) }
        .to raise_error(TaskerCore::ConfigurationError, /templates.*#{Regexp.escape(missing)}/)
      expect_nothing_started
    end

    it "rejects a missing file in a list, naming it" do
      missing = File.join(@dir, "missing.yml")
      expect { ffi.bootstrap_worker(templates: [File.join(FIXTURES, "templates", "linear.yml"), missing]) }
        .to raise_error(TaskerCore::ConfigurationError, /#{Regexp.escape(missing)}/)
      expect_nothing_started
    end

    {
      "a dependency cycle" => [<<~YAML, /cycle/],
        namespace: bad
        name: cyclic
        version: 1.0.0
        steps:
          - { name: a, dependencies: [c], handler: { callable: TestHandlers::Noop } }
          - { name: b, dependencies: [a], handler: { callable: TestHandlers::Noop } }
          - { name: c, dependencies: [b], handler: { callable: TestHandlers::Noop } }
      YAML
      "an unknown dependency" => [<<~YAML, /unknown dependency `ghost`/],
        namespace: bad
        name: dangling
        version: 1.0.0
        steps:
          - { name: a, dependencies: [ghost], handler: { callable: TestHandlers::Noop } }
      YAML
      "a duplicate step name" => [<<~YAML, /duplicate step name `a`/],
        namespace: bad
        name: twice
        version: 1.0.0
        steps:
          - { name: a, handler: { callable: TestHandlers::Noop } }
          - { name: a, handler: { callable: TestHandlers::Noop } }
      YAML
      "YAML that does not parse" => ["namespace: [unclosed\n", /./]
    }.each do |problem, (yaml, message)|
      it "rejects a template with #{problem}, naming the file and the problem" do
        path = template_file("broken.yml", yaml)
        template_file("fine.yml", File.read(File.join(FIXTURES, "templates", "linear.yml")))

        expect { ffi.bootstrap_worker(templates: @dir) }.to raise_error(TaskerCore::ConfigurationError) { |error|
          expect(error.message).to include(path).or include("broken.yml")
          expect(error.message).to match(message)
        }
        expect_nothing_started
      end
    end
  end

  it "can fail many times in a row and still bootstrap" do
    bad = [{ log_level: "loud" }, { colour: 1 }, { templates: File.join(@dir, "nope") }, { concurrency: 0 }]
    3.times do
      bad.each do |config|
        expect { ffi.bootstrap_worker(config) }.to raise_error(TaskerCore::ConfigurationError)
      end
    end
    expect_nothing_started
  end
end
