# frozen_string_literal: true

require "spec_helper"
require "json"
require "net/http"
require "rexml/document"

# A step name that would break each output unless escaped.
TASK_GRAPH_TRICKY = 'pick "A" <fast> & safe'

RSpec.describe "A picture of a task (TaskerCore.task_graph, GET /api/tasks/:uuid/graph.svg)" do
  tricky = TASK_GRAPH_TRICKY

  before do
    TaskerCore::Worker::Bootstrap.start!(templates: [WEB_TEMPLATES], enable_web_api: true,
                                         web_api_bind: "127.0.0.1:0")
  end

  let(:address) { TaskerCore::FFI.worker_status.fetch(:web_api_bind) }

  def http_get(path)
    host, port = address.split(":")
    Net::HTTP.start(host, Integer(port), open_timeout: 5, read_timeout: 5) { |http| http.get(path) }
  end

  # reserve -> (tricky, pack -> label) -> ship; pack fails for good, so label and ship are skipped.
  def failed_fulfillment
    uuid = TaskerCore.create_task(namespace: "web", name: "fulfillment", context: { "fail" => true })
    expect(TaskerCore.wait_for_task(uuid, timeout: 10)[:status]).to eq("error")
    uuid
  end

  def svg_steps(svg)
    doc = REXML::Document.new(svg)
    REXML::XPath.match(doc, "//g[@data-step]").to_h do |g|
      rect = g.elements["rect"]
      [g.attributes["data-step"], { status: g.attributes["data-status"], x: rect.attributes["x"].to_f,
                                    y: rect.attributes["y"].to_f, label: g.elements.to_a("text").map(&:text) }]
    end
  end

  it "draws the DAG as SVG in layers by longest path, each step coloured and labelled with its state" do
    uuid = failed_fulfillment
    svg = TaskerCore.task_graph(uuid, format: :svg)
    steps = svg_steps(svg) # parses: the escaped names did not break the document
    expect(steps.keys).to contain_exactly("reserve", tricky, "pack", "label", "ship")
    expect(steps.transform_values { |s| s[:status] }).to eq(
      "reserve" => "complete", tricky => "complete", "pack" => "error", "label" => "skipped", "ship" => "skipped"
    )
    rows = steps.transform_values { |s| s[:y] }
    expect(rows["reserve"]).to be < rows["pack"]
    expect(rows["pack"]).to eq(rows[tricky])
    expect(rows["label"]).to be > rows["pack"]
    expect(rows["ship"]).to be > rows["label"] # longest path: after label, not beside it
    expect(steps["pack"][:label].last).to match(/\Aerror · 1 attempt · [\d.]+ (ms|s)\z/)
    expect(svg.scan("<path class=\"edge\"").size).to eq(5)
    expect(svg).to include("pick &quot;A&quot; &lt;fast&gt; &amp; safe")
    expect(svg).to include('fill="#ffd6d6"') # the failed step's colour
  end

  it "gives Mermaid and Graphviz DOT with the names escaped for each" do
    uuid = failed_fulfillment
    mermaid = TaskerCore.task_graph(uuid, format: :mermaid)
    expect(mermaid).to start_with("flowchart TD\n")
    expect(mermaid).to include('s1["pick #quot;A#quot; #lt;fast#gt; #amp; safe<br/>complete · 1 attempt')
    expect(mermaid).to include("s0 --> s1", "s2 --> s3", "s1 --> s4", "s3 --> s4", "class s2 error")
    expect(mermaid).not_to include(tricky)

    dot = TaskerCore.task_graph(uuid, format: "dot")
    expect(dot).to start_with("digraph \"task #{uuid}\" {")
    expect(dot).to include('s1 [label="pick \"A\" <fast> & safe\ncomplete · 1 attempt')
    expect(dot).to include("s0 -> s1;", "s3 -> s4;")
    # Every quote inside a label is escaped: the quoted strings pair up on every line.
    dot.each_line { |line| expect(line.gsub('\\"', "").count('"').even?).to be(true), line }
  end

  it "serves the SVG over HTTP, with a JSON 404 for an unknown task" do
    uuid = failed_fulfillment
    response = http_get("/api/tasks/#{uuid}/graph.svg")
    expect(response.code).to eq("200")
    expect(response["content-type"]).to eq("image/svg+xml; charset=utf-8")
    expect(svg_steps(response.body).size).to eq(5)
    expect(response.body.force_encoding(Encoding::UTF_8)).to eq(TaskerCore.task_graph(uuid, format: :svg))

    missing = http_get("/api/tasks/#{SecureRandom.uuid}/graph.svg")
    expect([missing.code, missing["content-type"]]).to eq(["404", "application/json"])
    expect(JSON.parse(missing.body)["error"]).to match(/unknown task/)
    expect(JSON.parse(http_get("/api/tasks/nope/graph.svg").body)["error"]).to match(/"nope": not a UUID/)
  end

  it "shows a running task's steps as they are" do
    uuid = TaskerCore.create_task(namespace: "web", name: "checkout", context: {})
    TaskerCore.wait_for_task(uuid, timeout: 10)
    steps = svg_steps(TaskerCore.task_graph(uuid))
    expect(steps.transform_values { |s| s[:status] }).to eq("charge" => "complete", "ship" => "complete")
    expect(steps["charge"][:y]).to be < steps["ship"][:y]
  end

  it "refuses a bad format, naming it, and an unknown task with TaskNotFoundError" do
    uuid = failed_fulfillment
    expect { TaskerCore.task_graph(uuid, format: :png) }
      .to raise_error(ArgumentError, /format: "png" is not one of :mermaid, :dot, :svg/)
    expect { TaskerCore.task_graph(uuid, format: 3) }.to raise_error(ArgumentError, /format: 3 is not one of/)
    expect { TaskerCore.task_graph(SecureRandom.uuid) }.to raise_error(TaskerCore::TaskNotFoundError)
    expect { TaskerCore.task_graph("nope", format: :dot) }.to raise_error(TaskerCore::TaskNotFoundError, /not a UUID/)
    expect(TaskerCore::FFI.worker_status[:running]).to be(true)
  end
end
