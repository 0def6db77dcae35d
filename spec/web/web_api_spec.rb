# frozen_string_literal: true

require "spec_helper"
require "json"
require "net/http"
require "socket"
require "English"

RSpec.describe "Web API (enable_web_api)" do
  def start_web_worker(**config)
    TaskerCore::Worker::Bootstrap.start!(
      { templates: [WEB_TEMPLATES], enable_web_api: true, web_api_bind: "127.0.0.1:0" }.merge(config)
    )
    TaskerCore::FFI.worker_status.fetch(:web_api_bind)
  end

  def http_get(address, path, headers = {})
    host, port = address.split(":")
    Net::HTTP.start(host, Integer(port), open_timeout: 5, read_timeout: 5) do |http|
      http.request(Net::HTTP::Get.new(path, headers))
    end
  end

  def json(response)
    JSON.parse(response.body)
  end

  def scrape(address)
    response = http_get(address, "/metrics")
    expect(response.code).to eq("200")
    expect(response["content-type"]).to start_with("application/openmetrics-text")
    OpenMetricsParser.parse(response.body)
  end

  def refused?(address)
    host, port = address.split(":")
    TCPSocket.new(host, Integer(port)).close
    false
  rescue Errno::ECONNREFUSED
    true
  end

  it "is off unless enabled" do
    TaskerCore::Worker::Bootstrap.start!(templates: [WEB_TEMPLATES])
    status = TaskerCore::FFI.worker_status
    expect(status[:web_api_enabled]).to be(false)
    expect(status).not_to have_key(:web_api_bind)
  end

  it "answers /health, /ready and /status, and unknown routes with a 404 JSON error" do
    address = start_web_worker
    expect(address).to match(/\A127\.0\.0\.1:\d+\z/)

    health = http_get(address, "/health")
    expect([health.code, json(health)]).to eq(["200", { "status" => "ok", "state" => "running" }])
    ready = http_get(address, "/ready")
    expect([ready.code, json(ready)]).to eq(["200", { "ready" => true, "state" => "running" }])

    status = json(http_get(address, "/status"))
    ruby_status = TaskerCore::FFI.worker_status
    expect(status).to include("running" => true, "state" => "running", "worker_id" => ruby_status[:worker_id],
                              "backend" => "memory", "web_api_enabled" => true, "web_api_bind" => address,
                              "supported_namespaces" => ["web"])

    missing = http_get(address, "/nope")
    expect(missing.code).to eq("404")
    expect(missing["content-type"]).to eq("application/json")
    expect(json(missing)["error"]).to include("/nope")
    host, port = address.split(":")
    posted = Net::HTTP.new(host, Integer(port)).post("/health", "")
    expect(posted.code).to eq("405")
    expect(json(posted)["error"]).to include("POST")
  end

  it "says not ready while draining, and stays alive" do
    address = start_web_worker
    TaskerCore::FFI.transition_to_graceful_shutdown
    ready = http_get(address, "/ready")
    expect(ready.code).to eq("503")
    expect(json(ready)).to include("ready" => false, "state" => "shutting_down")
    expect(json(ready)["reason"]).to include("shutting_down")
    expect(http_get(address, "/health").code).to eq("200")
    expect(scrape(address).then { |m| OpenMetricsParser.value(m, "tasker_worker_running") }).to eq(0)
  end

  it "wants the bearer token on every route when web_api_token is set" do
    address = start_web_worker(web_api_token: "s3cret-token")
    %w[/health /ready /status /metrics /nope].each do |path|
      bare = http_get(address, path)
      expect(bare.code).to eq("401"), path
      expect(bare["www-authenticate"]).to eq("Bearer")
      expect(json(bare)["error"]).to include("bearer token")
      expect(http_get(address, path, "Authorization" => "Bearer wrong-token").code).to eq("401")
    end
    authorized = { "Authorization" => "Bearer s3cret-token" }
    expect(http_get(address, "/health", authorized).code).to eq("200")
    expect(http_get(address, "/metrics", authorized).code).to eq("200")
    expect(http_get(address, "/nope", authorized).code).to eq("404")
  end

  it "refuses to listen beyond loopback without a token, and a bind without the switch" do
    web = { templates: [WEB_TEMPLATES], enable_web_api: true }
    expect { TaskerCore::FFI.bootstrap_worker(web.merge(web_api_bind: "0.0.0.0:0")) }
      .to raise_error(TaskerCore::ConfigurationError, /\Aweb_api_bind: 0\.0\.0\.0:0 .*web_api_token/)
    expect { TaskerCore::FFI.bootstrap_worker(templates: [WEB_TEMPLATES], web_api_bind: "127.0.0.1:0") }
      .to raise_error(TaskerCore::ConfigurationError, /\Aweb_api_bind is set but enable_web_api is not true/)
    expect { TaskerCore::FFI.bootstrap_worker(web.merge(web_api_bind: "nowhere")) }
      .to raise_error(TaskerCore::ConfigurationError, /\Aweb_api_bind: invalid value "nowhere"/)
    expect(TaskerCore::FFI.worker_status[:running]).to be(false)

    # With a token, any address will do.
    address = start_web_worker(web_api_bind: "0.0.0.0:0", web_api_token: "s3cret-token")
    port = address.split(":").last
    expect(http_get("127.0.0.1:#{port}", "/health", "Authorization" => "Bearer s3cret-token").code).to eq("200")
  end

  it "fails start! with WorkerBootstrapError naming a port in use, and starts nothing" do
    taken = TCPServer.new("127.0.0.1", 0)
    port = taken.addr[1]
    expect { start_web_worker(web_api_bind: "127.0.0.1:#{port}") }
      .to raise_error(TaskerCore::WorkerBootstrapError, /web_api_bind: cannot listen on 127\.0\.0\.1:#{port}: .*in use/)
    expect(TaskerCore::FFI.worker_status[:running]).to be(false)
  ensure
    taken&.close
  end

  it "closes its socket when the worker stops, and listens on the same port again after a restart" do
    address = start_web_worker
    expect(refused?(address)).to be(false)
    TaskerCore::Worker::Bootstrap.instance.shutdown!
    expect(refused?(address)).to be(true)

    start_web_worker(web_api_bind: address)
    expect(http_get(address, "/health").code).to eq("200")
    TaskerCore::FFI.stop_worker
    expect(refused?(address)).to be(true)
  end

  describe "/metrics" do
    it "counts what ran, by namespace, template and step" do
      address = start_web_worker(concurrency: 3)
      contexts = Array.new(5) { {} } + Array.new(3) { { "flaky" => true } } + Array.new(2) { { "fail" => true } }
      uuids = contexts.map { |c| TaskerCore.create_task(namespace: "web", name: "checkout", context: c) }
      finals = uuids.map { |uuid| TaskerCore.wait_for_task(uuid, timeout: 10)[:status] }
      expect(finals.tally).to eq("complete" => 8, "error" => 2)

      metrics = scrape(address)
      charge = { "namespace" => "web", "template" => "checkout", "step" => "charge" }
      ship = charge.merge("step" => "ship")
      value = ->(name, labels = {}) { OpenMetricsParser.value(metrics, name, labels) }

      # 10 first attempts + 3 retries of the flaky ones.
      expect(value.call("tasker_steps_started_total", charge)).to eq(13)
      expect(value.call("tasker_steps_retried_total", charge)).to eq(3)
      expect(value.call("tasker_steps_succeeded_total", charge)).to eq(8)
      expect(value.call("tasker_steps_failed_total", charge)).to eq(5)
      expect(value.call("tasker_steps_timed_out_total", charge)).to eq(0)
      expect(value.call("tasker_steps_started_total", ship)).to eq(8)
      expect(value.call("tasker_steps_succeeded_total", ship)).to eq(8)
      expect(value.call("tasker_steps_failed_total", ship)).to eq(0)
      expect(value.call("tasker_step_duration_seconds_count", charge)).to eq(13)
      expect(value.call("tasker_step_dispatch_latency_seconds_count", ship)).to eq(8)
      expect(value.call("tasker_step_duration_seconds_sum", charge)).to be > 0

      expect(value.call("tasker_tasks", "namespace" => "web", "status" => "complete")).to eq(8)
      expect(value.call("tasker_tasks", "namespace" => "web", "status" => "error")).to eq(2)
      expect(value.call("tasker_steps_ready", "namespace" => "web")).to eq(0)
      expect(value.call("tasker_steps_in_flight")).to eq(0)
      expect(value.call("tasker_handler_threads", "state" => "busy")).to eq(0)
      expect(value.call("tasker_handler_threads", "state" => "idle")).to eq(3)
      expect(value.call("tasker_worker_running")).to eq(1)
      expect(value.call("tasker_backend_claim_duration_seconds_count")).to be >= 1

      expect(metrics.fetch("tasker_steps_started").type).to eq("counter")
      expect(metrics.fetch("tasker_step_duration_seconds")).to have_attributes(type: "histogram", unit: "seconds")
      expect(metrics.fetch("tasker_tasks").type).to eq("gauge")
      # worker_status agrees: 13 + 8 attempts ended, 5 of them failures.
      expect(TaskerCore::FFI.worker_status).to include(steps_processed: 21, steps_failed: 5)
    end

    it "rejects a malformed exposition (the parser the specs trust is strict)" do
      good = "# TYPE a counter\na_total 1\n# EOF\n"
      expect(OpenMetricsParser.parse(good).fetch("a").samples.first.value).to eq(1)
      ["# TYPE a counter\na 1\n# EOF\n", "# TYPE a counter\na_total 1\n", "a_total 1\n# EOF\n",
       "# TYPE a gauge\na{x=\"1\",x=\"2\"} 1\n# EOF\n", "# TYPE a gauge\na one\n# EOF\n",
       "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 1\n# EOF\n"].each do |bad|
        expect { OpenMetricsParser.parse(bad) }.to raise_error(OpenMetricsParser::ParseError), bad
      end
    end
  end

  # The server runs on Rust threads: a process whose GVL is held for seconds still answers.
  describe "while Ruby is busy" do
    # A worker process whose one handler spins (holding the GVL, or in Ruby) for context["seconds"].
    def busy_child_source
      <<~RUBY
        require "tasker_core"
        $stdout.sync = true
        module WebSpecHandlers
          class Charge < TaskerCore::StepHandler::Base; def call(*) = {}; end
          class Ship < TaskerCore::StepHandler::Base; def call(*) = {}; end
          class Spin < TaskerCore::StepHandler::Base
            def call(task, _sequence, _step)
              seconds = task.context.fetch("seconds")
              puts "SPINNING"
              if task.context["hold_gvl"]
                TaskerCore::FFI.__hold_gvl(seconds)
              else
                deadline = Process.clock_gettime(Process::CLOCK_MONOTONIC) + seconds
                loop { break if Process.clock_gettime(Process::CLOCK_MONOTONIC) > deadline }
              end
              puts "SPUN"
              {}
            end
          end
        end
        TaskerCore::Worker::Bootstrap.start!(templates: [ARGV[0]], enable_web_api: true, web_api_bind: "127.0.0.1:0",
                                             concurrency: 2)
        puts "ADDRESS \#{TaskerCore::FFI.worker_status[:web_api_bind]}"
        uuid = TaskerCore.create_task(namespace: "web", name: "busy", context: JSON.parse(ARGV[1]))
        TaskerCore.wait_for_task(uuid, timeout: 30)
        puts "DONE"
        TaskerCore::Worker::Bootstrap.instance.shutdown!
      RUBY
    end

    def run_busy_child(context)
      command = [RbConfig.ruby, "-I", SpecHelpers::LIB, "-rjson", "-e", busy_child_source, WEB_TEMPLATES,
                 JSON.generate(context)]
      IO.popen(command, err: File::NULL) do |child|
        address = child.gets.to_s[/\AADDRESS (.+)$/, 1] or raise "the child did not start its worker"
        expect(child.gets).to eq("SPINNING\n")
        sleep 0.3 # well inside the spin, which has begun by now
        yield address
        expect(child.gets).to eq("SPUN\n")
        expect(child.gets).to eq("DONE\n")
      end
      expect($CHILD_STATUS).to be_success
    end

    def timed
      started = Process.clock_gettime(Process::CLOCK_MONOTONIC)
      result = yield
      [result, Process.clock_gettime(Process::CLOCK_MONOTONIC) - started]
    end

    [["a C call that never releases the GVL", { "hold_gvl" => true }],
     ["a pure-Ruby CPU loop", {}]].each do |what, context|
      it "answers /health and /metrics during #{what}" do
        run_busy_child(context.merge("seconds" => 4)) do |address|
          health, health_took = timed { http_get(address, "/health") }
          metrics, metrics_took = timed { OpenMetricsParser.parse(http_get(address, "/metrics").body) }
          expect(health.code).to eq("200")
          # The handler spins for 4 s: an answer that waited for Ruby would take seconds.
          expect(health_took).to be < 1.0
          expect(metrics_took).to be < 1.0
          expect(OpenMetricsParser.value(metrics, "tasker_handler_threads", "state" => "busy")).to eq(1)
          expect(OpenMetricsParser.value(metrics, "tasker_handler_threads", "state" => "idle")).to eq(1)
          expect(OpenMetricsParser.value(metrics, "tasker_steps_in_flight")).to eq(1)
          spin = { "namespace" => "web", "template" => "busy", "step" => "spin" }
          expect(OpenMetricsParser.value(metrics, "tasker_steps_started_total", spin)).to eq(1)
          expect(OpenMetricsParser.value(metrics, "tasker_steps_succeeded_total", spin)).to eq(0)
        end
      end

      it "answers the dashboard, the task API and the task's picture during #{what}" do
        run_busy_child(context.merge("seconds" => 4)) do |address|
          listed, took = timed { json(http_get(address, "/api/tasks")) }
          expect(took).to be < 1.0
          uuid = listed["tasks"].first.fetch("task_uuid")
          ["/", "/api/overview", "/api/tasks/#{uuid}", "/api/tasks/#{uuid}/graph.svg"].each do |path|
            response, took = timed { http_get(address, path) }
            expect([path, response.code]).to eq([path, "200"])
            expect(took).to be < 1.0, "#{path} took #{took}s"
          end
          expect(http_get(address, "/api/tasks/#{uuid}/graph.svg").body).to include('data-status="in_progress"')
        end
      end
    end
  end
end
