"""`python -m pipeline <command>`: the same commands as the `mnist-vae` console script."""

from pipeline.commands import main

if __name__ == "__main__":
    main()
