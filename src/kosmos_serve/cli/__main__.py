"""`python -m kosmos_serve.cli`: the same command line as `kosmos-serve`."""

from kosmos_serve.cli import main

if __name__ == "__main__":
    main()
