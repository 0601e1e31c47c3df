"""`python -m simpo_jax.generate`: see simpo_jax/generate/cli.py."""
from simpo_jax.generate.cli import main

if __name__ == "__main__":
    main()
