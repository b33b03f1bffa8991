# retrovisor.gdb: commands for gdb attached to `retrovisor replay --gdb`, loaded with `source FILE`
# (retrovisor prints that line when it starts; `retrovisor gdb-script` prints this file).
#
# gdb keeps the registers and memory it read until the program runs or steps, and a `monitor seek` is
# neither as far as gdb knows: after one, bt, info registers and x would show the old position. rv-seek
# moves the replay and then makes gdb forget what it read.

# With several vCPUs, a step moves the thread gdb names, but gdb names one for reverse-stepi only when
# it locks the scheduler while stepping; continuing still runs every vCPU, in the recorded order.
set scheduler-locking step

define rv-seek
  if $argc == 0
    echo usage: rv-seek POSITION (an icount; in a landmark trace 1234 or 1234 + 56, as rv-when prints it)\n
  end
  if $argc == 1
    monitor rv-seek $arg0
  end
  if $argc == 2
    monitor rv-seek $arg0 $arg1
  end
  if $argc == 3
    monitor rv-seek $arg0 $arg1 $arg2
  end
  if $argc == 4
    monitor rv-seek $arg0 $arg1 $arg2 $arg3
  end
  if $argc > 0
    maintenance flush register-cache
    maintenance flush dcache
    frame
  end
end
document rv-seek
Move the replay to POSITION and show the frame there.
POSITION is an icount, or in a landmark trace a landmark and the instructions after it: 1234 or
1234 + 56, as rv-when prints it. gdb then reads the registers and memory afresh.
end

define rv-when
  monitor when
end
document rv-when
Print the current position and where the recording ends.
end

define rv-help
  echo rv-seek POSITION   move the replay there and show the frame (gdb re-reads registers and memory)\n
  echo rv-when            print the current position and where the recording ends\n
  echo rv-help            this list\n
  monitor help
end
document rv-help
List retrovisor's commands and what the replay can do.
end

# The replay is read-only: with this, gdb refuses a memory write itself and says "Writing to memory is not
# allowed", instead of sending it and reporting the refusal as "Cannot access memory". (Its twin
# may-write-registers cannot be changed once gdb is connected, which is when this file is sourced.)
set may-write-memory off
