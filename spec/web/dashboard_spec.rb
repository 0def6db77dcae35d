# frozen_string_literal: true

require "spec_helper"
require "json"
require "net/http"
require "rack"
require "rack/mock"
require "socket"

RSpec.describe "The dashboard (GET /, TaskerCore::Web)" do
  def start_web_worker(**config)
    TaskerCore::Worker::Bootstrap.start!(
      { templates: [WEB_TEMPLATES], enable_web_api: true, web_api_bind: "127.0.0.1:0" }.merge(config)
    )
    TaskerCore::FFI.worker_status.fetch(:web_api_bind)
  end

  def request(address, verb, path, headers: {}, body: nil)
    host, port = address.split(":")
    Net::HTTP.start(host, Integer(port), open_timeout: 5, read_timeout: 5) do |http|
      klass = verb == :post ? Net::HTTP::Post : Net::HTTP::Get
      req = klass.new(path, headers)
      req.body = body if body
      http.request(req)
    end
  end

  def errored_task
    uuid = TaskerCore.create_task(namespace: "web", name: "checkout", context: { "decline_once" => true })
    expect(TaskerCore.wait_for_task(uuid, timeout: 10)[:status]).to eq("error")
    uuid
  end

  it "serves the page and its assets from the gem, with a strict content security policy" do
    address = start_web_worker
    page = request(address, :get, "/")
    expect(page.code).to eq("200")
    expect(page["content-type"]).to eq("text/html; charset=utf-8")
    expect(page.body).to include('<script src="assets/app.js" defer></script>', '<main id="main">')
    expect(page["content-security-policy"]).to include("script-src 'self'", "frame-ancestors 'none'")
    expect(page.body).not_to match(%r{https?://}) # nothing from a CDN
    js = request(address, :get, "/assets/app.js")
    expect([js.code, js["content-type"]]).to eq(["200", "text/javascript; charset=utf-8"])
    expect(js.body).not_to include("innerHTML")
    expect(request(address, :get, "/assets/app.css").code).to eq("200")
    expect(JSON.parse(request(address, :get, "/assets/nope.js").body)["error"]).to eq('no asset "nope.js"')
  end

  it "answers the overview: tasks by status, queue depth, the worker and its steps/s" do
    address = start_web_worker
    errored_task
    2.times { TaskerCore.wait_for_task(TaskerCore.create_task(namespace: "web", name: "checkout"), timeout: 10) }
    overview = JSON.parse(request(address, :get, "/api/overview").body)
    expect(overview["tasks_by_status"]).to include("complete" => 2, "error" => 1, "pending" => 0)
    expect(overview["queue"]).to include("ready" => 0, "waiting_for_retry" => 0, "in_flight" => 0)
    expect(overview["worker"]).to include("state" => "running", "backend" => "memory", "steps_processed" => 5)
    expect(overview["throughput"]).to be_an(Array)
    expect(overview["sample_every_seconds"]).to eq(5)
  end

  describe "cancel and retry" do
    it "are refused (403) and hidden unless web_api_actions is true" do
      address = start_web_worker
      uuid = errored_task
      expect(JSON.parse(request(address, :get, "/api/session").body))
        .to eq("actions" => false, "token_required" => false)
      response = request(address, :post, "/api/tasks/#{uuid}/retry")
      expect(response.code).to eq("403")
      expect(JSON.parse(response.body)["error"]).to match(/actions are disabled: .*web_api_actions: true/)
      expect(TaskerCore.task_status(uuid)[:status]).to eq("error")
      expect(request(address, :get, "/api/tasks/#{uuid}/retry").code).to eq("405") # POST only
    end

    it "need the CSRF token of the session, and then retry the task" do
      address = start_web_worker(web_api_actions: true)
      uuid = errored_task
      session = JSON.parse(request(address, :get, "/api/session").body)
      expect(session).to include("actions" => true, "csrf_token" => a_string_matching(/\A\h{32}\z/))
      [{}, { "X-CSRF-Token" => "guess" }].each do |headers|
        response = request(address, :post, "/api/tasks/#{uuid}/retry", headers: headers)
        expect(response.code).to eq("403")
        expect(JSON.parse(response.body)["error"]).to start_with("X-CSRF-Token: missing or wrong")
      end
      csrf = { "X-CSRF-Token" => session["csrf_token"] }
      retried = request(address, :post, "/api/tasks/#{uuid}/retry", headers: csrf)
      expect(JSON.parse(retried.body)).to eq("retried" => true)
      expect(TaskerCore.wait_for_task(uuid, timeout: 10)[:status]).to eq("complete")
      again = request(address, :post, "/api/tasks/#{uuid}/retry", headers: csrf)
      expect(again.code).to eq("400") # a complete task is not retried
      expect(JSON.parse(again.body)["error"]).to match(/complete/)
      unknown = request(address, :post, "/api/tasks/#{SecureRandom.uuid}/cancel", headers: csrf)
      expect(unknown.code).to eq("404")
      expect(JSON.parse(request(address, :post, "/api/tasks/#{uuid}/cancel", headers: csrf).body))
        .to eq("cancelled" => false)
    end
  end

  describe "with web_api_token" do
    it "sends a browser to the login form, whose cookie then opens every route" do
      address = start_web_worker(web_api_token: "s3cret;token")
      expect(request(address, :get, "/").then { |r| [r.code, r["location"]] }).to eq(%w[303 login])
      expect(request(address, :get, "/api/overview").code).to eq("401")
      expect(request(address, :get, "/login").body).to include('<form method="post" action="login"')
      expect(request(address, :get, "/assets/app.css").code).to eq("200")

      form = { "Content-Type" => "application/x-www-form-urlencoded" }
      expect(request(address, :post, "/login", headers: form, body: "token=wrong").code).to eq("401")
      login = request(address, :post, "/login", headers: form, body: URI.encode_www_form(token: "s3cret;token"))
      expect([login.code, login["location"]]).to eq(["303", "./"])
      cookie = login["set-cookie"]
      expect(cookie).to include("HttpOnly", "SameSite=Strict", "Path=/")
      pair = cookie.split(";").first
      expect(request(address, :get, "/api/overview", headers: { "Cookie" => pair }).code).to eq("200")
      expect(request(address, :get, "/", headers: { "Cookie" => "tasker_web_token=nope" }).code).to eq("303")
      bearer = { "Authorization" => "Bearer s3cret;token" }
      expect(JSON.parse(request(address, :get, "/api/session", headers: bearer).body)["token_required"]).to be(true)
    end
  end

  describe "TaskerCore::Web (Rack)" do
    let(:app) do
      Rack::Builder.new do
        map("/tasker") { run TaskerCore::Web }
        map("/admin/tasker") { run TaskerCore::Web.new(actions: true, token: "mounted-token") }
      end
    end
    let(:browser) { Rack::MockRequest.new(app) }

    it "serves the same page and API under its mount, by the same Rust routes" do
      address = start_web_worker
      uuid = errored_task
      expect(browser.get("/tasker").then { |r| [r.status, r.location] }).to eq([301, "/tasker/"])
      page = browser.get("/tasker/")
      expect(page.status).to eq(200)
      expect(page.body).to eq(request(address, :get, "/").body)
      listed = JSON.parse(browser.get("/tasker/api/tasks", params: { status: "error" }).body)
      expect(listed["tasks"].map { |t| t["task_uuid"] }).to eq([uuid])
      svg = browser.get("/tasker/api/tasks/#{uuid}/graph.svg").body.force_encoding(Encoding::UTF_8)
      expect(svg).to eq(TaskerCore.task_graph(uuid))
      bad = browser.get("/tasker/api/tasks", params: { limit: "lots" })
      expect(bad.status).to eq(400)
      expect(JSON.parse(bad.body)["error"]).to start_with("limit:")
      expect(browser.get("/tasker/api/tasks/#{SecureRandom.uuid}").status).to eq(404)
      expect(browser.post("/tasker/api/tasks/#{uuid}/retry").status).to eq(403) # read-only mount
    end

    it "takes its own token and actions, scoping the login cookie to the mount" do
      start_web_worker
      uuid = errored_task
      expect(browser.get("/admin/tasker/").then { |r| [r.status, r.location] }).to eq([303, "login"])
      login = browser.post("/admin/tasker/login", input: "token=mounted-token",
                                                  "CONTENT_TYPE" => "application/x-www-form-urlencoded")
      expect(login.status).to eq(303)
      expect(login["set-cookie"]).to include("Path=/admin/tasker/", "HttpOnly")
      cookie = login["set-cookie"].split(";").first
      session = JSON.parse(browser.get("/admin/tasker/api/session", "HTTP_COOKIE" => cookie).body)
      expect(session["actions"]).to be(true)
      headers = { "HTTP_COOKIE" => cookie, "HTTP_X_CSRF_TOKEN" => session["csrf_token"] }
      retried = browser.post("/admin/tasker/api/tasks/#{uuid}/retry", headers)
      expect(JSON.parse(retried.body)).to eq("retried" => true)
      expect(TaskerCore.wait_for_task(uuid, timeout: 10)[:status]).to eq("complete")
    end

    it "answers 503 naming what is missing when no worker runs, and refuses bad settings" do
      response = browser.get("/tasker/api/overview")
      expect(response.status).to eq(503)
      expect(JSON.parse(response.body)["error"]).to match(/Bootstrap.start! or TaskerCore::Client.connect/)
      expect { TaskerCore::Web.new(actions: "yes") }.to raise_error(ArgumentError, /actions:/)
      expect { TaskerCore::Web.new(token: "") }.to raise_error(ArgumentError, /token:/)
    end
  end

  it "lets no forked child keep the listening socket: the port is free once the parent stops" do
    address = start_web_worker
    child = fork do
      sleep 30
      exit!(0)
    end
    begin
      expect(request(address, :get, "/health").code).to eq("200") # the parent still serves
      TaskerCore::FFI.stop_worker
      host, port = address.split(":")
      expect { TCPSocket.new(host, Integer(port)).close }.to raise_error(Errno::ECONNREFUSED)
      TCPServer.new(host, Integer(port)).close # the port can be bound again
      expect(Process.waitpid(child, Process::WNOHANG)).to be_nil # while the child lives
    ensure
      Process.kill("KILL", child)
      Process.wait(child)
    end
  end
end
