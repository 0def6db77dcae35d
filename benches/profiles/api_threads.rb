# frozen_string_literal: true

# Where the single-step task path's CPU goes, per thread: CPU time per task and context switches per
# task of the client threads, the handler threads and the engine thread, from /proc. MODE=one_by_one
# (default: CLIENTS threads create tasks one at a time, then wait for each), closed_loop (each client
# creates a task and waits for it before the next) or bulk (create_tasks + wait_for_tasks).
#   ruby benches/profiles/api_threads.rb

require_relative "../bench_helper"
require_relative "../api"

def thread_times
  Dir["/proc/self/task/*"].to_h do |dir|
    stat = File.read("#{dir}/stat").split(") ").last.split
    status = File.read("#{dir}/status")
    ["#{File.read("#{dir}/comm").strip} (#{File.basename(dir)})",
     [(stat[11].to_i + stat[12].to_i) / Float(Etc.sysconf(Etc::SC_CLK_TCK)),
      status[/^voluntary_ctxt_switches:\s+(\d+)/, 1].to_i, status[/^nonvoluntary_ctxt_switches:\s+(\d+)/, 1].to_i]]
  end
end

mode = ENV.fetch("MODE", "one_by_one")
run = lambda do |tasks|
  case mode
  when "one_by_one" then ApiBench.one_by_one(tasks)
  when "closed_loop" then ApiBench.closed_loop(tasks)
  when "bulk" then ApiBench.bulk(tasks, 1000)
  else raise ArgumentError, "MODE=#{mode}: one_by_one, closed_loop or bulk"
  end
end
tasks = Bench.size(40_000, 400)
Bench.start_worker(concurrency: ApiBench::CONCURRENCY, task_retention: tasks * 2)
run.call(tasks / 10)
before = thread_times
started = Bench.now
run.call(tasks)
elapsed = Bench.now - started
after = thread_times
Bench.stop_worker
puts format("   %s: %d tasks in %.2f s = %d tasks/s", mode, tasks, elapsed, tasks / elapsed)
after.each do |name, (cpu, voluntary, involuntary)|
  was = before.fetch(name, [0, 0, 0])
  next if cpu - was[0] < 0.01

  puts format("   %-28s CPU %5.2f s = %5.1f µs/task; context switches/task: voluntary %.3f, involuntary %.3f",
              name, cpu - was[0], (cpu - was[0]) * 1e6 / tasks, (voluntary - was[1]).fdiv(tasks),
              (involuntary - was[2]).fdiv(tasks))
end
