"""The `adapterserve` subcommand groups (cli.py composes them): `models`, `adapters`, `keys`."""
