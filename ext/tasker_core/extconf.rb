# frozen_string_literal: true

# Writes a Makefile that builds the Rust extension with cargo. Only mkmf-free Ruby is used:
# the rb_sys gem is not required (rb-sys the crate finds Ruby through `RUBY`/RbConfig).

require "rbconfig"

ext_dir = __dir__
root = File.expand_path("../..", ext_dir)
dlext = RbConfig::CONFIG["DLEXT"]
# `gem install` builds in the extension's own directory: build into a scratch target dir and
# delete it afterwards so the installed gem does not keep hundreds of MB of build output.
# `rake compile` builds elsewhere and keeps the workspace target dir for incremental builds.
installing = File.expand_path(Dir.pwd) == File.expand_path(ext_dir)
# An installed gem gets the stripped build without debug info (Cargo.toml's `gem` profile).
profile = ENV.fetch("TASKER_CORE_CARGO_PROFILE", installing ? "gem" : "release")
if installing
  # The first line of the build output (`gem install --verbose` shows it, with cargo's progress).
  puts "tasker_core: compiling the Rust extension with cargo (profile #{profile}); the first build " \
       "takes 3 to 7 minutes on 2 cores"
end
target_dir = ENV["CARGO_TARGET_DIR"] || (installing ? File.join(ext_dir, "target-build") : File.join(root, "target"))
artifact = File.join(target_dir, profile == "dev" ? "debug" : profile, "libtasker_core.so")
ruby = File.join(RbConfig::CONFIG["bindir"], RbConfig::CONFIG["ruby_install_name"])
# The specs' and benchmarks' hooks (TaskerCore::FFI.__provoke_panic, __measure_thread_wake): only
# when asked for (the Rakefile does), never in an installed gem.
features = ENV["TASKER_CORE_TEST_HOOKS"] == "1" ? " --features test-hooks" : ""

# Where `make install` puts the library. RubyGems installs into a scratch `sitearchdir` and then
# copies it twice (the gem's extension dir and its lib dir): a gem install writes it once, straight
# into the gem's own lib dir (on the load path), leaves the scratch dir empty and removes the
# build's copy from ext/.
install_dir = installing ? "gem_libdir" : "sitearchdir"

File.write("Makefile", <<~MAKE)
  CARGO ?= cargo
  SO = tasker_core.#{dlext}
  sitearchdir ?= #{File.join(root, "lib")}
  gem_libdir = #{File.join(root, "lib")}

  all: $(SO)

  $(SO): FORCE
  \tcd #{root} && RUBY=#{ruby} $(CARGO) build --locked --profile #{profile} -p tasker_core#{features} --target-dir #{target_dir}
  \tcp #{artifact} $(SO)

  # Copy then rename: a process that has the old library mapped keeps its inode intact.
  install: $(SO)
  \tmkdir -p $(DESTDIR)$(#{install_dir})/tasker_core
  \tcp $(SO) $(DESTDIR)$(#{install_dir})/tasker_core/$(SO).tmp
  \tmv -f $(DESTDIR)$(#{install_dir})/tasker_core/$(SO).tmp $(DESTDIR)$(#{install_dir})/tasker_core/$(SO)
  #{installing && !ENV["CARGO_TARGET_DIR"] ? "\trm -rf #{target_dir}" : ""}
  #{installing ? "\trm -f $(SO)" : ""}

  clean:
  \trm -f $(SO)

  .PHONY: all install clean FORCE
MAKE
