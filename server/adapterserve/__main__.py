"""`python -m adapterserve` is `adapterserve` (import-safe: vLLM spawns workers that re-import __main__)."""

from adapterserve.cli import main

if __name__ == "__main__":
    main()
