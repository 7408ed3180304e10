"""``kv bench``: closed-loop load against our cluster and, in the same run, its competitors.

* ``load.py``: the client side. Worker processes (threads inside) run closed-loop clients and
  report per-operation latencies and their own CPU time. Used for our cluster and for etcd.
* ``ours.py``: our cluster, a fresh one started with ``kv cluster up --detach`` in a temporary
  directory, or an existing one (``--endpoints``).
* ``etcd.py``: an etcd cluster on 127.0.0.1 (Debian's ``etcd-server``), loaded through its HTTP
  JSON gateway.
* ``raw.py``: a plain PySyncObj replicated dict at our timer settings; it has no client API, so
  the load runs as threads inside its leader process.
* ``stats.py``: percentiles, medians, CPU time from ``/proc``, leftover-process checks.
* ``runner.py``: rounds, alternation of targets, progress, the report.
* ``guard.py``: a small process that cleans up if ``kv bench`` itself is killed outright.
* ``common.py``: a run's spec and result, the target interface.
"""
