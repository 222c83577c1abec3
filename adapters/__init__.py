"""The demo adapters' recipes and datasets (`<name>/recipe.yaml`, `<name>/data.jsonl`),
shipped in the wheel as the package `adapterserve.demo_recipes` (see pyproject.toml), so an
installed adapterserve finds them from any directory. The scripts beside them
(`make_datasets.py`) wrote the datasets; they are run from a checkout, never imported."""
