"""What the test tiers share: clusters of real agents (cluster.py), single agents (agent.py), processes that die
with the test run (procs.py), polling with a clear failure (wait.py), network-namespace labs (netlab.py), the
linearizability checker and the in-process stand-ins (memory_harness.py, fake_kube.py)."""
