# frozen_string_literal: true

require "fileutils"
require "rbconfig"
require "tmpdir"

# Builds the gem from a copy of the working tree, installs it (compiling the extension) into an
# empty GEM_HOME, and loads it from elsewhere. Slow: `rspec --tag slow spec/gem/install_spec.rb`.
RSpec.describe "the packaged gem", :slow do
  root = File.expand_path("../..", __dir__)
  # Not part of a source copy: build output, scratch, VCS.
  excluded = %w[target tmp .git pkg vendor .rspec_status].freeze

  # Run a command with a clean Ruby environment (no bundler, no -I from this process).
  def sh(env, *command, chdir:, timeout: 600)
    # TASKER_CORE_TEST_HOOKS: set by the Rakefile for development builds; an installed gem has no hooks.
    clean = { "RUBYOPT" => nil, "RUBYLIB" => nil, "BUNDLE_GEMFILE" => nil, "BUNDLER_SETUP" => nil,
              "TASKER_CORE_TEST_HOOKS" => nil }
    Open3.popen2e(clean.merge(env), *command, chdir: chdir) do |stdin, output, wait|
      stdin.close
      text = Thread.new { output.read }
      unless wait.join(timeout)
        Process.kill("KILL", wait.pid)
        wait.join
        raise "#{command.join(" ")} still running after #{timeout}s:\n#{text.value}"
      end
      [text.value, wait.value]
    end
  end

  it "builds, installs into an empty GEM_HOME (compiling the extension) and loads from another directory" do
    Dir.mktmpdir("tasker-gem") do |tmp|
      source = File.join(tmp, "source")
      gem_home = File.join(tmp, "gems")
      elsewhere = File.join(tmp, "elsewhere")
      [source, gem_home, elsewhere].each { |dir| FileUtils.mkdir_p(dir) }

      Dir.children(root).reject { |entry| excluded.include?(entry) }.each do |entry|
        FileUtils.cp_r(File.join(root, entry), source)
      end
      # Built artifacts of the in-place build must not be what the installed gem loads.
      FileUtils.rm_f(Dir[File.join(source, "lib", "**", "*.so")])

      output, status = sh({}, "gem", "build", "tasker_core.gemspec", chdir: source, timeout: 120)
      expect(status).to be_success, output
      gem_file = Dir[File.join(source, "tasker_core-*.gem")].first
      expect(gem_file).not_to be_nil, output

      install_env = {
        "GEM_HOME" => gem_home, "GEM_PATH" => gem_home,
        # Reuse compiled dependencies between runs; never touch the network.
        "CARGO_TARGET_DIR" => File.join(root, "target", "gem-install-test"),
        "CARGO_NET_OFFLINE" => "true"
      }
      output, status = sh(install_env, "gem", "install", "--verbose", "--local", "--no-document", "--install-dir",
                          gem_home, gem_file, chdir: tmp, timeout: 1500) # a build from scratch
      expect(status).to be_success, output

      installed = Dir[File.join(gem_home, "gems", "tasker_core-*")].first
      expect(installed).not_to be_nil, output
      extension = File.join(installed, "lib", "tasker_core", "tasker_core.so")
      expect(File.exist?(extension)).to be(true), "no extension in #{installed}"
      # Installed once (not also under extensions/), stripped, without debug info.
      expect(Dir[File.join(gem_home, "**", "*.so")]).to eq([extension])
      sections, = Open3.capture2("readelf", "-S", "-W", extension)
      expect(sections).not_to include(".debug_info", ".symtab")
      expect(File.size(extension)).to be < 12 * 1024 * 1024
      # --verbose users see what the build will take before cargo starts.
      expect(output).to match(/compiling the Rust extension with cargo .*takes 3 to 7 minutes/)

      code = <<~RUBY
        require "tasker_core"
        p TaskerCore::FFI.worker_status
        puts $LOADED_FEATURES.grep(/tasker_core\\/tasker_core\\.so\\z/)
        p TaskerCore::FFI.respond_to?(:__provoke_panic) || TaskerCore::FFI.respond_to?(:__measure_thread_wake)
      RUBY
      load_env = { "GEM_HOME" => gem_home, "GEM_PATH" => gem_home, "TASKER_LOG_LEVEL" => "error" }
      output, status = sh(load_env, RbConfig.ruby, "-e", code, chdir: elsewhere, timeout: 60)

      expect(status).to be_success, output
      lines = output.lines.map(&:chomp)
      expect(lines.first).to eq('{:running=>false, :state=>"stopped"}')
      expect(lines[1]).to start_with(gem_home), "loaded the extension from #{lines[1].inspect}"
      expect(lines[2]).to eq("false"), "the installed gem has the test hooks"
    end
  end
end
