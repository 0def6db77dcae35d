# frozen_string_literal: true

require "spec_helper"
require "json"
require "net/http"
require "securerandom"
require "time"

RSpec.describe "Finding tasks (TaskerCore.tasks, GET /api/tasks)" do
  def http_get(address, path)
    host, port = address.split(":")
    Net::HTTP.start(host, Integer(port), open_timeout: 5, read_timeout: 5) { |http| http.get(path) }
  end

  def api(address, path)
    response = http_get(address, path)
    [response.code, JSON.parse(response.body)]
  end

  def create(context)
    TaskerCore.create_task(namespace: "web", name: "checkout", context: context)
  end

  # 12 tasks, oldest first: every third fails for good.
  def run_tasks
    uuids = Array.new(12) { |i| create((i % 3).zero? ? { "fail" => true } : {}) }
    uuids.each { |uuid| TaskerCore.wait_for_task(uuid, timeout: 10) }
    uuids
  end

  before do
    TaskerCore::Worker::Bootstrap.start!(templates: [WEB_TEMPLATES], enable_web_api: true,
                                         web_api_bind: "127.0.0.1:0")
  end

  let(:address) { TaskerCore::FFI.worker_status.fetch(:web_api_bind) }

  it "lists newest first, a page at a time, without gaps or repeats" do
    uuids = run_tasks
    pages = []
    cursor = nil
    loop do
      page = TaskerCore.tasks(limit: 5, cursor: cursor)
      pages << page[:tasks].map { |t| t[:task_uuid] }
      cursor = page[:next_cursor] or break
    end
    expect(pages.map(&:size)).to eq([5, 5, 2])
    expect(pages.flatten).to eq(uuids.reverse)

    first = TaskerCore.tasks(limit: 1)[:tasks].first
    expect(first).to include(task_uuid: uuids.last, namespace: "web", name: "checkout", version: "1.0.0",
                             status: "complete")
    expect(Time.iso8601(first[:created_at])).to be_within(60).of(Time.now)
    expect(Time.iso8601(first[:completed_at])).to be >= Time.iso8601(first[:created_at])
  end

  it "filters by status, namespace, name and creation time" do
    uuids = run_tasks
    errored = uuids.each_slice(3).map(&:first)
    expect(TaskerCore.tasks(status: :error)[:tasks].map { |t| t[:task_uuid] }).to eq(errored.reverse)
    expect(TaskerCore.tasks(status: "complete", limit: 100)[:tasks].size).to eq(8)
    expect(TaskerCore.tasks(namespace: "web", name: "checkout")[:tasks].size).to eq(12)
    expect(TaskerCore.tasks(namespace: "elsewhere")).to eq(tasks: [], next_cursor: nil)
    expect(TaskerCore.tasks(name: "busy")[:tasks]).to be_empty

    sleep 0.01
    boundary = Time.now
    later = create({})
    TaskerCore.wait_for_task(later, timeout: 10)
    expect(TaskerCore.tasks(created_after: boundary)[:tasks].map { |t| t[:task_uuid] }).to eq([later])
    expect(TaskerCore.tasks(created_after: boundary.utc.iso8601(6))[:tasks].size).to eq(1)
    expect(TaskerCore.tasks(created_after: boundary.to_f)[:tasks].size).to eq(1)
  end

  it "names the parameter that is wrong" do
    { { status: "done" } => /\Astatus: unknown status "done"/,
      { limit: 0 } => /\Alimit: expected an integer from 1 to 1000/,
      { limit: 5000 } => /\Alimit:/,
      { cursor: "page-two" } => /\Acursor: "page-two" is not a cursor/,
      { created_after: "last tuesday" } => /\Acreated_after: expected a time/ }.each do |params, message|
      expect { TaskerCore.tasks(**params) }.to raise_error(ArgumentError, message)
    end
  end

  it "serves the same under GET /api/tasks and task_status under GET /api/tasks/:uuid" do
    uuids = run_tasks
    code, body = api(address, "/api/tasks?status=error&limit=2")
    expect(code).to eq("200")
    expect(body["tasks"].map { |t| t["task_uuid"] }).to eq(TaskerCore.tasks(status: "error", limit: 2)[:tasks]
                                                                       .map { |t| t[:task_uuid] })
    code, second = api(address, "/api/tasks?status=error&limit=2&cursor=#{body.fetch("next_cursor")}")
    expect(code).to eq("200")
    expect((body["tasks"] + second["tasks"]).map { |t| t["task_uuid"] }).to eq(uuids.each_slice(3).map(&:first).reverse)
    expect(second["next_cursor"]).to be_nil

    failed = uuids.first
    code, status = api(address, "/api/tasks/#{failed}")
    expect(code).to eq("200")
    ruby_status = JSON.parse(JSON.generate(TaskerCore.task_status(failed)))
    expect(status).to eq(ruby_status)
    expect(status["steps"].map { |s| [s["name"], s["status"]] }).to eq([%w[charge error], %w[ship skipped]])
    expect(status["steps"].first["error_message"]).to include("card declined")
  end

  it "answers 404 for unknown tasks and 400 naming a bad filter" do
    code, body = api(address, "/api/tasks/#{SecureRandom.uuid}")
    expect(code).to eq("404")
    expect(body["error"]).to start_with("unknown task")
    expect(api(address, "/api/tasks/not-a-uuid")).to match(["404", { "error" => /not a UUID/ }])

    { "status=done" => "status", "limit=zero" => "limit", "cursor=x" => "cursor",
      "created_after=soon" => "created_after", "colour=red" => "colour" }.each do |query, parameter|
      code, body = api(address, "/api/tasks?#{query}")
      expect(code).to eq("400"), query
      expect(body["error"]).to start_with("#{parameter}:")
    end
  end
end
