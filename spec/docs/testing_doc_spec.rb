# frozen_string_literal: true

require "spec_helper"

# docs/testing.md is an app and its specs: each fenced block whose info string names a file
# ("```ruby spec/checkout_workflow_spec.rb") is one file of it. They are written into a fresh
# directory and run there, in a child process, as a user would run them.
RSpec.describe "docs/testing.md" do
  doc = File.read(File.expand_path("../../docs/testing.md", __dir__))
  files = doc.scan(/^```\w+ (\S+)\n(.*?)^```$/m).to_h

  let(:app) { Dir.mktmpdir("tasker-testing-doc") }
  let(:env) { { "TASKER_LOG_LEVEL" => "error", "TASKER_TEMPLATE_PATH" => nil } }

  before do
    files.each do |path, text|
      next if path.end_with?(".out")

      FileUtils.mkdir_p(File.dirname(File.join(app, path)))
      File.write(File.join(app, path), text)
    end
  end

  after { FileUtils.rm_rf(app) }

  def run_in_app(*args)
    Open3.capture3(env, RbConfig.ruby, "-I", SpecHelpers::LIB, *args, chdir: app)
  end

  it "holds the app's template, code and specs" do
    expect(files.keys).to include("config/tasker/checkout.yml", "app/shop.rb", "spec/spec_helper.rb",
                                  "spec/checkout_workflow_spec.rb", "script/try_checkout.rb")
  end

  it "has specs that pass as printed" do
    rspec = Gem.bin_path("rspec-core", "rspec")
    examples = files.select { |path, _| path.end_with?("_spec.rb") }.values.sum { |text| text.scan(/^\s+it "/).size }

    out, err, status = run_in_app(rspec, "--no-color", "spec")

    expect(status).to be_success, "rspec in the doc's app failed:\n#{out}\n#{err}"
    expect(out).to include("#{examples} examples, 0 failures")
  end

  it "has a script that prints what the doc says" do
    out, err, status = run_in_app("script/try_checkout.rb")

    expect(status).to be_success, err
    expect(out).to eq(files.fetch("script/try_checkout.out"))
  end
end
