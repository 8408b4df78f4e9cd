"""What watches over a run while it trains, each reacting to one kind of trouble:

  watchdog.py  a rank that stops making progress (or stops answering) is named with its step, phase and
               stack, and every live rank exits 75 to retry from the newest checkpoint
  signals.py   a preemption or stop signal becomes a checkpoint and a stop that every rank agrees on
  guard.py     a non-finite loss or gradient stops the run before anything non-finite is saved

A new guard goes here; it takes its groups from distributed/groups.py and reports through errors.py.
"""
