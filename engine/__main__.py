"""``python -m conceptevo ...`` = the ``conceptevo`` command (so ``torchrun -m conceptevo run config.toml`` works)."""
from .cli import main

if __name__ == "__main__":
    main()
