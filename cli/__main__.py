"""``python -m cli``: the same program as the ``kv`` console script.

``kv cluster up`` starts nodes this way (``sys.executable -m cli node run ...``) so that they run
under the interpreter and virtual environment of the command that started them.
"""

from cli.launch import main

main()
