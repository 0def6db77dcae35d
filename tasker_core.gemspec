# frozen_string_literal: true

require_relative "lib/tasker_core/version"

Gem::Specification.new do |spec|
  spec.name = "tasker_core"
  spec.version = TaskerCore::VERSION
  spec.summary = "Workflow steps run by a Rust engine inside your Ruby process"
  spec.description = <<~DESC
    tasker_core runs DAGs of workflow steps (YAML task templates) with a Rust engine embedded in the
    Ruby process: ready steps reach Ruby handler threads in microseconds, results flow back, retries
    and dependencies are handled by the engine.
  DESC
  spec.authors = ["tasker_core developers"]
  spec.license = "MIT"
  spec.required_ruby_version = ">= 3.1"
  # python/'s crate is a member of the Cargo workspace: cargo reads its manifest to build the Ruby
  # extension, so the manifest and sources ship too (they are not built).
  spec.files = Dir["Cargo.toml", "Cargo.lock", "README.md", "lib/**/*.{rb,rake}", "exe/*", "docs/*.md",
                   "ext/**/*.{rs,toml,rb,sql,html,css,js}", "python/Cargo.toml", "python/src/*.rs"]
               .reject { |f| f.include?("/target") }
  spec.bindir = "exe"
  spec.executables = ["tasker-worker"]
  spec.require_paths = ["lib"]
  spec.extensions = ["ext/tasker_core/extconf.rb"]
  spec.metadata["rubygems_mfa_required"] = "true"
end
