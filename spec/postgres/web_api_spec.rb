# frozen_string_literal: true

require "spec_helper"
require "json"
require "net/http"
require "rack"
require "rack/mock"
require "securerandom"

RSpec.describe "PostgreSQL backend: the web API reports the whole system" do
  include_context "postgres database"

  def http_get(address, path)
    host, port = address.split(":")
    Net::HTTP.start(host, Integer(port), open_timeout: 5, read_timeout: 5) { |http| http.get(path) }
  end

  def scrape(address)
    OpenMetricsParser.parse(http_get(address, "/metrics").body)
  end

  it "reads queue depth and tasks by status from the database, whichever process ran them" do
    # This process runs a namespace without tasks: every step below runs in another process.
    start_client(db, enable_web_api: true, web_api_bind: "127.0.0.1:0")
    address = TaskerCore::FFI.worker_status.fetch(:web_api_bind)
    ready = http_get(address, "/ready")
    expect(ready.code).to eq("200")
    expect(JSON.parse(ready.body)).to eq("ready" => true, "state" => "running", "database" => true)

    uuids = Array.new(5) { create_pg_task("diamond") }
    metrics = scrape(address)
    pg = { "namespace" => "pg" }
    # Nobody runs "pg" yet: each task's first step waits, ready.
    expect(OpenMetricsParser.value(metrics, "tasker_steps_ready", pg)).to eq(5)
    expect(OpenMetricsParser.value(metrics, "tasker_steps_claimed", pg)).to eq(0)
    expect(OpenMetricsParser.value(metrics, "tasker_tasks", pg.merge("status" => "pending"))).to eq(5)
    expect(OpenMetricsParser.value(metrics, "tasker_database_pool_connections", "state" => "open")).to be >= 1

    start_pg_worker(db)
    expect(uuids.map { |u| TaskerCore.wait_for_task(u, timeout: 20)[:status] }).to all(eq("complete"))

    metrics = scrape(address)
    expect(OpenMetricsParser.value(metrics, "tasker_tasks", pg.merge("status" => "complete"))).to eq(5)
    expect(OpenMetricsParser.value(metrics, "tasker_tasks", pg.merge("status" => "pending"))).to be_nil
    expect(OpenMetricsParser.value(metrics, "tasker_steps_ready", pg)).to be_nil
    # This process ran none of the 20 steps: its own step counters have no series.
    expect(metrics.fetch("tasker_steps_started", nil)&.samples.to_a).to be_empty
  end

  it "lists tasks newest first from the database, in pages, each served by an index" do
    start_client(db, enable_web_api: true, web_api_bind: "127.0.0.1:0")
    address = TaskerCore::FFI.worker_status.fetch(:web_api_bind)
    psql("DELETE FROM tasker_tasks", db: db)
    uuids = Array.new(7) { create_pg_task("single") }

    cursor = nil
    listed = []
    loop do
      page = TaskerCore.tasks(namespace: "pg", limit: 3, cursor: cursor)
      listed.concat(page[:tasks].map { |t| t[:task_uuid] })
      cursor = page[:next_cursor] or break
    end
    expect(listed).to eq(uuids.reverse)
    expect(TaskerCore.tasks(status: "pending")[:tasks].size).to eq(7)
    expect(TaskerCore.tasks(status: "complete")[:tasks]).to be_empty

    body = JSON.parse(http_get(address, "/api/tasks?namespace=pg&name=single&limit=2").body)
    expect(body["tasks"].map { |t| t["task_uuid"] }).to eq(uuids.reverse.first(2))
    status = JSON.parse(http_get(address, "/api/tasks/#{uuids.first}").body)
    expect(status).to include("task_uuid" => uuids.first, "status" => "pending", "namespace" => "pg")
    expect(http_get(address, "/api/tasks/#{SecureRandom.uuid}").code).to eq("404")

    # With the planner told to avoid sequential scans where it can, each list shape has an index.
    psql("ANALYZE tasker_tasks", db: db)
    { "status = 'error'" => "tasker_tasks_status_created",
      "namespace = 'pg' AND name = 'single'" => "tasker_tasks_namespace_name_created",
      "true" => "tasker_tasks_created" }.each do |filter, index|
      plan = psql("SET enable_seqscan = off; EXPLAIN SELECT task_uuid FROM tasker_tasks WHERE #{filter} " \
                  "ORDER BY created_at DESC, task_uuid DESC LIMIT 51", db: db)
      expect(plan).to include(index), plan
      expect(plan).not_to include("Sort"), plan
    end
  end

  it "draws a task another process ran, and serves the dashboard's overview from the database" do
    start_client(db, enable_web_api: true, web_api_bind: "127.0.0.1:0", web_api_actions: true)
    address = TaskerCore::FFI.worker_status.fetch(:web_api_bind)
    psql("DELETE FROM tasker_tasks", db: db)
    uuids = Array.new(3) { create_pg_task("diamond") }
    start_pg_worker(db)
    expect(uuids.map { |u| TaskerCore.wait_for_task(u, timeout: 20)[:status] }).to all(eq("complete"))

    mermaid = TaskerCore.task_graph(uuids.first, format: :mermaid)
    expect(mermaid).to include("s0 --> s1", "s0 --> s2", "s1 --> s3", "s2 --> s3", "class s3 complete")
    svg = http_get(address, "/api/tasks/#{uuids.first}/graph.svg")
    expect(svg.code).to eq("200")
    expect(svg.body.scan('data-status="complete"').size).to eq(4)
    expect(http_get(address, "/api/tasks/#{SecureRandom.uuid}/graph.svg").code).to eq("404")

    overview = JSON.parse(http_get(address, "/api/overview").body)
    expect(overview["tasks_by_status"]).to include("complete" => 3)
    expect(overview["queue"]).to include("ready" => 0, "claimed" => 0)
    expect(overview["worker"]).to include("backend" => "postgres")
    rack = Rack::MockRequest.new(TaskerCore::Web)
    expect(JSON.parse(rack.get("/api/tasks", params: { status: "complete", namespace: "pg" }).body)["tasks"].size)
      .to eq(3)
  end

  it "says not ready when the database is gone" do
    other = create_spec_database
    start_client(other, enable_web_api: true, web_api_bind: "127.0.0.1:0")
    address = TaskerCore::FFI.worker_status.fetch(:web_api_bind)
    expect(http_get(address, "/ready").code).to eq("200")
    drop_spec_database(other)
    ready = http_get(address, "/ready")
    expect(ready.code).to eq("503")
    expect(JSON.parse(ready.body)).to include("ready" => false, "database" => false)
    expect(JSON.parse(ready.body)["reason"]).to include("database")
    expect(http_get(address, "/health").code).to eq("200")
  ensure
    TaskerCore::Worker::Bootstrap.instance.shutdown!
    drop_spec_database(other) if other
  end
end
