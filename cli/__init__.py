"""``kv``: the command line of the replicated key-value store, modelled on etcdctl.

The modules, from the outside in:

* ``main``: the root command, its global options and the one place that turns every failure
  into one line on stderr and an exit code (``exits``);
* ``data_cmd``, ``session_cmd``, ``cluster_cmd``, ``node_cmd``: the subcommands;
* ``settings``: the global options (``--endpoints``, ``-w``, timeouts, ``--dir``) and where their
  defaults come from;
* ``cluster_dir``, ``processes``, ``session_file``, ``files``, ``output``: the pure parts that the
  commands stand on (a local cluster's directory, its node processes, a session kept in a file,
  atomic writes, the output formats).
"""
