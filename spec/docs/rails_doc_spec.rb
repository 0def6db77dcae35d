# frozen_string_literal: true

require "spec_helper"

# docs/rails.md is a Rails app: each fenced block whose info string names a file is one file of
# it. They are written into a fresh directory; the app is booted (real Rails 6.1, PostgreSQL) and
# its command and specs run there, as a user would run them.
RSpec.describe "docs/rails.md" do
  doc = File.read(File.expand_path("../../docs/rails.md", __dir__))
  files = doc.scan(/^```\w+ (\S+)\n(.*?)^```$/m).to_h

  let(:app) { Dir.mktmpdir("tasker-rails-doc") }
  let(:env) { { "TASKER_LOG_LEVEL" => "error", "TASKER_TEMPLATE_PATH" => nil } }

  before do
    FileUtils.mkdir_p(File.join(app, "log"))
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

  it "holds the app's config, template, handlers and specs" do
    expect(files.keys).to include("config/application.rb", "config/tasker/shipping/ship_parcel.yml",
                                  "app/handlers/shipping/weigh.rb", "spec/rails_helper.rb", "script/ship.rb")
  end

  it "has a script that prints what the doc says, run with bin/rails runner" do
    out, err, status = run_in_app("bin/rails", "runner", "script/ship.rb")

    expect(status).to be_success, err
    expect(out).to eq(files.fetch("script/ship.out"))
  end

  it "has a job script that prints what the doc says (Active Job on tasker_core)" do
    out, err, status = run_in_app("bin/rails", "runner", "script/jobs.rb")

    expect(status).to be_success, err
    expect(out).to eq(files.fetch("script/jobs.out"))
  end

  it "has specs that pass as printed" do
    rspec = Gem.bin_path("rspec-core", "rspec")
    examples = files.select { |path, _| path.end_with?("_spec.rb") }.values.sum { |text| text.scan(/^\s+it "/).size }

    out, err, status = run_in_app(rspec, "--no-color")

    expect(status).to be_success, "rspec in the doc's app failed:\n#{out}\n#{err}"
    expect(out).to include("#{examples} examples, 0 failures")
  end
end
