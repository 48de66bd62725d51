"""Shipped config tables (one JSON file per GPU, ``<device id>.json``) and the code around them.

- ``profiles.table``: the table format (records, validation, atomic save, merge); the tuner writes through it.
- ``profiles.dispatch``: ``select_config(shape)``, the runtime lookup ``chunk_gdn2`` uses when given no config.

Nothing is imported here, so that ``import profiles`` stays cheap; import the submodule you need.
"""
