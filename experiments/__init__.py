"""Experiments on baatt, one module per experiment, each run as ``python -m experiments.<name>``.

Every module opens its docstring with its command, takes a frozen-dataclass configuration from
``get_config()`` (each field a command-line flag) and writes to ``experiments/results/<study>/``
(see ``experiments/results/README.md``). What they share lives in ``experiments.harness``.
"""
