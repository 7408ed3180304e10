"""``kv``: the command line of the replicated key-value store, modelled on etcdctl.

The modules, from the outside in:

* ``launch``: the entry point (gRPC's log level, set before anything loads grpc);
* ``main``: the root command, its global options and the one place that turns every failure
  into one line on stderr and an exit code (``exits``);
* ``data_cmd``, ``status_cmd``, ``session_cmd``, ``cluster_cmd``, ``member_cmd``,
  ``snapshot_cmd``, ``node_cmd``, ``cert_cmd``, ``version_cmd``: the subcommands (``cluster_nodes``: the
  ``cluster add-node``/``remove-node`` steps);
* ``settings``: the global options (``--endpoints``, ``-w``, timeouts, ``--dir``, ``--cacert``,
  ``--cert``, ``--key``) and where their defaults come from; ``params``: the value types (durations, integers, endpoints);
  ``kv_click``: what every command's help shows and how a group is called;
* ``cluster_dir``, ``certs``, ``processes``, ``session_file``, ``files``, ``output``,
  ``node_status``: the pure parts that the commands stand on (a local cluster's directory, its
  certificate files, its node processes, a session kept in a file, atomic writes, the output
  formats, the status columns).
"""
