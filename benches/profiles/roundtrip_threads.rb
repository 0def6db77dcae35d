# frozen_string_literal: true

# Where the round trip's CPU goes, per thread: CPU time per step and context switches per step of
# the Ruby handler thread, the engine thread and the main thread, from /proc (concurrency CONC, 1 by
# default).
#   ruby benches/profiles/roundtrip_threads.rb

require_relative "../bench_helper"

def thread_times
  Dir["/proc/self/task/*"].to_h do |dir|
    stat = File.read("#{dir}/stat").split(") ").last.split
    status = File.read("#{dir}/status")
    ["#{File.read("#{dir}/comm").strip} (#{File.basename(dir)})",
     [(stat[11].to_i + stat[12].to_i) / Float(Etc.sysconf(Etc::SC_CLK_TCK)),
      status[/^voluntary_ctxt_switches:\s+(\d+)/, 1].to_i, status[/^nonvoluntary_ctxt_switches:\s+(\d+)/, 1].to_i]]
  end
end

def run(tasks)
  uuids = Array.new(tasks) { TaskerCore.create_task(namespace: "bench", name: "wide") }
  uuids.each { |uuid| TaskerCore.wait_for_task(uuid, timeout: 600) }
end

tasks = Bench.size(3_000, 50)
Bench.start_worker(concurrency: Integer(ENV.fetch("CONC", "1")), task_retention: tasks * 2)
run(tasks / 10)
before = thread_times
started = Bench.now
run(tasks)
elapsed = Bench.now - started
after = thread_times
Bench.stop_worker
steps = tasks * 64
puts format("   %d steps in %.2f s = %d steps/s", steps, elapsed, steps / elapsed)
after.each do |name, (cpu, voluntary, involuntary)|
  was = before.fetch(name, [0, 0, 0])
  next if cpu - was[0] < 0.01

  puts format("   %-28s CPU %5.2f s = %5.1f µs/step; context switches/step: voluntary %.3f, involuntary %.3f",
              name, cpu - was[0], (cpu - was[0]) * 1e6 / steps, (voluntary - was[1]).fdiv(steps),
              (involuntary - was[2]).fdiv(steps))
end
