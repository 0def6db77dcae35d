# frozen_string_literal: true

require "tmpdir"
require "fileutils"

# For specs that write their own templates: a temporary directory per example.
module TemplateDirHelpers
  # Writes `files` ({"name.yml" => yaml}) into a fresh directory removed after the example.
  def template_dir(files)
    dir = Dir.mktmpdir("tasker-templates")
    template_dirs << dir
    files.each { |name, yaml| File.write(File.join(dir, name), yaml) }
    dir
  end

  def template_dirs
    @template_dirs ||= []
  end
end

RSpec.configure do |config|
  config.include TemplateDirHelpers
  config.after { template_dirs.each { |dir| FileUtils.rm_rf(dir) } }
end
